"""One benchmark job in its own process: `python benchmarks/measure.py SPEC.json RESULT.json`.

Jobs: "convert" (our converter), "bandwidth" (memory read speed), "peak" (the f32 GEMM peak), "ours"
(pixtral_mlx on one checkpoint), "vlm" (mlx-vlm on the same checkpoint, fed the same token ids and pixels)
and "batch" (batched captions and concurrent server requests through the library).
`run.py` starts one process per job (so that peak RSS is per job) and does the arithmetic.

Every job imports `pixtral_mlx` before `mlx`, so both runtimes get the same BLAS (on Linux the
package preloads an optimized one); the job reports which. Nothing here assumes the CPU: the
device is whatever `mx.default_device()` is.

Depths: decoder layers are measured at depth 1 and at the checkpoint's depth L, vision layers at
depth 0 and at a depth M' <= M, by truncating the layer lists of the loaded model (same code path,
same weights); `run.py` extrapolates per layer to Pixtral-12B's 40 + 24 layers.
"""

from __future__ import annotations

import json
import platform
import resource
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from timing import GEMM_PEAK_SHAPES, best, gemm_peak, mlx_sum_gbps, numpy_sums  # this folder

import pixtral_mlx  # noqa: F401  (before any mlx import in the jobs below: on Linux it preloads the BLAS)

TEXT_QUESTION = "Describe this image in detail."
CHAT_FOLLOWUP = "Which colours dominate?"
DECODE_PROMPT = "Write a long story about the sea."
WORDS = (
    "river stone quiet market lantern harbor winter orchard signal copper meadow engine "
    "garden mirror thunder canvas pepper ladder silver forest compass velvet island bridge "
    "candle marble thistle falcon glacier saddle timber violet"
).split()


def now() -> float:
    return time.perf_counter()


def peak_rss_bytes() -> int:
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if platform.system() == "Darwin" else rss * 1024)


def random_image(size: int, seed: int):
    from PIL import Image

    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8), "RGB")


def image_message(size: int, seed: int, text: str = TEXT_QUESTION) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "image", "image": random_image(size, seed)}, {"type": "text", "text": text}],
        }
    ]


def text_of_tokens(encode: Callable[[list[dict]], list[int]], n_tokens: int) -> str:
    """A user text whose chat prompt is about `n_tokens` tokens (never more)."""
    rng = np.random.default_rng(1234)
    words = [WORDS[i] for i in rng.integers(0, len(WORDS), max(4 * n_tokens, 64))]

    def n_for(k: int) -> int:
        return len(encode([{"role": "user", "content": " ".join(words[:k])}]))

    lo, hi = 1, len(words)
    while lo < hi:  # largest k with n_for(k) <= n_tokens
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if n_for(mid) <= n_tokens else (lo, mid - 1)
    return " ".join(words[:lo])


def run_stream(steps: Iterator[Any], t0: float, max_tokens: int, budget_s: float) -> dict:
    """Consume a token stream; time to first token and decode time per token.

    Stops after `max_tokens` tokens, or once the decode has run `budget_s` seconds (with at least
    2 decoded tokens after the first), whichever comes first.
    """
    times: list[float] = []
    try:
        for _ in steps:
            times.append(now())
            if len(times) >= max_tokens:
                break
            if len(times) >= 3 and times[-1] - times[0] > budget_s:
                break
    finally:
        steps.close()
    out = {"ttft_s": times[0] - t0, "tokens": len(times)}
    if len(times) > 1:
        out["decode_s_per_token"] = (times[-1] - times[0]) / (len(times) - 1)
    return out


# --------------------------------------------------------------------------------------------
# Runtimes: the same measurements through pixtral_mlx and through mlx-vlm.


class Depths:
    """Sets a loaded model's depths by truncating its layer lists (same code path, same weights)."""

    model: Any

    def keep_layers(self) -> None:
        """Remembers the full layer lists (once loaded)."""
        self.text_layers = list(self.model.language_model.model.layers)
        self.vision_layers = list(self.model.vision_tower.vision_model.transformer.layers)

    def set_depth(self, text: int | None = None, vision: int | None = None) -> None:
        if text is not None:
            self.model.language_model.model.layers = self.text_layers[:text]
        if vision is not None:
            self.model.vision_tower.vision_model.transformer.layers = self.vision_layers[:vision]


