"""`pixtral-mlx caption PATH...`: the run. `main` checks the flags (`caption.cli`), lists the work on rank 0
(`caption.sources`, resumed from `caption.outputs`), and captions it batch by batch, writing each record as
its image finishes (on several processes, through rank 0: `caption.group`).

Batches: `Pixtral.stream_batch` decodes `--batch-size` images together (at temperature 0, exactly the text
one image at a time gives), fewer where the memory plan says the batch would not fit; an image whose own
plan does not fit fails with the plan's sentence, as a single turn would.
"""

from __future__ import annotations

import argparse
import signal
import sys
from collections.abc import Callable, Iterator
from typing import Any

from pixtral_mlx.caption.cli import DEFAULT_PROMPT, build_parser, check_args
from pixtral_mlx.caption.errors import OutputError, RecordError, UsageError, os_message
from pixtral_mlx.caption.group import Group
from pixtral_mlx.caption.outputs import JsonlOutput, SidecarOutput, StdoutOutput
from pixtral_mlx.caption.progress import Progress, Stop
from pixtral_mlx.caption.sources import list_images, sidecar_images
from pixtral_mlx.cli import check_model_args, check_structured_args, error, flag_message, info

__all__ = ["DEFAULT_PROMPT", "main"]  # the command, and the prompt it uses unless given one


def main(argv: list[str] | None = None) -> int:
    """`pixtral-mlx caption ARGS...`; the exit status (0 all captioned, 1 any failed or skipped, 2 usage)."""
    args = build_parser().parse_args(argv)
    from pixtral_mlx.errors import PixtralError

    try:
        args.options = check_model_args(args).merge(**check_structured_args(args))
        check_args(args)
    except (PixtralError, UsageError) as e:
        error(str(e))
        return 2

    import pixtral_mlx  # before MLX: it chooses the BLAS

    group = Group()
    output, work, total, skipped, unusable = None, [], 0, 0, 0
    status: dict[str, Any] = {}
    if group.rank == 0:
        try:
            output, work, total, skipped, unusable = _plan(args)
        except UsageError as e:
            status = {"error": str(e), "code": 2}
        except OutputError as e:
            status = {"error": str(e), "code": 1}
    plan = group.gather({"work": work, "status": status})[0] if group.size > 1 else {"work": work, "status": status}
    if plan["status"]:
        if group.rank == 0:
            error(plan["status"]["error"])
        return plan["status"]["code"]
    work = [tuple(w) for w in plan["work"]]
    try:
        return _run(args, group, output, work, (total, skipped, unusable), pixtral_mlx)
    finally:
        if output is not None:
            output.close()


def _plan(args: argparse.Namespace) -> tuple[Any, list[tuple[str, str, str | None]], int, int, int]:
    """Rank 0's work list: the output, the (image, prompt, error) triples still to do, the total, the images
    already done and the inputs that cannot be used (each reported on stderr)."""
    images, unusable = list_images(args.paths, args.files_from)
    template = args.template
    if args.sidecar:
        images, no_sidecar = sidecar_images(images, args.ext)
        unusable += no_sidecar
        output: Any = SidecarOutput(args.ext, args.overwrite)
    elif args.output and args.output != "-":
        output = JsonlOutput(args.output, args.overwrite)
    else:
        output = StdoutOutput()
    # Error records are retried; --overwrite redoes everything listed.
    output.forget({i for i in images if args.overwrite or not output.done(i)})
    todo = [i for i in images if args.overwrite or not output.done(i)]
    work = []  # (image, prompt, error)
    for image in todo:
        try:
            work.append((image, template.render(image), None))
        except OSError as e:
            work.append((image, "", f"{image}: its {template.existing_ext} sidecar cannot be read ({os_message(e)})."))
    return output, work, len(images), len(images) - len(todo), unusable


def _summary(failed: int, attempted: int, unusable: int) -> bool:
    """Rank 0's last lines: what failed and what was skipped; whether anything was."""
    if failed:
        print(f"{failed} of {attempted} images failed.", file=sys.stderr)
    if unusable:
        print(f"{unusable} {'input was' if unusable == 1 else 'inputs were'} skipped (see above).", file=sys.stderr)
    return bool(failed or unusable)


