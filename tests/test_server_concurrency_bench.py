"""benchmarks/server_concurrency.py on the tiny checkpoint: the figures are there and the ratio is theirs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))


@pytest.fixture(scope="module")
def figures(mlx_dir):
    import server_concurrency

    return server_concurrency.run(str(mlx_dir), tokens=6, clients=4, pairs=2)


def test_every_request_generates_its_tokens_and_the_four_are_batched(figures):
    assert figures["one"]["generated"] == [6]
    assert figures["many"]["generated"] == [6, 6, 6, 6]
    assert figures["one"]["batch"] == 1 and figures["many"]["batch"] == 4
    prompts = figures["one"]["prompt_tokens"] + figures["many"]["prompt_tokens"]
    assert len(set(prompts)) == 1 and prompts[0] > 0  # the same prompt length for every client


def test_ratio_is_derived_from_the_figures(figures, capsys):
    import server_concurrency

    one, many = figures["one"], figures["many"]
    for r in (one, many):
        assert r["wall_s"] > 0 and r["tokens_per_s"] == pytest.approx(sum(r["generated"]) / r["wall_s"])
    assert figures["ratio"] == pytest.approx(many["tokens_per_s"] / one["tokens_per_s"])
    ones, manys = figures["samples"]["one"], figures["samples"]["many"]
    assert len(ones) == len(manys) == 2
    assert one["tokens_per_s"] == max(r["tokens_per_s"] for r in ones)  # the best of each
    assert many["tokens_per_s"] == max(r["tokens_per_s"] for r in manys)
    pairs = sorted(m["tokens_per_s"] / o["tokens_per_s"] for o, m in zip(ones, manys))
    assert figures["pair_ratios"] == pytest.approx(pairs)
    server_concurrency.report(figures)
    out = capsys.readouterr().out
    assert f"aggregate ratio 4 clients / 1 client, best of 2 each: {figures['ratio']:.2f}x" in out
    assert ", ".join(f"{r:.2f}x" for r in pairs) in out
