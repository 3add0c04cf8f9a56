"""float32 GEMM through `mx.matmul` with each BLAS MLX can reach: `python benchmarks/blas.py [--repeats N]`.

Each BLAS runs in a fresh process (the choice is made once, before mlx is loaded): MLX's bundled reference BLAS
(`PIXTRAL_MLX_BLAS=off`), a system OpenBLAS (`PIXTRAL_MLX_BLAS=<path>`, when one is installed) and the
scipy-openblas32 wheel through pixtral_mlx._blas_shim (the default when both are installed). Shapes: a Pixtral-12B
prefill product (1024 tokens x 5120 -> 14336, the MLP's up projection) and a square 2048^3. Times are the best of
--repeats in each of --rounds fresh processes per BLAS, the optimized ones taking turns (the machine may be shared:
best-of filters the interference; the load average is printed with the table). The reference BLAS runs once, with
one repeat of the large shape (it takes over a minute). Also timed: one decode step's attention products for one
Pixtral-12B layer (scores and values, 8 KV heads x 4 query rows) at 1024 and 4096 cached tokens, ms (small GEMMs:
where OpenBLAS's threads cost more than they bring). Prints a Markdown table (docs/CPU.md §1).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

SHAPES = [(1024, 5120, 14336), (2048, 2048, 2048)]
CONTEXTS = [1024, 4096]  # decode: 4 query rows (Pixtral-12B's 32 heads over 8 KV heads) against this many keys
SYSTEM = [
    "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0",
    "/usr/lib64/libopenblas.so.0",
]

CHILD = """
import json, sys, time
import pixtral_mlx
from pixtral_mlx import backend
import mlx.core as mx

repeats = int(sys.argv[1])
out = {"note": backend.BLAS_NOTE, "cblas_sgemm": backend.gemm_library(), "threads": backend.blas_threads()}
for m, k, n in json.loads(sys.argv[2]):
    a, b = mx.random.normal((m, k)), mx.random.normal((k, n))
    mx.eval(a, b)
    best = float("inf")
    for _ in range(repeats if backend.BLAS or m * k * n < 2**32 else 1):
        tic = time.perf_counter()
        mx.eval(a @ b)
        best = min(best, time.perf_counter() - tic)
    out[f"{m}x{k}x{n}"] = 2 * m * k * n / best / 1e9
for context in json.loads(sys.argv[3]):  # one decode step's attention products for one layer (8 KV heads)
    q, k, v = (mx.random.normal(s) for s in [(8, 4, 128), (8, context, 128), (8, context, 128)])
    mx.eval(q, k, v)
    best = float("inf")
    for _ in range(10):
        tic = time.perf_counter()
        for _ in range(10):
            s = q @ k.swapaxes(-1, -2)
            mx.eval(s)
            mx.eval(s @ v)
        best = min(best, (time.perf_counter() - tic) / 10)
    out[f"attention {context}"] = best * 1e3
print(json.dumps(out))
"""


def run(setting: str | None, repeats: int) -> dict:
    env = dict(os.environ)
    env.pop("PIXTRAL_MLX_BLAS", None)
    if setting is not None:
        env["PIXTRAL_MLX_BLAS"] = setting
    cmd = [sys.executable, "-c", CHILD, str(repeats), json.dumps(SHAPES), json.dumps(CONTEXTS)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    rows = [("bundled reference (`PIXTRAL_MLX_BLAS=off`)", "off")]
    rows += [(f"system OpenBLAS (`{path}`)", path) for path in SYSTEM if os.path.exists(path)][:1]
    rows.append(("scipy-openblas32 wheel + shim (default)", None))
    print(f"load before: {os.getloadavg()[0]:.2f}; {time.strftime('%Y-%m-%d %H:%M')}", file=sys.stderr)
    names = [f"{m}x{k}x{n}" for m, k, n in SHAPES]
    attention = [f"attention {c}" for c in CONTEXTS]
    head = [f"{s} GFLOP/s" for s in names] + [f"decode attention, {c} keys, ms/layer" for c in CONTEXTS]
    print("| BLAS | " + " | ".join(head) + " | threads | cblas_sgemm resolves to |")
    print("|---|" + "---:|" * len(head) + "---:|---|")
    results: dict[str, dict] = {}
    for i in range(args.rounds):
        for label, setting in rows:
            if setting == "off" and i:
                continue
            r = run(setting, args.repeats)
            best = results.setdefault(label, r)
            for s in names:
                best[s] = max(best[s], r[s])
            for s in attention:
                best[s] = min(best[s], r[s])
    for label, _ in rows:
        r = results[label]
        figures = " | ".join([f"{r[s]:.1f}" for s in names] + [f"{r[s]:.2f}" for s in attention])
        print(f"| {label} | {figures} | {r['threads'] or '-'} | `{os.path.basename(r['cblas_sgemm'] or '?')}` |")
    print(f"load after: {os.getloadavg()[0]:.2f}", file=sys.stderr)


if __name__ == "__main__":
    main()
