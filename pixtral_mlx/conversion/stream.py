"""The conversion itself: plan and check every tensor, then stream them into the output shards.

Each tensor (or a block of its rows) is read, renamed, dequantized (FP8 with its scales), permuted, cast,
quantized and appended to its shard before the next one is read, so memory stays near one block, not the
checkpoint. Names, shapes and transforms come from the source's model family (`Source.weights`: Pixtral's or
Mistral3's weight map).
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
from tqdm import tqdm

from pixtral_mlx.config import bundled_tekken
from pixtral_mlx.conversion import fp8
from pixtral_mlx.conversion.output import atomic_folder, check_output
from pixtral_mlx.conversion.quantize import QuantSpec
from pixtral_mlx.conversion.quantize import quantize as quantize_block
from pixtral_mlx.conversion.save import (
    MAX_SHARD_BYTES,
    ST_DTYPE,
    Planned,
    ShardedWriter,
    plan_shards,
    write_config,
    write_index,
)
from pixtral_mlx.conversion.source import Source, download, is_repo_id, open_source
from pixtral_mlx.errors import ConversionError
from pixtral_mlx.hub import short_name
from pixtral_mlx.models.pixtral.weights import Target
from pixtral_mlx.prompt import SYSTEM_PROMPT_FILE

LM_HEAD = "language_model.lm_head.weight"

DTYPES = {"bfloat16": mx.bfloat16, "float16": mx.float16, "float32": mx.float32}
CHUNK_BYTES = 64 << 20  # source bytes per block of rows: bounds memory whatever the tensor size


@dataclass
class Job:
    """One source tensor and the output tensors it becomes."""

    name: str
    target: Target
    outputs: list[Planned]  # [weight] or [weight (packed), scales, biases]
    scale: str | None = None  # the FP8 weight's scale (source name)


def convert(
    source: str | Path,
    output: str | Path,
    *,
    dtype: str = "bfloat16",
    quantize: bool = False,
    bits: int = 4,
    group_size: int = 64,
    quantize_vision: bool = False,
    force: bool = False,
    progress: bool = True,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> Path:
    """Convert a checkpoint folder or Hugging Face repo id into an MLX checkpoint folder.

    Args:
        source: a local folder (official or Hugging Face layout) or a repo id such as
            "mistralai/Pixtral-12B-2409".
        output: the folder to create; it must not exist unless `force` is set. Another conversion
            writing to the same folder at the same time is refused (ConversionError).
        dtype: "bfloat16", "float16" or "float32" for every float tensor (and the scales).
        quantize: quantize the decoder matrices (affine, `bits` bits, groups of `group_size`).
        quantize_vision: with `quantize`, also quantize the vision tower and adapter linears.
        progress: print [INFO] lines and a progress bar on stderr.

    Returns:
        The output folder.

    Raises:
        ConversionError: a bad source or argument, in one sentence.
        FileExistsError: `output` exists and `force` is not set, or it is not a previous conversion
            (`force` replaces only those, never a folder holding anything else).
        KeyboardInterrupt: Ctrl-C, or SIGTERM (`Terminated`); the output is then as it was before.
    """
    if dtype not in DTYPES:
        raise ConversionError(f"dtype {dtype!r} is not supported: use one of {', '.join(DTYPES)}")
    if quantize and (bits not in (2, 3, 4, 5, 6, 8) or group_size not in (32, 64, 128)):
        raise ConversionError(
            f"cannot quantize to {bits} bits in groups of {group_size}: "
            "bits must be 2, 3, 4, 5, 6 or 8 and the group size 32, 64 or 128"
        )
    output = Path(output).absolute()
    if not Path(source).expanduser().exists() and (repo := short_name(str(source))):
        source = repo  # a family short name (`ministral-3-8b`): its official repo, as --model takes it
    if not is_repo_id(str(source)):
        _check_overlap(output, Path(source))
    check_output(output, force)  # before a possibly long download; checked again with the output locked
    path = download(str(source)) if is_repo_id(str(source)) else Path(source)
    src = open_source(path)
    try:
        spec = QuantSpec(bits, group_size, quantize_vision) if quantize else None
        jobs, skipped = plan(src, DTYPES[dtype], spec)
        _check_output(output, path, sum(p.nbytes for j in jobs for p in j.outputs))
        shards = plan_shards([p for j in jobs for p in j.outputs], max_shard_bytes)
        src.args.quantization = spec.config(skipped) if spec else None
        size = _gb(sum(info.nbytes for info in src.tensors.values()))
        _log(
            progress,
            f"[INFO] Converting {len(jobs)} tensors ({size} GB, {src.format} layout) "
            f"from {path} to {dtype}" + (f", {bits}-bit" if spec else ""),
        )
        with atomic_folder(output, force, log=lambda line: _log(progress, line)) as tmp:
            _write_tensors(src, jobs, tmp, shards, DTYPES[dtype], spec, progress)
            write_index(tmp, shards)
            write_config(tmp, src.args.to_config())
            tokenizer = src.tokenizer or bundled_tekken()  # tekken.json, or a SentencePiece file under its name
            shutil.copyfile(tokenizer, tmp / (tokenizer.name if src.tokenizer else "tekken.json"))
            if (path / SYSTEM_PROMPT_FILE).is_file():  # the repo's default system prompt (Mistral Small 3.x ...)
                shutil.copyfile(path / SYSTEM_PROMPT_FILE, tmp / SYSTEM_PROMPT_FILE)
    finally:
        src.close()
    return output


def plan(src: Source, dtype: mx.Dtype, spec: QuantSpec | None) -> tuple[list[Job], list[str]]:
    """Map, check and size every tensor before anything is read or written."""
    weights = src.weights
    expected = weights.expected_shapes(src.args)
    config = "params.json" if src.format == "official" else "config.json"
    jobs: dict[str, Job] = {}
    skipped: list[str] = []
    scales = _fp8_scales(src)
    for name, info in src.tensors.items():
        if fp8.is_unused(name) or name in scales.values():
            continue
        t = weights.target(name, src.format, src.args)
        if t is None:
            raise ConversionError(f"unknown tensor {name!r} in {info.file}: it is not a Pixtral weight")
        if t.key == LM_HEAD and LM_HEAD not in expected and getattr(src.args.text, "tie_word_embeddings", False):
            continue  # an output layer saved beside tied embeddings: the model uses the embeddings
        if info.dtype == fp8.DTYPE and name not in scales:
            raise ConversionError(
                f"FP8 tensor {name!r} in {info.file} has no scale (.qscale_weight or .weight_scale_inv)"
            )
        if t.key not in expected:
            raise ConversionError(f"tensor {name!r} in {info.file} is not part of the model {config} describes")
        if t.key in jobs:
            raise ConversionError(f"tensors {jobs[t.key].name!r} and {name!r} in {src.path} are the same weight")
        shape = _mlx_shape(info.shape, t)
        if shape != expected[t.key]:
            want = list(_source_shape(expected[t.key], t))
            raise ConversionError(
                f"tensor {name!r} in {info.file} has shape {list(info.shape)}, but {config} implies {want}"
            )
        outputs = [Planned(t.key, ST_DTYPE[dtype], shape)]
        stem = t.key.removesuffix(".weight")
        if spec and spec.wants(t.key) and spec.fits(shape):
            packed, groups = spec.shapes(shape)
            outputs = [
                Planned(t.key, "U32", packed),
                Planned(f"{stem}.scales", ST_DTYPE[dtype], groups),
                Planned(f"{stem}.biases", ST_DTYPE[dtype], groups),
            ]
        elif spec and spec.wants(t.key) and len(shape) == 2:
            skipped.append(stem)  # input dim not a multiple of the group size: stays dense
        jobs[t.key] = Job(name, t, outputs, scales.get(name))
    missing = [k for k in expected if k not in jobs]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise ConversionError(
            f"the checkpoint in {src.path} has no tensor for {missing[0]!r}{more}, which {config} implies"
        )
    return list(jobs.values()), skipped


def _fp8_scales(src: Source) -> dict[str, str]:
    """Each scaled weight's source name -> its scale's source name (FP8 checkpoints)."""
    scales: dict[str, str] = {}
    for name, info in src.tensors.items():
        weight = fp8.scaled_weight(name)
        if weight is None:
            continue
        if weight not in src.tensors:
            raise ConversionError(f"scale {name!r} in {info.file} has no weight {weight!r} to scale")
        fp8.check_scale(name, info.shape, src.tensors[weight].shape, src.fp8_block, ConversionError)
        scales[weight] = name
    return scales


def _mlx_shape(shape: tuple[int, ...], t: Target) -> tuple[int, ...]:
    return (shape[0], *shape[2:], shape[1]) if t.conv and len(shape) == 4 else shape


def _source_shape(shape: tuple[int, ...], t: Target) -> tuple[int, ...]:
    return (shape[0], shape[-1], *shape[1:-1]) if t.conv else shape


def _check_overlap(output: Path, source: Path) -> None:
    src = source.resolve()
    if output.resolve() == src or output.resolve() in src.parents:
        raise ConversionError(f"output {output} would replace the source checkpoint: choose another folder")


def _check_output(output: Path, source: Path, nbytes: int) -> None:
    _check_overlap(output, source)
    parent = next(p for p in [output, *output.parents] if p.exists())
    free = shutil.disk_usage(parent).free
    if free < nbytes + (64 << 20):
        raise ConversionError(
            f"not enough disk space for {output}: it needs {_gb(nbytes)} GB and {_gb(free)} GB are free"
        )


def _write_tensors(
    src: Source,
    jobs: list[Job],
    folder: Path,
    shards: list[list[Planned]],
    dtype: mx.Dtype,
    spec: QuantSpec | None,
    progress: bool,
) -> None:
    total = sum(src.tensors[j.name].nbytes for j in jobs)
    with (
        tqdm(
            total=total,
            unit="B",
            unit_scale=True,
            desc="Converting",
            disable=not progress,
            file=sys.stderr,
        ) as bar,
        ShardedWriter(folder, shards) as writer,
    ):
        for i, job in enumerate(jobs):
            bar.set_postfix_str(f"{i + 1}/{len(jobs)} tensors", refresh=False)
            blocks = _blocks(src, job, bar, dtype)
            if len(job.outputs) == 1:
                writer.write(job.target.key, (b.astype(dtype) for b in blocks))
            else:
                assert spec is not None
                _write_quantized(writer, job, blocks, spec, dtype)
        writer.close()
    mx.clear_cache()


def _write_quantized(
    writer: ShardedWriter, job: Job, blocks: Iterator[mx.array], spec: QuantSpec, dtype: mx.Dtype
) -> None:
    """Packed weights go to disk block by block; scales and biases (1/16 of that or less) wait."""
    scales: list[mx.array] = []
    biases: list[mx.array] = []

    def packed() -> Iterator[mx.array]:
        for b in blocks:
            wq, s, z = quantize_block(b, spec, dtype)
            scales.append(s)
            biases.append(z)
            yield wq

    weight, scales_out, biases_out = job.outputs
    writer.write(weight.name, packed())
    writer.write(scales_out.name, [mx.concatenate(scales)])
    writer.write(biases_out.name, [mx.concatenate(biases)])


def _blocks(src: Source, job: Job, bar: tqdm, dtype: mx.Dtype) -> Iterator[mx.array]:
    """The tensor in MLX layout, whole if it needs a transform, else in blocks of rows (FP8: dequantized in
    `dtype`, so it quantizes as that checkpoint in `dtype` would)."""
    info = src.tensors[job.name]
    scale = src.read(job.scale) if job.scale else None

    def read(rows: slice | None = None) -> mx.array:
        w = src.read(job.name, rows)
        if scale is None:
            return w
        return fp8.dequantize(w, scale, src.fp8_block, rows.start if rows else 0).astype(dtype)

    if job.target.permute_heads or job.target.conv or len(info.shape) < 2 or info.shape[0] == 0:
        yield src.weights.transform(read(), job.target)
        bar.update(info.nbytes)
        return
    step = max(1, CHUNK_BYTES // (info.nbytes // info.shape[0] or 1))
    for start in range(0, info.shape[0], step):
        stop = min(start + step, info.shape[0])
        yield read(slice(start, stop))
        bar.update(info.nbytes * (stop - start) // info.shape[0])


def _gb(n: int) -> str:
    return f"{n / 1e9:.2f}"


def _log(enabled: bool, line: str) -> None:
    if enabled:
        print(line, file=sys.stderr, flush=True)
