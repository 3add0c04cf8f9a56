"""The server engine's aggregate decode throughput at 1 and 4 concurrent clients, and their ratio.

    python benchmarks/server_concurrency.py CHECKPOINT [--tokens 32] [--clients 4] [--pairs 3] [--json OUT.json]
    python benchmarks/server_concurrency.py --tiny [--tokens 8]

The in-process engine (`pixtral_mlx.server.engine.Engine`, as `pixtral-mlx serve` runs it, without HTTP) is
given jobs straight from an asyncio loop: one client's request alone, then `--clients` requests at once
(continuous batching: one decode step for all rows, through the multi-row kernel), after a warm-up of each, and
that pair `--pairs` times, alternated; the best run of each is reported (on a shared machine the least
disturbed), with the ratio of every pair. Every request is a greedy,
text-only chat prompt of the same token length (distinct, so no prefix cache is shared) and generates exactly
`--tokens` tokens (the end-of-sequence token is biased away). Aggregate tokens/s = all generated tokens ÷ the
wall time from the first submission to the last end (prefill included; the prompts are short); also per CPU
second of the process, since on a shared machine wall time is mostly CPU share. The ratio is the best N-client
run's ÷ the best 1-client run's. `--tiny` builds a tiny random checkpoint in a temporary folder (the test suite's),
where the figures say only that the script works.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pixtral_mlx  # noqa: E402  (before mlx: it chooses the BLAS)
from pixtral_mlx.server.engine import Engine, Job  # noqa: E402
from pixtral_mlx.turn import Options  # noqa: E402


def cpu_s() -> float:
    return time.process_time()  # all threads, at the clock's resolution (getrusage's is a scheduler tick)


def prompts(n: int, offset: int) -> list[list[dict[str, Any]]]:
    """`n` distinct one-message chats of the same shape (a different letter each)."""
    return [[{"role": "user", "content": f"Tell story {chr(65 + (offset + i) % 26)} about the sea."}] for i in range(n)]


async def _run(engine: Engine, chats: list[list[dict[str, Any]]], options: Options) -> tuple[list[int], list[int]]:
    """Submit every chat at once; (generated tokens, prompt tokens) per job."""
    loop = asyncio.get_running_loop()
    jobs = [Job(messages=m, options=options, loop=loop) for m in chats]
    for job in jobs:
        engine.submit(job)
    generated, prompt = [0] * len(jobs), [0] * len(jobs)

    async def drain(i: int, job: Job) -> None:
        while True:
            kind, value = await job.events.get()
            if kind == "error":
                raise RuntimeError(f"request {i} failed: {value}")
            if kind == "start":
                prompt[i] = value["prompt_tokens"]
            if kind == "chunk":
                generated[i] = value.generation_tokens
            if kind == "end":
                return

    await asyncio.gather(*(drain(i, j) for i, j in enumerate(jobs)))
    return generated, prompt


def measure(engine: Engine, clients: int, tokens: int, offset: int) -> dict[str, Any]:
    eos = engine.pixtral.encoder.eos_id
    options = Options(max_tokens=tokens, temperature=0.0, top_p=1.0, logit_bias={eos: -100.0})
    c, w = cpu_s(), time.perf_counter()
    generated, prompt = asyncio.run(_run(engine, prompts(clients, offset), options))
    wall, cpu = time.perf_counter() - w, cpu_s() - c
    total = sum(generated)
    return {
        "clients": clients,
        "prompt_tokens": prompt,
        "generated": generated,
        "wall_s": wall,
        "cpu_s": cpu,
        "tokens_per_s": total / wall,
        "tokens_per_cpu_s": total / cpu if cpu > 0 else float("nan"),
        "batch": max(r.batch for r in list(engine.records)[-clients:]),
    }


def run(checkpoint: str, tokens: int, clients: int, pairs: int = 3) -> dict[str, Any]:
    engine = Engine(lambda: pixtral_mlx.load(checkpoint), max_batch=max(clients, 1))
    engine.start()
    if not engine.ready.wait(600) or engine.load_error is not None:
        raise SystemExit(f"could not load {checkpoint}: {engine.load_error}")
    letters = iter(range(26))  # a new letter for every prompt: no request finds another's in the prefix cache
    if (1 + clients) * (pairs + 1) > 26:
        raise SystemExit("too many prompts for distinct letters: lower --pairs or --clients")

    def timed(n: int, count: int) -> dict[str, Any]:
        offset = next(letters)
        for _ in range(n - 1):
            next(letters)
        return measure(engine, n, count, offset=offset)

    try:
        timed(1, 2)  # warm-up: the first calls at one row and at `clients` rows
        timed(clients, 2)
        ones, manys = [], []
        for _ in range(pairs):  # alternated: both under the same conditions on a shared machine
            ones.append(timed(1, tokens))
            manys.append(timed(clients, tokens))
    finally:
        engine.close()
    one = max(ones, key=lambda r: r["tokens_per_s"])
    many = max(manys, key=lambda r: r["tokens_per_s"])
    pair_ratios = sorted(m["tokens_per_s"] / o["tokens_per_s"] for o, m in zip(ones, manys))
    return {
        "load": os.getloadavg()[0],
        "tokens": tokens,
        "one": one,
        "many": many,
        "ratio": many["tokens_per_s"] / one["tokens_per_s"],
        "ratio_cpu": many["tokens_per_cpu_s"] / one["tokens_per_cpu_s"],
        "pair_ratios": pair_ratios,
        "samples": {"one": ones, "many": manys},
    }


def report(out: dict[str, Any]) -> None:
    for key in ("one", "many"):
        r = out[key]
        print(
            f"{r['clients']} client(s): {sum(r['generated'])} tokens (prompts of {r['prompt_tokens']} tokens) in "
            f"{r['wall_s']:.2f} s wall, {r['cpu_s']:.2f} s CPU -> {r['tokens_per_s']:.2f} tokens/s, "
            f"{r['tokens_per_cpu_s']:.2f} tokens per CPU s; decoded together: {r['batch']}"
        )
    n = out["many"]["clients"]
    print(
        f"aggregate ratio {n} clients / 1 client, best of {len(out['pair_ratios'])} each: {out['ratio']:.2f}x (wall), "
        f"{out['ratio_cpu']:.2f}x (per CPU s); per alternated pair "
        + ", ".join(f"{r:.2f}x" for r in out["pair_ratios"])
        + f"; load {out['load']:.1f}"
    )


def tiny_checkpoint(folder: Path) -> str:
    """The test suite's tiny random checkpoint, converted to MLX (float32)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import checkpoints  # tests/checkpoints.py

    from pixtral_mlx.convert import convert

    hf = checkpoints.write_hf_checkpoint(checkpoints.hf_model(seed=0), folder / "tiny-hf")
    return str(convert(hf, folder / "tiny-mlx", dtype="float32", progress=False))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint", nargs="?")
    ap.add_argument("--tiny", action="store_true", help="a tiny random checkpoint (checks the script, not speed)")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--pairs", type=int, default=3, help="1-client and N-client runs alternated this many times")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args()
    if args.tiny == bool(args.checkpoint):
        ap.error("give a CHECKPOINT or --tiny")
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = tiny_checkpoint(Path(tmp)) if args.tiny else args.checkpoint
        out = run(checkpoint, args.tokens, args.clients, args.pairs)
    report(out)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