class Ours(Depths):
    name = "pixtral_mlx"

    def __init__(self, path: str):

        t = now()
        self.px = pixtral_mlx.load(path)
        self.load_s = now() - t
        self.model = self.px.model
        self.keep_layers()
        self.detok = self.px.encoder.detokenizer

    def encode(self, messages: list[dict]) -> Any:
        return self.px.encode(messages)

    def vision(self, prompt: Any) -> float:
        """Seconds of `image_features` on an image it has not seen."""
        import mlx.core as mx

        mx.synchronize()
        t = now()
        self.px.image_features(prompt.images[:1])
        return now() - t

    def features(self, prompt: Any) -> Any:
        return self.px.image_features(prompt.images)

    def generate(self, prompt: Any, max_tokens: int, budget_s: float = 1e9) -> dict:
        """Prefill (image features already cached, when the prompt has images) and decode."""
        import mlx.core as mx

        from pixtral_mlx.generate import Options, stream_tokens

        cache = self.model.make_cache()
        mx.synchronize()
        t0 = now()
        emb = self.px.embeddings(prompt)
        steps = stream_tokens(
            self.model,
            self.detok(),
            prompt.tokens,
            emb,
            cache,
            eos_id=-1,
            options=Options(max_tokens=max_tokens + 1, temperature=0.0, top_p=1.0),
        )
        return run_stream(steps, t0, max_tokens, budget_s)

    def chat_ttft(self, size: int, seed: int, repeats: int = 1) -> dict:
        """TTFT of a first turn with a new image and of a text-only second turn (best of `repeats`)."""
        import mlx.core as mx

        chat = self.px.chat(max_tokens=2, temperature=0.0)

        def turn(content: Any) -> tuple[float, int]:
            mx.synchronize()
            t0 = now()
            stream = chat.stream(content)
            first = next(stream)
            ttft = now() - t0
            for _ in stream:
                pass
            return ttft, first.prompt_tokens

        out: dict[str, Any] = {}
        out["first_ttft_s"], out["first_prompt_tokens"] = turn(image_message(size, seed)[0]["content"])
        # To repeat the follow-up, put the conversation back as it was after the first turn: drop the
        # follow-up (undo) and trim the chat's prompt cache to the first turn.
        offset = chat.cache.offset
        seconds = []
        for i in range(repeats):
            if i:
                chat.undo()
                chat.cache.trim(offset)
            t, out["second_prompt_tokens"] = turn(CHAT_FOLLOWUP)
            seconds.append(t)
        out["second_ttft_s"], out["second_samples"] = min(seconds), seconds
        return out

    def weight_bytes(self) -> dict:
        from mlx.utils import tree_flatten

        def nbytes(module: Any) -> int:
            return sum(v.nbytes for _, v in tree_flatten(module.parameters()))

        lm = self.model.language_model
        return {
            "text_layer": nbytes(self.text_layers[0]),
            "vision_layer": nbytes(self.vision_layers[0]) if self.vision_layers else 0,
            "lm_head": nbytes(lm.lm_head),
            "total": nbytes(self.model),
        }


