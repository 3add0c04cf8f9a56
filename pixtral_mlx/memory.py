"""The memory plan: before a turn runs, what it will need against what the machine has.

The terms, from the model's config and dtypes and the encoded prompt (token count, image grids):

- weights: the loaded parameters (already resident);
- KV cache: prompt + max_tokens positions (allocated in mlx-lm's steps of 256) at the chosen KV bits;
- vision features: the ones kept for reuse plus the new images';
- the larger of two transient peaks, which never overlap: the vision encoder over the new images
  (attention materialized per image where the backend has no fused kernel; on CPU one block of queries at a
  time) and the prefill (input embeddings of the new tokens, one chunk's activations through a layer, its
  attention scores (on CPU, one block of queries'), and on CPU the dequantized weights of the largest quantized
  layer).

The machine's limit is Metal's recommended working set (`mx.device_info()`), or on the CPU backend the
available RAM (`MemAvailable`) plus what MLX already holds. `PIXTRAL_MLX_MEMORY_LIMIT` overrides it
(a number of GB, or `off`). Over the limit, `Pixtral.plan_turn` refuses the turn before any work.

One module on purpose, though over 300 lines: it is one estimate (`estimate` -> `MemoryPlan`) and its terms;
every other function computes one term, reads the limit it is held against, or reads plans (`batch_groups`,
`suggestions`), and apart they would spread one formula over several files.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

from .errors import MemoryPlanError

GB = 1e9
KV_STEP = 256  # mlx-lm's KVCache/QuantizedKVCache grow in steps of this many positions
PREFILL_STEP = 2048  # mlx-lm's prefill chunk (its generate.PREFILL_STEP); the one value the turn path uses
SCORES_BUDGET = 1 << 30  # most bytes of materialized attention scores per prefill chunk (the chunk shrinks)
MIN_PREFILL_STEP = 64
SCORE_COPIES = 1  # unfused attention: the scores array (masking and softmax reuse its buffer; measured)
# The CPU's blocked attention, copies of one block's scores alive at once (measured on the tiny test model with
# a 1024² image, blocks of 512 and 1,024 rows): a prompt chunk's (mask array) ~1.3, the vision tower's ~3.6.
BLOCK_SCORE_COPIES = 2
VISION_BLOCK_SCORE_COPIES = 4
# New images go through the vision encoder together up to this many patches (a 1024² image is 4096): many small
# images share one call (1.8x faster for 8 x 128² on CPU), large ones go alone (one call for 2 x 1024² was slower
# there, and holds twice the activations). See benchmarks/experiments.py vision. A prompt's images are grouped so
# (`pipeline._vision_groups`), and so are the rows of a batch (`patch_groups`, `batch_bytes`).
VISION_BATCH_PATCHES = 4096
# A batched decode step holds each row's float32 logits about 4 times over (the logits, the log-softmax and its
# temporaries; measured on the tiny model: 3 rows of 131,072 entries, 5.8 MB above the rest of the plan).
BATCH_LOGIT_COPIES = 4
LIMIT_ENV = "PIXTRAL_MLX_MEMORY_LIMIT"


def dtype_bytes(dtype: Any) -> int:
    return int(dtype.size)


def kv_bytes_per_token(
    n_layers: int, n_kv_heads: int, head_dim: int, dtype_size: int, kv_bits: int | None, group_size: int = 64
) -> float:
    """Bytes one position costs across all layers, keys and values: `dtype_size` per element unquantized;
    quantized, `kv_bits`/8 per element plus a scale and a bias (in the compute dtype) per group."""
    per_element = dtype_size if kv_bits is None else kv_bits / 8 + 2 * dtype_size / group_size
    return 2 * n_layers * n_kv_heads * head_dim * per_element


def kv_allocated(tokens: int) -> int:
    """Positions a cache holding `tokens` has allocated (mlx-lm grows it in steps of 256)."""
    return -(-tokens // KV_STEP) * KV_STEP


def largest_chunk(n_new: int, keep: int, step: int) -> tuple[int, int]:
    """(queries, keys) of the prefill chunk with the most attention scores: mlx-lm prefills all but the
    last token in chunks of `step` after the `keep` cached ones, then the last token."""
    body = max(n_new - 1, 0)
    if body == 0:
        return 1, keep + n_new
    full = body // step
    best = (step, keep + full * step) if full else (0, 0)
    rest = body - full * step
    if rest and rest * (keep + body) > best[0] * best[1]:
        best = (rest, keep + body)
    return best


def prefill_step(heads: int, total: int, dtype_size: int, materialized: bool, budget: int = SCORES_BUDGET) -> int:
    """The prefill chunk: mlx-lm's 2048 tokens, smaller where unfused attention would materialize more than
    `budget` bytes of scores against `total` keys."""
    if not materialized:
        return PREFILL_STEP
    per_query = heads * max(total, 1) * dtype_size * SCORE_COPIES
    step = min(budget, SCORES_BUDGET) // per_query
    return int(max(MIN_PREFILL_STEP, min(PREFILL_STEP, step)))


@dataclass
class MemoryPlan:
    """What a turn needs (bytes), term by term, and what the machine has."""

    image_tokens: list[tuple[str, int]]  # (name, tokens) of each image in the prompt
    prompt_tokens: int  # the whole prompt
    new_tokens: int  # what this turn prefills (the rest is reused from the cache)
    max_tokens: int
    kv_bits: int | None
    kv_group_size: int
    kv_per_token: float
    weights: int
    kv: int
    features: int
    vision: int
    prefill: int
    prefill_step: int
    limit: int | None  # None: the check is off
    limit_source: str
    device: str = ""
    notes: list[str] = field(default_factory=list)
    context_length: int = 0  # the limit in use (prompt + reply)
    trained_context_length: int = 0  # the window the model was trained on
    # Prefilled together with other prompts (`generate.prefill_many`, CPU): one whole decoder layer's weights in
    # float32 at once, and this prompt's hidden states into and out of a layer while the others go through it.
    layer_dequant: int = 0
    batch_hidden: int = 0
    # One batched decode step's float32 logits for this row, with their log-softmax and its temporaries
    # (BATCH_LOGIT_COPIES): a batch holds every row's at once.
    logits: int = 0
    vision_patches: int = 0  # the patches of this turn's new images (what `vision` encodes)

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.max_tokens

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.features + max(self.vision, self.prefill)

    @property
    def fits(self) -> bool:
        return self.limit is None or self.total <= self.limit

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "total_tokens": self.total_tokens, "total": self.total, "fits": self.fits}

    def lines(self) -> list[str]:
        """The plan for people: tokens, each memory term, the total against the machine's limit."""
        kv = "bf16/fp32" if self.kv_bits is None else f"{self.kv_bits}-bit, group {self.kv_group_size}"
        out = [f"image {i + 1} ({name}): {n:,} tokens" for i, (name, n) in enumerate(self.image_tokens)]
        out += [
            f"prompt: {self.prompt_tokens:,} tokens ({self.new_tokens:,} to prefill) + up to {self.max_tokens:,} "
            f"generated = {self.total_tokens:,} tokens",
            f"context:          {self.context_length:,} tokens"
            + (
                " (the model's trained window)"
                if self.context_length == self.trained_context_length
                else f" (trained on {self.trained_context_length:,})"
            ),
            f"weights:          {self.weights / GB:8.3f} GB",
            f"KV cache:         {self.kv / GB:8.3f} GB  ({kv}: {self.kv_per_token / 1024:.1f} KB per token)",
            f"vision features:  {self.features / GB:8.3f} GB",
            f"vision encoder:   {self.vision / GB:8.3f} GB  (peak, transient)",
            f"prefill:          {self.prefill / GB:8.3f} GB  (peak, transient; chunks of {self.prefill_step:,})",
            f"total:            {self.total / GB:8.3f} GB",
        ]
        if self.limit is None:
            out.append(f"limit:            none ({self.limit_source})")
        else:
            verdict = "fits" if self.fits else "does NOT fit"
            out.append(f"limit:            {self.limit / GB:8.3f} GB  ({self.limit_source}): {verdict}")
        return out

    def summary(self) -> str:
        """One line for a status bar."""
        limit = "" if self.limit is None else f"/{self.limit / GB:.1f}"
        return f"mem {self.total / GB:.1f}{limit} GB (KV {self.kv / GB:.2f})"

    def refusal(self, suggestions: list[str]) -> MemoryPlanError:
        terms = (
            f"weights {self.weights / GB:.1f}, KV cache {self.kv / GB:.1f} for {self.total_tokens:,} tokens, "
            f"images and prefill {(self.features + max(self.vision, self.prefill)) / GB:.1f}"
        )
        hint = ", ".join(suggestions[:-1]) + f" or {suggestions[-1]}" if len(suggestions) > 1 else "".join(suggestions)
        hint = hint or "use a smaller model or a machine with more memory"
        return MemoryPlanError(
            f"this turn would need about {self.total / GB:.1f} GB ({terms}) but {self.limit_source} is "
            f"{(self.limit or 0) / GB:.1f} GB; {hint}."
        )


