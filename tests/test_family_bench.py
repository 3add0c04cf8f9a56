"""Smoke test of benchmarks/family.py (Mistral Small- and Ministral 3 8B-shaped models): the whole run at tiny
widths. Every figure is there and positive and the full-depth ones come from both measured depths; no speed is
asserted (the benchmark is the place for speeds)."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def positive(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("family-bench")
    cmd = [sys.executable, str(ROOT / "benchmarks" / "family.py"), "--tiny", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "family.md").read_text().strip() == proc.stdout.strip()
    assert not (out / "checkpoints").exists()  # the synthetic checkpoints are removed
    return json.loads((out / "family.json").read_text()), proc.stdout


def test_both_shapes_ran_as_their_family(result):
    res, _ = result
    assert list(res["models"]) == ["mistral-small-3.1", "ministral-3-8b"]
    small, m8b = res["models"]["mistral-small-3.1"], res["models"]["ministral-3-8b"]
    assert (small["decoder"], small["full_layers"]) == ("mistral", 40)
    assert (m8b["decoder"], m8b["full_layers"]) == ("ministral3", 34)
    assert small["checkpoint"]["params"]["vision_encoder"]["patch_size"] == 14
    for m in (small, m8b):
        assert "error" not in m["convert"] and positive(m["checkpoint"]["bytes"])
        assert m["raw"]["compute_dtype"] and "error" not in m["raw"]


def test_figures_are_positive_and_extrapolated_from_both_depths(result):
    res, _ = result
    L = res["text_layers"]
    for name, m in res["models"].items():
        s, raw = m["summary"], m["raw"]
        for key in ("prefill_text", "prefill_image"):
            p = s[key]
            assert all(positive(p[k]) for k in ("tokens", "measured_tps", "full_tps", "full_s")), (name, key)
            sec = raw[key]["seconds"]
            per = max(sec[str(L)] - sec["1"], 0.0) / (L - 1)
            assert p["full_s"] == pytest.approx(sec["1"] + (m["full_layers"] - 1) * per)
        d = s["decode"]
        assert positive(d["measured_tps"]) and positive(d["full_tps"])
        # decode: the median depth-1 token plus the median of the alternated pairs' differences (as run.py)
        smp = raw["decode"]["samples"]
        per = max(statistics.median(b - a for a, b in zip(smp["1"], smp[str(L)], strict=True)), 0.0) / (L - 1)
        assert d["full_s_per_token"] == pytest.approx(statistics.median(smp["1"]) + (m["full_layers"] - 1) * per)
        assert d["per_layer_s"] == pytest.approx(per)
        assert 0 < s["cpu_share"] <= 1.5  # CPU seconds over wall seconds x CPUs (a little over 1 from rounding)
        w = s["weights"]
        assert positive(w["measured_bytes"]) and w["full_bytes"] > w["measured_bytes"]


def test_markdown_table(result):
    res, md = result
    rows = [line for line in md.splitlines() if line.startswith("| mistral-small") or line.startswith("| ministral")]
    assert len(rows) == 2 and "error" not in md
    assert rows[0].startswith("| mistral-small-3.1 | 40 × 64") and rows[1].startswith("| ministral-3-8b | 34 × 64")