class Vlm(Depths):
    name = "mlx_vlm"

    def __init__(self, path: str, dtype: str, encoder: Any):
        import mlx.core as mx
        from mlx_vlm.utils import load_model

        t = now()
        self.model = load_model(Path(path))
        if dtype == "float32":
            self.model.set_dtype(mx.float32)
        mx.eval(self.model.parameters())
        self.load_s = now() - t
        self.encoder = encoder  # our PromptEncoder: the same token ids and pixels for both runtimes
        self.keep_layers()

    def encode(self, messages: list[dict]) -> Any:
        return self.encoder.encode(messages)

    def _image_features(self, pixels: np.ndarray) -> Any:
        # What mlx-vlm's `get_input_embeddings` does for an image, without the token merge.
        import mlx.core as mx

        pv = mx.array(pixels)[None]
        *_, hidden = self.model.vision_tower(pv.transpose(0, 2, 3, 1), output_hidden_states=True)
        feats = self.model.multi_modal_projector(hidden[self.model.vision_feature_layer])
        mx.eval(feats)
        return feats

    def vision(self, prompt: Any) -> float:
        import mlx.core as mx

        mx.synchronize()
        t = now()
        self._image_features(prompt.images[0].pixels)
        return now() - t

    def features(self, prompt: Any) -> Any:
        return [self._image_features(img.pixels) for img in prompt.images]

    def generate(self, prompt: Any, max_tokens: int, budget_s: float = 1e9, features: Any = None) -> dict:
        import mlx.core as mx
        from mlx_vlm.generate.ar import generate_step

        ids = mx.array(prompt.tokens)[None]
        kwargs: dict[str, Any] = {}
        pixels = None
        if prompt.images:
            # The vision features are passed in (mlx-vlm's `cached_image_features`): prefill only.
            pixels = mx.array(prompt.images[0].pixels)[None]
            kwargs["cached_image_features"] = mx.concatenate(features, axis=1)
        mx.synchronize()
        t0 = now()
        steps = generate_step(ids, self.model, pixels, None, max_tokens=max_tokens + 1, temperature=0.0, **kwargs)
        return run_stream(steps, t0, max_tokens, budget_s)

    def weight_bytes(self) -> dict:
        from mlx.utils import tree_flatten

        def nbytes(module: Any) -> int:
            return sum(v.nbytes for _, v in tree_flatten(module.parameters()))

        return {
            "text_layer": nbytes(self.text_layers[0]),
            "vision_layer": nbytes(self.vision_layers[0]) if self.vision_layers else 0,
            "lm_head": nbytes(self.model.language_model.lm_head),
            "total": nbytes(self.model),
        }


# --------------------------------------------------------------------------------------------
# The measurement plan, shared by both runtimes.


def alternate(
    run: Callable[[int], float],
    depths: tuple[int, int],
    budget_s: float,
    max_pairs: int = 3,
    log: Callable[[str], None] | None = None,
    what: str = "",
    done: dict | None = None,
) -> dict:
    """Time `run(depth)` at both depths, alternately, and repeat the pair while it fits the budget.

    On a shared machine other processes come and go: alternating puts both depths under the same
    conditions, and the minimum of each is the least disturbed. Keeps every sample. `done`: samples
    already taken (depth -> seconds), used in the first pair instead of running again.
    """
    samples: dict[str, list[float]] = {str(d): [] for d in depths}
    pending = dict(done or {})
    t0 = now()
    while True:
        t_pair = now()
        for d in depths:
            samples[str(d)].append(pending.pop(d) if d in pending else run(d))
        spent, last = now() - t0, now() - t_pair
        if len(samples[str(depths[0])]) >= max_pairs or spent + last > budget_s:
            break
    out = {"seconds": {d: min(v) for d, v in samples.items()}, "samples": samples}
    if log:
        log(f"{what}: " + ", ".join(f"depth {d} {min(v):.3f} s (of {len(v)})" for d, v in samples.items()))
    return out