# The machine ---------------------------------------------------------------------------------------
def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def limit_setting() -> int | None:
    """PIXTRAL_MLX_MEMORY_LIMIT in bytes: None when unset, 0 for 'off'. A value that is not a positive, finite
    number of GB is a `MemoryPlanError` naming the variable (`pixtral_mlx.load` checks it before loading)."""
    import math

    setting = os.environ.get(LIMIT_ENV, "").strip()
    if not setting:
        return None
    if setting.lower() in ("off", "none", "0"):
        return 0
    try:
        gb = float(setting)
    except ValueError:
        gb = math.nan
    if not (math.isfinite(gb) and 0 < gb < 1e9):  # 1e9 GB: an exabyte, beyond any machine
        raise MemoryPlanError(
            f"{LIMIT_ENV} must be a number of GB or 'off' (a positive, finite number such as 24), got {setting!r}."
        )
    return int(gb * GB)


def machine_limit() -> tuple[int | None, str]:
    """(bytes this process may use in all, where the figure comes from); (None, why) when unchecked."""
    import mlx.core as mx

    from .backend import on_cpu

    setting = limit_setting()
    if setting is not None:
        return (None, f"{LIMIT_ENV}=off") if setting == 0 else (setting, f"the limit {LIMIT_ENV} sets")
    if not on_cpu():
        size = mx.device_info().get("max_recommended_working_set_size")
        if size:
            return int(size), "Metal's recommended working set"
    available = _mem_available()
    if available is None:
        return None, "unknown available memory"
    return available + mx.get_active_memory() + mx.get_cache_memory(), "the available RAM"


