"""What a JSON grammar costs per generated token: `python benchmarks/structured.py [MLX_DIR]`.

Runs the same prompt with and without a JSON Schema (and with `json_object`) over a few seeds at
temperature 1 and prints ms/token for each, and the grammar's own cost per step (advancing
llguidance's matcher and computing the 131072-token mask), which does not depend on the model's size:
the tiny test checkpoint has Pixtral's real tokenizer and vocabulary. Without MLX_DIR it builds the tiny
random checkpoint of the tests in a temporary folder.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import mlx.core as mx

import pixtral_mlx
from pixtral_mlx import structured

ITEM = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "price": {"type": "number"}},
    "required": ["name", "price"],
    "additionalProperties": False,
}
RECEIPT = {
    "type": "object",
    "properties": {
        "store": {"type": "string", "maxLength": 16},
        "currency": {"enum": ["EUR", "USD", "GBP"]},
        "items": {"type": "array", "items": ITEM, "maxItems": 4},
        "total": {"type": "number"},
    },
    "required": ["store", "currency", "items", "total"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "Read this receipt into JSON."}]
SEEDS = range(6)


def tiny_checkpoint(folder: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).parent.parent / "tests"))
    import checkpoints

    from pixtral_mlx.convert import convert

    hf = checkpoints.write_hf_checkpoint(checkpoints.hf_model(seed=0), folder / "tiny-hf")
    return convert(hf, folder / "tiny-mlx", dtype="float32", progress=False)


def run(model: pixtral_mlx.Pixtral, label: str, **kwargs) -> None:
    constraints: list[structured.JsonConstraint] = []
    make = structured.JsonConstraint.__init__

    def record(self, *a, **k):  # keep each turn's processor to read its counters
        make(self, *a, **k)
        constraints.append(self)

    structured.JsonConstraint.__init__ = record
    try:
        tokens = seconds = 0.0
        for seed in SEEDS:
            tic = time.perf_counter()
            reply = model.generate(MESSAGES, temperature=1.0, seed=seed, max_tokens=64, **kwargs)
            first = reply.prompt_tokens / reply.prompt_tps if reply.prompt_tps else 0.0
            seconds += time.perf_counter() - tic - first  # decode time only
            tokens += reply.generation_tokens
    finally:
        structured.JsonConstraint.__init__ = make
    line = f"{label:<14} {tokens:5.0f} tokens  {1e3 * seconds / tokens:7.2f} ms/token"
    if constraints:
        steps = sum(c.steps for c in constraints)
        line += f"  grammar {1e3 * sum(c.seconds for c in constraints) / steps:.3f} ms/step over {steps} steps"
    print(line, flush=True)


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(sys.argv[1]) if len(sys.argv) > 1 else tiny_checkpoint(Path(tmp))
        model = pixtral_mlx.load(str(path))
        print(f"{path} on {mx.default_device()}, vocabulary {model.args.text.vocab_size}")
        tic = time.perf_counter()
        structured.grammar_factory(model.encoder.tokenizer)
        print(f"grammar factory (llguidance vocabulary), once a tokenizer: {time.perf_counter() - tic:.2f} s")
        model.generate(MESSAGES, max_tokens=4)  # warm up
        run(model, "unconstrained")
        run(model, "json_schema", json_schema=RECEIPT)
        run(model, "json_object", json_object=True)
        run(model, "unconstrained")


if __name__ == "__main__":
    main()
