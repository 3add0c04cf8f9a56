"""Smoke test of the benchmark: the whole run end to end on a tiny synthetic checkpoint.

It checks that every figure is there and positive and that the ratios are computed from the two
measurements they compare. It never asserts a speed (timed tests are flaky; the benchmark is the
place for speeds).
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HAS_VLM = importlib.util.find_spec("mlx_vlm") is not None


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--tiny", "--out", str(out)]
    if not HAS_VLM:
        cmd.append("--skip-vlm")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("# pixtral-mlx benchmark")  # the Markdown is printed
    assert (out / "results.md").read_text().strip() == proc.stdout.strip()
    return json.loads((out / "results.json").read_text())


def test_checkpoint_and_converter(result):
    ck = result["checkpoint"]
    assert positive(ck["bytes"]) and positive(ck["largest_tensor_bytes"])
    for name in ("bf16", "4bit"):
        c = result["convert"][name]
        for key in ("wall_s", "peak_rss_bytes", "output_bytes", "target_bytes"):
            assert positive(c[key]), (name, key)
        assert c["target_bytes"] == pytest.approx(1.5 * ck["largest_tensor_bytes"] + 1e9)
        assert c["met"] == (c["peak_rss_bytes"] <= c["target_bytes"])


def test_our_runtime_figures(result):
    for ck in ("4bit", "bf16"):
        ours = result["runs"][ck]["ours"]
        assert "error" not in ours, ours
        for size in result["settings"]["image_sizes"]:
            v = ours[f"vision_{size}"]
            assert all(positive(v[k]) for k in ("measured_s", "full_s", "zero_layer_s")), v
        for key in ("prefill_text", "prefill_image"):
            p = ours[key]
            assert all(positive(p[k]) for k in ("tokens", "measured_tps", "full_tps")), (key, p)
        assert positive(ours["decode"]["measured_tps"]) and positive(ours["decode"]["full_tps"])
        chat = ours["chat"]
        assert chat["second_tokens"] < chat["first_tokens"]
        for part in ("measured", "full"):
            c = chat[part]
            assert positive(c["first_s"]) and positive(c["second_s"])
            assert c["ratio"] == pytest.approx(c["second_s"] / c["first_s"])
        m = ours["memory"]
        for key in ("peak_mlx_bytes", "peak_rss_bytes", "weights_bytes", "full_peak_mlx_bytes", "full_weights_bytes"):
            assert positive(m[key]), key
        assert m["full_weights_bytes"] > m["weights_bytes"]  # 40/24 layers hold more than 2/2


def test_extrapolation_uses_both_depths(result):
    L = result["depths"]["text"]
    raw = result["raw"]["bf16"]["ours"]["prefill_text"]["seconds"]
    summary = result["runs"]["bf16"]["ours"]["prefill_text"]
    per_layer = max(raw[str(L)] - raw["1"], 0) / (L - 1)
    assert summary["full_s"] == pytest.approx(raw["1"] + 39 * per_layer)
    assert summary["full_tps"] == pytest.approx(summary["tokens"] / summary["full_s"])


@pytest.mark.skipif(not HAS_VLM, reason="mlx-vlm is not installed (pip install -e .[bench])")
def test_mlx_vlm_side_and_ratios(result):
    for ck in ("4bit", "bf16"):
        runs = result["runs"][ck]
        for variant in ("vlm_bf16", "vlm_fp32"):
            r = runs[variant]
            assert "error" not in r, r
            assert positive(r["prefill_text"]["full_tps"]) and positive(r["decode"]["full_tps"])
            comp = result["comparison"][ck][variant]
            for key in ("prefill_text", "decode"):
                c = comp[key]
                assert c["ours_tps"] == runs["ours"][key]["full_tps"]
                assert c["vlm_tps"] == r[key]["full_tps"]
                assert c["speedup"] == pytest.approx(c["ours_tps"] / c["vlm_tps"])
            if ck == "bf16":  # vision is measured on the bf16 checkpoint (the 4-bit one keeps it dense)
                for size in result["settings"]["image_sizes"]:
                    c = comp[f"vision_{size}"]
                    assert c["ours_s"] == runs["ours"][f"vision_{size}"]["full_s"]
                    assert c["vlm_s"] == r[f"vision_{size}"]["full_s"]
                    assert c["speedup"] == pytest.approx(c["vlm_s"] / c["ours_s"])
        # Both runtimes compute the same model: identical greedy tokens in float32.
        assert runs["token_check"]["identical"], runs["token_check"]


def test_bandwidth_bound_and_targets(result):
    bw = result["bandwidth"]
    assert all(positive(bw[k]) for k in ("mlx_sum_gbps", "mlx_copy_gbps"))
    bound = result["decode_bound"]
    assert positive(bound["gbps"]) and positive(bound["bytes"])
    assert bound["tps"] == pytest.approx(bound["gbps"] * 1e9 / bound["bytes"])
    assert positive(result["total_wall_s"])
    # Every verdict follows from the figures it reports (None only where a figure is missing).
    met = {t["target"]: t["met"] for t in result["targets"]}
    assert all(m is None or isinstance(m, bool) for m in met.values())
    ours = bound["runtimes"]["ours 4bit"]
    assert met["4-bit decode close to the bandwidth bound (≥ 70 %)"] == (ours / bound["tps"] >= 0.7)
    for ck in ("4bit", "bf16"):
        sp = result["comparison"][ck].get("vlm_bf16", {}).get("decode", {}).get("speedup")
        assert met[f"decode ≥ mlx-vlm default ({ck})"] == (None if sp is None else sp >= 1)
        for key in ("prefill_text", "prefill_image"):
            sp = result["comparison"][ck].get("vlm_bf16", {}).get(key, {}).get("speedup")
            assert met[f"{key.replace('_', ' ')} ≥ 10× mlx-vlm default ({ck})"] == (None if sp is None else sp >= 10)
        ratio = result["runs"][ck]["ours"]["chat"]["full"]["ratio"]
        assert met[f"turn-2 TTFT ≤ 1/20 of turn 1 with a 1024² image, @40/24 ({ck})"] == (ratio <= 1 / 20)
    for name, c in result["convert"].items():
        assert met[f"converter peak RSS ≤ 1.5 × largest tensor + 1 GB ({name})"] == c["met"]


def test_issue24_ratios_against_in_run_peaks(result):
    """Issue 24's table: every ratio is present, positive and computed from the figures it names."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import run

    peak = result["gemm_peak"]
    assert "error" not in peak and positive(peak["gflops"])
    assert peak["gflops"] == max(peak["shapes"].values())
    rows = {r["key"]: r for r in result["issue24"]}
    assert set(rows) == {
        "prefill_image",
        "prefill_text",
        "vision",
        "decode",
        "decode_bf16",
        "captions",
        "server",
        "server_decode",
    }
    assert all(positive(r["ratio"]) for r in rows.values())
    ours, params = result["runs"]["4bit"]["ours"], result["checkpoint"]["params"]
    for key in ("prefill_image", "prefill_text"):
        r, p = rows[key], ours[key]
        assert r["peak_gflops"] == peak["gflops"]
        assert r["flops"] == pytest.approx(run.prefill_flops(params, p["tokens"]))
        assert r["ratio"] == pytest.approx(r["flops"] / p["full_s"] / 1e9 / peak["gflops"])
    size = max(result["settings"]["image_sizes"])
    patches = result["raw"]["4bit"]["ours"][f"vision_{size}"]["patches"]
    assert patches == (size // 16) ** 2
    v = rows["vision"]
    assert v["flops"] == pytest.approx(run.vision_flops(params, patches))
    assert v["ratio"] == pytest.approx(v["flops"] / ours[f"vision_{size}"]["full_s"] / 1e9 / peak["gflops"])
    bound = result["decode_bound"]
    assert rows["decode"]["ratio"] == pytest.approx(bound["runtimes"]["ours 4bit"] / bound["tps"])
    # The bf16 checkpoint against its own bytes: more of them than the 4-bit one reads, so a lower bound.
    assert positive(bound["bf16_bytes"]) and bound["bf16_bytes"] > bound["bytes"]
    assert bound["bf16_tps"] == pytest.approx(bound["gbps"] * 1e9 / bound["bf16_bytes"])
    assert rows["decode_bf16"]["ratio"] == pytest.approx(bound["runtimes"]["ours bf16"] / bound["bf16_tps"])
    b = result["batch"]
    for k in (
        "batch_1_images_per_hour",
        "batch_8_images_per_hour",
        "server_1_client_tps",
        "server_4_clients_tps",
        "server_1_client_decode_tps",
        "server_4_clients_decode_tps",
    ):
        assert positive(b[k]), k
    assert b["batch_same_tokens"] is True  # batching changes no caption
    assert rows["captions"]["ratio"] == pytest.approx(b["batch_8_images_per_hour"] / b["batch_1_images_per_hour"])
    assert rows["server"]["ratio"] == pytest.approx(b["server_4_clients_tps"] / b["server_1_client_tps"])
    assert rows["server_decode"]["ratio"] == pytest.approx(
        b["server_4_clients_decode_tps"] / b["server_1_client_decode_tps"]
    )
    met = {t["target"]: t["met"] for t in result["targets"]}
    for key in ("prefill_image", "prefill_text", "vision"):
        r = rows[key]
        verdicts = [m for t, m in met.items() if t.endswith("of the f32 GEMM peak") and t.split(" ≥")[0] in r["name"]]
        assert verdicts == [r["ratio"] >= r["target"]], (key, verdicts)


def test_flop_counts():
    """The FLOP formulas on Pixtral-12B's widths, by hand: 2 per weight and token, 4·hd·heads per attention pair."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import run
    import synthetic

    p = synthetic.params(40, 24)
    per_token_weights = 2 * 5120 * 4096 + 2 * 5120 * 1024 + 3 * 5120 * 14336
    assert run.prefill_flops(p, 1) == pytest.approx(40 * (2 * per_token_weights + 4 * 4096) + 2 * 5120 * 131072)
    two = run.prefill_flops(p, 2) - 2 * 5120 * 131072
    assert two == pytest.approx(40 * (4 * per_token_weights + 4 * 4096 * 3))  # pairs (0,0), (1,0), (1,1)
    n = 4096
    layer = 2 * n * (4 * 1024**2 + 3 * 1024 * 4096) + 4 * n * n * 1024
    assert run.vision_flops(p, n) == pytest.approx(2 * n * 768 * 1024 + 24 * layer + 2 * n * (1024 * 5120 + 5120**2))