# The estimate --------------------------------------------------------------------------------------
def _largest_quantized(model: Any, rows: int | None = None) -> int:
    """Elements of the largest weight matrix a prompt chunk of `rows` rows dequantizes or widens (0 when none)."""
    from .cpu import dequantized_sizes

    return max(dequantized_sizes(model, rows), default=0)


def weights_bytes(model: Any) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def estimate(
    pixtral: Any,
    prompt: Any,
    *,
    keep: int,
    max_tokens: int,
    kv_bits: int | None,
    kv_group_size: int,
    cache_bytes: int = 0,
) -> MemoryPlan:
    """The plan for prefilling `prompt.tokens[keep:]` (the first `keep` already in a cache of `cache_bytes`)
    and generating up to `max_tokens`."""
    from .backend import device_name, on_cpu
    from .cpu import (
        BLOCKED_DECODER_ATTENTION,
        DEQUANT_MIN_TOKENS,
        PROMPT_ATTENTION_MIN,
        attention_block,
        dequantized_sizes,
        fused_attention,
    )

    model = pixtral.model
    t, v = pixtral.args.text, pixtral.args.vision
    a = dtype_bytes(model.language_model.model.norm.weight.dtype)  # activations, KV and features
    cpu = on_cpu()
    materialized = cpu or kv_bits is not None  # no fused attention kernel: scores are arrays

    n_prompt, n_new = len(prompt.tokens), len(prompt.tokens) - keep
    total = n_prompt + max_tokens
    per_token = kv_bytes_per_token(t.num_hidden_layers, t.num_key_value_heads, t.head_dim, a, kv_bits, kv_group_size)
    kv = max(int(per_token * kv_allocated(total)), cache_bytes)

    # Vision: only the images whose features are not cached, all in one call.
    held = pixtral.features.nbytes
    img_tokens = int(sum(1 for tok in prompt.tokens[keep:] if tok == pixtral.args.image_token_id))
    new_images = list({img.digest: img for img in prompt.images if img.digest not in pixtral.features}.values())
    patches = [img.patches for img in new_images]  # what the vision encoder sees (before any merging)
    n_patch = sum(patches)
    pixels = sum(img.pixels.nbytes for img in new_images)
    # CPU: per image, in blocks of queries (`cpu.blocked_attention`)
    vision_scores = max((p * attention_block(v.num_attention_heads, p, a) for p in patches), default=0)
    vision_scores *= v.num_attention_heads * a * VISION_BLOCK_SCORE_COPIES
    act_dtype = model.language_model.model.norm.weight.dtype
    if not cpu or fused_attention(v.head_dim, act_dtype):
        vision_scores = 0  # Metal's fused attention kernel, or the CPU extension's
    vision = pixels + n_patch * (6 * v.hidden_size + 3 * v.intermediate_size + 3 * t.hidden_size) * a
    vision += vision_scores if n_patch else 0
    features = held + sum(img.grid[0] * img.grid[1] for img in new_images) * t.hidden_size * a  # one per [IMG]

    # Prefill: the embeddings of every new token (built at once: token rows, gathered features, merged),
    # then chunks through one layer at a time; where the scores are arrays, the chunk shrinks to leave
    # room (half of what is left) on a machine that is short of it.
    weights = weights_bytes(model)
    limit, source = machine_limit()
    logits = 3 * t.vocab_size * 4
    dequant = 3 * 4 * _largest_quantized(model, n_new) if cpu and n_new > DEQUANT_MIN_TOKENS else 0
    budget = SCORES_BUDGET
    if limit is not None:
        budget = max(limit - weights - kv - features - n_new * t.hidden_size * a - logits - dequant, 0) // 2
    # CPU, a decoder with the blocked prompt attention and no KV quantization: a chunk's attention goes in
    # blocks of queries (`cpu.blocked_attention`), so its scores do not grow with the chunk, which keeps its size
    layers = model.language_model.model.layers
    blocked = cpu and kv_bits is None and bool(layers) and isinstance(layers[0].self_attn, BLOCKED_DECODER_ATTENTION)
    step = prefill_step(t.num_attention_heads, total, a, materialized and not blocked, budget)
    chunk, keys = largest_chunk(n_new, keep, step)
    rows = chunk
    if blocked and chunk >= PROMPT_ATTENTION_MIN:
        rows = min(chunk, attention_block(t.num_attention_heads, keys, a))
    embed = 3 * n_new * t.hidden_size * a if img_tokens else 2 * n_new * t.hidden_size * a
    q_width, kv_width = t.num_attention_heads * t.head_dim, t.num_key_value_heads * t.head_dim
    layer = chunk * (5 * t.hidden_size + 2 * q_width + 4 * kv_width + 3 * t.intermediate_size) * a
    copies = BLOCK_SCORE_COPIES if blocked and chunk >= PROMPT_ATTENTION_MIN else SCORE_COPIES
    scores = t.num_attention_heads * rows * keys * a * copies if materialized else 0
    if blocked and chunk >= PROMPT_ATTENTION_MIN and fused_attention(t.head_dim, act_dtype):
        scores = 0  # the CPU extension's fused attention holds no scores
    prefill = n_new * t.hidden_size * a + max(embed - n_new * t.hidden_size * a, layer + scores + dequant) + logits
    layer_dequant = 4 * sum(dequantized_sizes(layers[0], n_new)) if cpu and layers and n_new > DEQUANT_MIN_TOKENS else 0
    names = [(img.name, img.n_tokens) for img in prompt.images]
    return MemoryPlan(
        image_tokens=names,
        prompt_tokens=n_prompt,
        new_tokens=n_new,
        max_tokens=max_tokens,
        kv_bits=kv_bits,
        kv_group_size=kv_group_size,
        kv_per_token=per_token,
        weights=weights,
        kv=kv,
        features=features,
        vision=int(vision),
        prefill=int(prefill),
        prefill_step=step,
        limit=limit,
        limit_source=source,
        device=device_name(model),
        context_length=pixtral.context_length,
        trained_context_length=pixtral.trained_context_length,
        layer_dequant=layer_dequant,
        batch_hidden=3 * n_new * t.hidden_size * a,
        logits=BATCH_LOGIT_COPIES * t.vocab_size * 4,
        vision_patches=n_patch,
    )


