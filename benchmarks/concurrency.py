"""Aggregate decode throughput of the server for 1, 4 and 8 concurrent clients (continuous batching).

    python benchmarks/concurrency.py MLX_DIR [--tokens 64] [--rounds 2]
    python benchmarks/concurrency.py --url http://127.0.0.1:8000 [--model NAME]

With MLX_DIR it starts the real app (engine + uvicorn) in this process on a free port; with --url it talks to a
running `pixtral-mlx serve`. Each client sends greedy chat requests of `--tokens` tokens (distinct prompts, so no
prefix is shared) back to back; the figure is all clients' generated tokens over the wall time, and the ratio
4-clients/1-client. On the tiny test checkpoint the figures say only that the script works.
"""

from __future__ import annotations

import argparse
import socket
import threading
import time
from typing import Any

import httpx


def serve(model_dir: str) -> tuple[str, Any]:
    import uvicorn

    import pixtral_mlx
    from pixtral_mlx.server.app import Settings, create_app
    from pixtral_mlx.server.engine import Engine

    engine = Engine(lambda: pixtral_mlx.load(model_dir))
    engine.start()
    if not engine.ready.wait(600) or engine.load_error is not None:
        raise SystemExit(f"could not load {model_dir}: {engine.load_error}")
    settings = Settings(model_id="bench", context_length=engine.pixtral.context_length)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(settings, engine), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)

    def stop() -> None:
        server.should_exit = True
        thread.join(30)
        engine.close()
        print(f"most requests decoded together: {engine.max_batch_seen}")

    return f"http://127.0.0.1:{sock.getsockname()[1]}", stop


def run(url: str, model: str, clients: int, tokens: int, rounds: int) -> float:
    """Tokens per second over all clients."""
    counts = [0] * clients

    def client(i: int) -> None:
        with httpx.Client(timeout=600) as http:
            for r in range(rounds):
                body = {
                    "model": model,
                    "messages": [{"role": "user", "content": f"Client {i}, round {r}: write a long story."}],
                    "temperature": 0,
                    "max_tokens": tokens,
                }
                reply = http.post(f"{url}/v1/chat/completions", json=body)
                reply.raise_for_status()
                counts[i] += reply.json()["usage"]["completion_tokens"]

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    tic = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(counts) / (time.perf_counter() - tic)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir", nargs="?")
    p.add_argument("--url")
    p.add_argument("--model", default="bench")
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=2)
    a = p.parse_args()
    if (a.model_dir is None) == (a.url is None):
        p.error("give MLX_DIR or --url")
    url, stop = (a.url, lambda: None) if a.url else serve(a.model_dir)
    try:
        run(url, a.model, 1, 4, 1)  # warm-up
        tps = {n: run(url, a.model, n, a.tokens, a.rounds) for n in (1, 4, 8)}
    finally:
        stop()
    for n, v in tps.items():
        print(f"{n} client(s): {v:8.1f} tokens/s")
    print(f"4 clients / 1 client: {tps[4] / tps[1]:.2f}x   8 / 1: {tps[8] / tps[1]:.2f}x")


if __name__ == "__main__":
    main()