def _run(args: argparse.Namespace, group: Group, output: Any, work: list, counts: tuple[int, int, int], px: Any) -> int:
    """`counts`: (images in all, already done, inputs that cannot be used), on rank 0."""
    from pixtral_mlx.errors import PixtralError

    total, skipped, unusable = counts
    mine = list(range(group.rank, len(work), group.size))
    if not work:
        if group.rank == 0 and sys.stderr.isatty():
            print(f"all {total} images already have captions (--overwrite redoes them).", file=sys.stderr)
        bad = group.rank == 0 and _summary(0, 0, unusable)
        return 1 if bad and group.size == 1 else 0
    model, problem = None, None
    try:
        model = px.load(
            args.model,
            progress=info if group.rank == 0 else None,
            context_length=args.context_length,
            default_system_prompt=not args.no_default_system_prompt,
        )
    except PixtralError as e:
        problem = str(e)
    except KeyboardInterrupt:
        problem = "interrupted"
    problems = [p for p in group.gather(problem) if p]
    if problems:
        if group.rank == 0 or group.size == 1:
            error(problems[0]) if problems[0] != "interrupted" else print("interrupted", file=sys.stderr)
        return 130 if problems[0] == "interrupted" else 1

    stop = Stop()
    progress = Progress(total, skipped) if group.rank == 0 else None
    failed = 0
    notes: set[str] = set()

    def emit(record: dict[str, Any]) -> None:
        nonlocal failed
        if "error" not in record:
            try:
                output.write(record)
                return
            except RecordError as e:  # e.g. a sidecar that appeared meanwhile: this image failed
                record = {"image": record["image"], "error": str(e)}
        failed += 1
        progress.say(f"error: {record['error']}")
        output.write(record)

    def note(message: str) -> None:
        if progress and message not in notes:
            notes.add(message)
            progress.say(f"note: {message}")

    rounds = -(-len(range(0, len(work), group.size)) // args.batch_size)
    try:
        for r in range(rounds):
            batch = mine[r * args.batch_size : (r + 1) * args.batch_size]
            single = group.size == 1
            finished: list[tuple[int, dict[str, Any]]] = []
            if not stop.signum:
                for index, record in _caption(model, args, [(i, *work[i]) for i in batch], stop, note):
                    if single:
                        emit(record)
                        progress.add(1)
                    else:
                        finished.append((index, record))
            if not single:
                everyone = group.gather({"records": finished, "stop": stop.signum})
                records = sorted((tuple(x) for part in everyone for x in part["records"]), key=lambda x: x[0])
                if group.rank == 0:
                    for _, record in records:
                        emit(record)
                    progress.add(len(records))
                if any(part["stop"] for part in everyone):
                    stop.signum = stop.signum or next(part["stop"] for part in everyone if part["stop"])
            if stop.signum:
                break
    except OutputError as e:
        if progress:
            progress.close()
        error(str(e))
        return 1
    except KeyboardInterrupt:  # a second signal: stop now (single process; a lone rank cannot wait for the others)
        stop.signum = stop.signum or signal.SIGINT
        group.size = 1
    if progress:
        progress.close()
    if group.size > 1:
        # The ranks wait here until rank 0 has written the last records; only rank 0 reports. mlx.launch
        # stops every rank as soon as one exits with an error and does not pass exit statuses on, so a
        # finished distributed run exits 0 everywhere (its failures are in the output and on stderr).
        group.gather(None)
        if group.rank != 0:
            return 0
    if stop.signum:
        print("interrupted: run the same command again to finish.", file=sys.stderr)
        return stop.code
    bad = _summary(failed, total - skipped, unusable)
    return 1 if bad and group.size == 1 else 0


def _caption(
    model: Any,
    args: argparse.Namespace,
    batch: list[tuple[int, str, str, str | None]],
    stop: Stop,
    note: Callable[[str], None],
) -> Iterator[Any]:
    """(index, record) for each image of `batch` as it finishes: failures first (an image whose own memory
    plan does not fit among them), then the batch's captions. `note(message)` tells the user."""
    from pixtral_mlx.errors import PixtralError
    from pixtral_mlx.generate import check_context
    from pixtral_mlx.images import load_image
    from pixtral_mlx.turn import Reply

    opts = args.options
    ready, prompts, plans = [], [], []
    for index, image, prompt, problem in batch:
        try:
            if problem:
                raise PixtralError(problem)
            img, _ = load_image(image)
            content = [{"type": "image", "image": img, "name": image}, {"type": "text", "text": prompt}]
            messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
                {"role": "user", "content": content}
            ]
            encoded = model.encode(messages, max_edge=opts.max_edge)
            check_context(len(encoded), opts.max_tokens, model.context_length)
            plan = _memory_plan(model, encoded, opts)
        except PixtralError as e:
            said = flag_message(e)  # the library names its parameters; a caption run, its flags
            message = said if image in said else f"{image}: {said}"
            yield index, {"image": image, "error": message}
            continue
        ready.append((index, image))
        prompts.append(encoded)
        plans.append(plan)
    if not prompts or stop.signum:
        return
    from pixtral_mlx.memory import batch_groups

    replies = [Reply() for _ in prompts]
    if len(batch_groups(plans, model.features.nbytes)) > 1:
        note("a batch would not fit in memory as a whole; its images are decoded in smaller groups.")
    steps = model.stream_batch(prompts, opts)  # batched, in groups that fit, or one by one where it must be
    try:
        for i, chunk in steps:
            replies[i].add(chunk)
            if chunk.finish_reason is not None:
                index, image = ready[i]
                text = args.prefix + replies[i].text.strip() + args.suffix
                yield (
                    index,
                    {
                        "image": image,
                        "text": text,
                        "prompt_tokens": replies[i].prompt_tokens,
                        "generation_tokens": replies[i].generation_tokens,
                        "finish_reason": replies[i].finish_reason,
                    },
                )
            if stop.signum:
                return
    finally:
        steps.close()


def _memory_plan(model: Any, prompt: Any, opts: Any) -> Any:
    """The plan of captioning `prompt` alone, which `Pixtral.stream` checks too; over the machine's limit it
    raises the same refusal (`MemoryPlanError`, one sentence with what would fit)."""
    from pixtral_mlx.memory import suggestions

    def plan(bits: int | None) -> Any:
        return model.memory_plan(prompt, opts, kv_bits=bits)

    alone = plan(opts.kv_bits)
    if not alone.fits:
        raise alone.refusal(suggestions(alone, plan))
    return alone