def patch_groups(patches: list[int]) -> list[list[int]]:
    """Indices of consecutive items (images, or a batch's rows by their new images) in groups of at most
    VISION_BATCH_PATCHES patches each; an item larger than that is a group of its own."""
    groups: list[list[int]] = []
    size = 0
    for i, n in enumerate(patches):
        if not groups or size + n > VISION_BATCH_PATCHES:
            groups.append([])
            size = 0
        groups[-1].append(i)
        size += n
    return groups


def batch_bytes(plans: list[MemoryPlan], held: int) -> int:
    """Bytes a batched decode of these rows needs, from each row's own plan: the weights once; every row's
    prefilled cache, then all of them copied into the batch cache (padded to the longest prompt), which grows
    in steps of 256 positions as it decodes; the `held` vision features plus every row's new ones; and the
    largest transient peak: the new images go through the vision encoder (consecutive rows' images in one call up
    to VISION_BATCH_PATCHES patches, `patch_groups`: `Pixtral.encode_rows`), then rows are prefilled together
    (`generate.prefill_many`), which on the CPU holds one layer's dequantized weights (none where 4-bit products
    run from the codes) and every row's hidden states at that layer, or a decode step's logits for every row."""
    rows, longest = len(plans), max(p.prompt_tokens for p in plans)
    prefilled = sum(kv_allocated(p.prompt_tokens) for p in plans)
    decoded = rows * (longest + max(kv_allocated(p.max_tokens) for p in plans))
    kv = plans[0].kv_per_token * max(prefilled + rows * longest, decoded)
    features = held + sum(p.features - held for p in plans)
    vision = max(sum(plans[i].vision for i in group) for group in patch_groups([p.vision_patches for p in plans]))
    peak = max(vision, max(p.prefill for p in plans))
    if rows > 1:
        together = max(p.prefill for p in plans) + max(p.layer_dequant for p in plans)
        peak = max(peak, together + sum(p.batch_hidden for p in plans), sum(p.logits for p in plans))
    return int(plans[0].weights + kv + features + peak)


def batch_groups(plans: list[MemoryPlan], held: int) -> list[list[int]]:
    """The rows (indices of `plans`, each of which fits alone) in as few consecutive groups as fit together."""
    groups: list[list[int]] = []
    for i, plan in enumerate(plans):
        if groups and (plan.limit is None or batch_bytes([plans[j] for j in groups[-1]] + [plan], held) <= plan.limit):
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def suggestions(plan: MemoryPlan, replan: Any) -> list[str]:
    """What would make the turn fit: a smaller KV cache first (checked), then fewer or smaller images."""
    from .errors import PixtralError

    out = []
    for bits in (8, 4):
        if plan.kv_bits is not None and bits >= plan.kv_bits:
            continue
        try:
            if replan(bits).fits:
                out.append(f"{'an' if bits == 8 else 'a'} {bits}-bit KV cache would fit (kv_bits={bits})")
                break
        except PixtralError:  # a group size this model's heads cannot use
            break
    if plan.image_tokens:
        out.append("use smaller or fewer images (max_edge=512)")
    out.append("start a new conversation" if plan.new_tokens < plan.prompt_tokens else "shorten the prompt")
    return out