def measure_runtime(rt: Any, spec: dict, log: Callable[[str], None]) -> dict:
    import mlx.core as mx

    s = spec["settings"]
    L, M = spec["text_layers"], spec["vision_layers"]
    Mv = min(M, spec.get("vision_depth") or M)  # vision depth measured (mlx-vlm bf16: 1, it is slow)
    budget = s["budget_s"]
    res: dict[str, Any] = {"load_s": rt.load_s, "depths": {"text": [1, L], "vision": [0, Mv]}}
    seed = iter(range(spec.get("seed", 100), 10**9))

    def encode_text(messages: list[dict]) -> list[int]:
        return rt.encode(messages).tokens

    def text_prompt(n: int) -> Any:
        return rt.encode([{"role": "user", "content": text_of_tokens(encode_text, n)}])

    def prefill_at(prompt: Any, **kw: Any) -> Callable[[int], float]:
        def run(depth: int) -> float:
            rt.set_depth(text=depth)
            return rt.generate(prompt, max_tokens=1, **kw)["ttft_s"]

        return run

    # Warm-up: first kernels, allocator, threads.
    rt.set_depth(text=1, vision=0)
    rt.vision(rt.encode(image_message(64, next(seed))))
    rt.generate(rt.encode([{"role": "user", "content": "Hi"}]), max_tokens=1)
    mx.reset_peak_memory()

    # 1. Vision encoding on a fresh cache (a new image every time), at vision depths 0 and Mv.
    if spec.get("measure_vision", True):
        for size in s["image_sizes"]:

            def vision(depth: int, size: int = size) -> float:
                rt.set_depth(vision=depth)
                return rt.vision(rt.encode(image_message(size, next(seed))))

            res[f"vision_{size}"] = {
                "patches": (size // 16) ** 2,
                **alternate(vision, (0, Mv), budget / 2, log=log, what=f"vision {size}²"),
            }
    rt.set_depth(vision=Mv)

    # 2. Prefill of a ~1K-token text prompt at text depths 1 and L.
    target = s["prompt_tokens"]
    long_prompt = text_prompt(target)
    ramp: dict[str, float] = {}
    if spec.get("ramp"):
        # Slow runtimes: grow the prompt 4x at a time while the next step fits in the budget. The
        # ramp runs at depth L: at depth 1 lazy evaluation computes only the keys and values of the
        # prompt (the last layer's output is needed for the last token only), which says nothing
        # about the cost of a layer.
        n = 8
        while True:
            long_prompt = text_prompt(n)
            t = prefill_at(long_prompt)(L)
            ramp[str(len(long_prompt))] = t
            log(f"prefill ramp: {len(long_prompt)} tokens at depth {L} in {t:.1f} s")
            nxt = min(4 * n, target)
            if n >= target or t * nxt / len(long_prompt) > budget:
                break
            n = nxt
    res["prefill_text"] = {
        "tokens": len(long_prompt),
        "ramp": ramp,
        **alternate(
            prefill_at(long_prompt),
            (1, L),
            budget / 2,
            log=log,
            what=f"prefill {len(long_prompt)} tokens",
            done={L: ramp[str(len(long_prompt))]} if ramp else None,
        ),
    }

    # Same-length comparison points: ours also at the prompt lengths mlx-vlm could afford.
    for n in spec.get("extra_prompt_tokens", []):
        p = text_prompt(n)
        res.setdefault("prefill_text_at", {})[str(len(p))] = {
            "tokens": len(p),
            **alternate(prefill_at(p), (1, L), budget / 4, log=log, what=f"prefill {len(p)} tokens"),
        }

    # Image prompt (features cached before timing: prefill only).
    size = s["prefill_image_size"]
    img_prompt = rt.encode(image_message(size, next(seed)))
    per_token = res["prefill_text"]["seconds"][str(L)] / res["prefill_text"]["tokens"]
    est = per_token * len(img_prompt) * 1.2  # depth L, plus depth 1 (mostly keys and values)
    if not spec.get("ramp") or est <= 1.5 * budget:
        feats = rt.features(img_prompt)  # ours caches them; mlx-vlm gets them as cached_image_features
        kw = {"features": feats} if isinstance(rt, Vlm) else {}
        res["prefill_image"] = {
            "tokens": len(img_prompt),
            "image": size,
            **alternate(
                prefill_at(img_prompt, **kw),
                (1, L),
                budget / 2,
                log=log,
                what=f"image prompt prefill {len(img_prompt)} tokens",
            ),
        }
    else:
        res["prefill_image"] = {"tokens": len(img_prompt), "image": size, "skipped": True, "estimated_s": est}
        log(f"image prompt prefill skipped: estimated {est:.0f} s")

    # 3. Decode (greedy, EOS ignored): seconds per token after the first.
    dec_prompt = rt.encode([{"role": "user", "content": DECODE_PROMPT}])
    counts: dict[str, list[int]] = {"1": [], str(L): []}

    def decode(depth: int) -> float:
        rt.set_depth(text=depth)
        r = rt.generate(dec_prompt, max_tokens=s["decode_tokens"], budget_s=s["decode_budget_s"] / 2)
        counts[str(depth)].append(r["tokens"])
        return r["decode_s_per_token"]

    # Up to 5 pairs (the budget stops the slow runtimes sooner): the full-depth figure is t(1) + 39 × the
    # difference of two minima a few ms apart, so 2 pairs let one disturbed sample move it by 2× (one run gave 98 %
    # of the bound, the next 47 %, with the same code).
    d = alternate(decode, (1, L), 2 * s["decode_budget_s"], max_pairs=5, log=log, what="decode s/token")
    res["decode"] = {
        "prompt_tokens": len(dec_prompt),
        "tokens": counts,
        "seconds_per_token": d["seconds"],
        "samples": d["samples"],
    }

    # 4. Chat: TTFT of a turn with a new image, then of a text-only follow-up (ours only). The
    # follow-up is repeated (undo + send: the cache is trimmed back to the first turn) and the
    # least disturbed kept.
    if spec.get("chat"):
        rt.set_depth(vision=M)
        size = s["chat_image_size"]
        row = {}
        for depth in (1, L):
            rt.set_depth(text=depth)
            row[str(depth)] = rt.chat_ttft(size, next(seed), repeats=s.get("chat_repeats", 3))
            log(f"chat depth {depth}: {row[str(depth)]}")
        res["chat"] = {"image": size, "vision_depth": M, "by_depth": row}

    rt.set_depth(text=L, vision=M)
    res["memory"] = {
        "peak_mlx_bytes": mx.get_peak_memory(),
        "active_mlx_bytes": mx.get_active_memory(),
        "peak_rss_bytes": peak_rss_bytes(),
        "weights": rt.weight_bytes(),
    }
    return res


def first_tokens(rt: Any, n: int = 8) -> list[int]:
    """Greedy tokens of a fixed prompt: lets run.py check both runtimes compute the same model."""
    prompt = rt.encode([{"role": "user", "content": DECODE_PROMPT}])
    if isinstance(rt, Ours):
        from pixtral_mlx.generate import Options, stream_tokens

        steps = stream_tokens(
            rt.model,
            rt.detok(),
            prompt.tokens,
            rt.px.embeddings(prompt),
            rt.model.make_cache(),
            eos_id=-1,
            options=Options(max_tokens=n + 1, temperature=0.0, top_p=1.0),
        )
        out = [c.token for c in steps if c.token is not None][:n]
    else:
        import mlx.core as mx
        from mlx_vlm.generate.ar import generate_step

        steps = generate_step(mx.array(prompt.tokens)[None], rt.model, None, None, max_tokens=n, temperature=0.0)
        out = [int(t) for t, _ in steps][:n]
    return out


def measure_job(rt: Any, spec: dict, log: Callable[[str], None]) -> dict:
    """A runtime job's measurements (`measure_runtime`), then its first tokens (if asked) at the depth it was
    loaded with."""
    res = measure_runtime(rt, spec, log)
    rt.set_depth(text=spec["text_layers"], vision=spec["vision_layers"])
    if spec.get("check_tokens"):
        res["first_tokens"] = first_tokens(rt)
    return res


def loaded_facts(rt: Any) -> dict:
    """Where a runtime ran and in which dtypes: its model's compute dtype and its scales' (the norm weight's
    when the layers are not quantized)."""
    import mlx.core as mx

    from pixtral_mlx import backend

    norm = rt.model.language_model.model.norm.weight
    return {
        "device": backend.device_name(),
        "mlx_device": str(mx.default_device()),
        "compute_dtype": str(norm.dtype),
        "scales_dtype": str(getattr(rt.text_layers[0].self_attn.q_proj, "scales", norm).dtype),
    }


# --------------------------------------------------------------------------------------------
# Jobs.


def job_ours(spec: dict, log: Callable[[str], None]) -> dict:
    from pixtral_mlx import backend, cpu_kernel

    if spec.get("patches"):  # experiments.py: library changes under test, installed before loading
        sys.path.insert(0, str(Path(__file__).parent))
        import patches

        patches.apply(spec["patches"])
    rt = Ours(spec["model"])
    res = measure_job(rt, spec, log)
    res.update(
        runtime="pixtral_mlx",
        patches=spec.get("patches") or [],
        blas=backend.BLAS_NOTE,
        decode_kernel=cpu_kernel.describe() if backend.on_cpu() else None,
        **loaded_facts(rt),
    )
    return res


def job_vlm(spec: dict, log: Callable[[str], None]) -> dict:
    import mlx_vlm

    from pixtral_mlx import backend
    from pixtral_mlx.prompt import PromptEncoder

    tekken = Path(spec["model"]) / "tekken.json"
    rt = Vlm(spec["model"], spec["dtype"], PromptEncoder(tekken))
    res = measure_job(rt, spec, log)
    res.update(runtime=f"mlx_vlm {mlx_vlm.__version__}", blas=backend.BLAS_NOTE, **loaded_facts(rt))
    return res


def job_convert(spec: dict, log: Callable[[str], None]) -> dict:
    from pixtral_mlx.convert import convert

    t = now()
    out = convert(
        spec["source"],
        spec["output"],
        dtype="bfloat16",
        quantize=spec["quantize"],
        bits=spec.get("bits", 4),
        group_size=spec.get("group_size", 64),
        force=True,
        progress=False,
    )
    wall = now() - t
    size = sum(f.stat().st_size for f in Path(out).glob("*.safetensors"))
    return {"wall_s": wall, "output_bytes": size, "peak_rss_self_bytes": peak_rss_bytes()}


def job_bandwidth(spec: dict, log: Callable[[str], None]) -> dict:
    """Memory read bandwidth: MLX reductions on the default device, and numpy on the host (timing.py)."""
    import mlx.core as mx

    n = spec["bytes"] // 4
    repeats = 5
    a = mx.random.uniform(shape=(n,))
    mx.eval(a)
    out = {"bytes": a.nbytes, "device": str(mx.default_device())}
    out["mlx_sum_gbps"] = mlx_sum_gbps(a, repeats)
    out["mlx_copy_gbps"] = 2 * a.nbytes / best(lambda: mx.eval(a * 2.0), repeats) / 1e9
    a = None  # free it before numpy allocates its own
    mx.clear_cache()
    out.update(numpy_sums(np.ones(n, dtype=np.float32), spec.get("threads") or 2, repeats))
    return out


def job_peak(spec: dict, log: Callable[[str], None]) -> dict:
    """The f32 GEMM peak (`timing.gemm_peak`: mx.matmul on large f32 shapes, best of N), which issue 24's
    prefill and vision ratios are taken against."""
    shapes = tuple(tuple(s) for s in spec.get("shapes") or GEMM_PEAK_SHAPES)
    out = gemm_peak(spec.get("repeats", 3), shapes)
    log(f"f32 GEMM peak {out['gflops']:.0f} GFLOP/s ({out['shape']})")
    return out


def job_batch(spec: dict, log: Callable[[str], None]) -> dict:
    """Batched throughput through the library, on one checkpoint:

    - captions: the same images (`images`, `edge` px) captioned with `Pixtral.stream_batch` in batches of 1 and
      of 8, greedy, `tokens` tokens each (EOS ignored); images/hour, vision features computed in both (the
      feature cache is cleared before each), and whether every caption equals its batch-1 caption;
    - the server's continuous batcher (`pixtral_mlx.batching.run`, what `serve`'s engine runs): 1 request
      alone and 4 at once (distinct text prompts), alternated 3 times after a warm-up of each, the best of each;
      generated tokens/s over the wall time; and over the decode
      steps only (the tokens after every request's first one, over the time after it: the multi-row kernel's
      figure, without the prompts' prefill, which at `tokens` tokens a reply is most of the wall time).
    """
    import mlx.core as mx

    from pixtral_mlx import batching
    from pixtral_mlx.turn import Options

    px = pixtral_mlx.load(spec["model"])
    px.encoder.eos_id = -1  # random weights: the token budget decides the length
    s = spec["settings"]
    n, edge, tokens = s["batch_images"], s["batch_edge"], s["batch_tokens"]
    prompts = [px.encode(image_message(edge, 500 + i, "Describe this image.")) for i in range(n)]

    def caption(size: int, budget: int = tokens) -> tuple[float, list[list[int]]]:
        px.features.clear()
        out: list[list[int]] = [[] for _ in prompts]
        mx.synchronize()
        t = now()
        for k in range(0, n, size):
            for i, chunk in px.stream_batch(prompts[k : k + size], max_tokens=budget, temperature=0.0):
                if chunk.token is not None:
                    out[k + i].append(chunk.token)
        return n / (now() - t) * 3600, out

    caption(min(8, n), 2)  # warm-up
    res: dict[str, Any] = {"images": n, "edge": edge, "tokens": tokens, "prompt_tokens": [len(p) for p in prompts]}
    res["batch_1_images_per_hour"], one = caption(1)
    res["batch_8_images_per_hour"], eight = caption(8)
    res["batch_same_tokens"] = one == eight
    log(f"captions: batch 1 {res['batch_1_images_per_hour']:.0f}, batch 8 {res['batch_8_images_per_hour']:.0f} img/h")

    def serve(clients: int) -> tuple[float, float]:
        options = Options(max_tokens=tokens, temperature=0.0)
        turns = []
        for i in range(clients):
            prompt = px.encode([{"role": "user", "content": f"{DECODE_PROMPT} Chapter {i + 1}."}])
            turns.append((0, px.plan_turn(prompt, px.new_cache(), options)))
        mx.synchronize()
        t = now()
        count, after, started, decode_t = 0, 0, set(), None
        for i, chunk in batching.run(px, turns):
            if chunk.token is None:
                continue
            count += 1
            if decode_t is None:
                started.add(i)
                if len(started) == clients:
                    decode_t = now()
            else:
                after += 1
        end = now()
        return count / (end - t), after / (end - decode_t)

    serve(1)  # warm-up: the first calls at one row and at four
    serve(4)
    runs: dict[int, list[tuple[float, float]]] = {1: [], 4: []}
    for _ in range(3):  # alternated, best of each (as `alternate`: the least disturbed on a shared machine)
        for clients in runs:
            runs[clients].append(serve(clients))
    res["server_samples"] = {str(c): v for c, v in runs.items()}
    res["server_1_client_tps"] = max(t for t, _ in runs[1])
    res["server_1_client_decode_tps"] = max(d for _, d in runs[1])
    res["server_4_clients_tps"] = max(t for t, _ in runs[4])
    res["server_4_clients_decode_tps"] = max(d for _, d in runs[4])
    log(
        f"server: 1 client {res['server_1_client_tps']:.2f}, 4 clients {res['server_4_clients_tps']:.2f} tok/s; "
        f"decode steps only {res['server_1_client_decode_tps']:.2f} and {res['server_4_clients_decode_tps']:.2f}"
    )
    return res


def job_group(spec: dict, log: Callable[[str], None]) -> dict:
    """Several jobs in one process (the smoke test: saves the imports; RSS is then shared)."""
    return {"results": [timed_job(sub, log) for sub in spec["jobs"]]}


JOBS = {
    "ours": job_ours,
    "vlm": job_vlm,
    "convert": job_convert,
    "bandwidth": job_bandwidth,
    "peak": job_peak,
    "batch": job_batch,
    "group": job_group,
}


def timed_job(spec: dict, log: Callable[[str], None]) -> dict:
    """The result of job `spec` (or the error it raised, its traceback printed) with its wall time."""
    t = now()
    try:
        result = JOBS[spec["kind"]](spec, log)
    except Exception as e:
        traceback.print_exc()
        result = {"error": f"{type(e).__name__}: {e}"}
    result["job_wall_s"] = now() - t
    return result


def main() -> int:
    spec = json.loads(Path(sys.argv[1]).read_text())
    label = spec.get("label", spec["kind"])

    def log(line: str) -> None:
        print(f"  [{label}] {line}", file=sys.stderr, flush=True)

    result = timed_job(spec, log)
    result.setdefault("peak_rss_bytes_at_exit", peak_rss_bytes())
    Path(sys.argv[2]).write_text(json.dumps(result, indent=1))
    return 0 if "error" not in result else 1


if __name__ == "__main__":
    sys.exit(main())
