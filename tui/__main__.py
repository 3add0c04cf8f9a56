"""`pixtral-mlx chat [IMAGE...]`: the terminal chat."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    from pixtral_mlx.cli import add_model_args

    parser = argparse.ArgumentParser(
        prog="pixtral-mlx chat",
        description="Chat with Pixtral in the terminal. Drop or paste image paths into the message "
        "box, "
        "press ctrl+f to pick a file or ctrl+v to paste a clipboard image; F1 lists every key.",
        epilog="Conversations are saved in $PIXTRAL_MLX_DATA (default: the platform's user data folder).",
    )
    parser.add_argument(
        "images",
        nargs="*",
        type=Path,
        metavar="IMAGE",
        help="images to attach to the first message",
    )
    add_model_args(parser)
    parser.add_argument(
        "--resume",
        nargs="?",
        const="latest",
        metavar="ID",
        help="reopen a saved conversation (the latest without an ID)",
    )
    parser.add_argument("--list", action="store_true", help="list saved conversations and exit")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    from pixtral_mlx.errors import PixtralError

    from .storage import StorageError, Store

    store = Store()
    if args.list or args.resume == "latest":
        saved, damaged = store.scan()
        for e in damaged:  # one bad file must not hide the others: name it and go on
            print(f"pixtral-mlx chat: skipped {e.path}: {e.reason}; the file was left as it is.", file=sys.stderr)
    if args.list:
        for s in saved:
            when = s.updated.replace("T", " ")[:16]
            turns = f"{s.turns:>3} turn" + ("s" if s.turns != 1 else " ")
            images = f"{s.images:>2} image" + ("s" if s.images != 1 else " ")
            print(f"{s.id}  {when}  {turns}  {images}  {s.title}")
        return 0
    resume = args.resume
    if resume == "latest":
        if not saved:
            parser.error(f"there are no saved conversations in {store.conversations}.")
        resume = saved[0].id
    elif resume:
        try:
            store.load(resume)  # checked before the model loads: a damaged file fails at once, in one sentence
        except StorageError as e:
            print(f"pixtral-mlx chat: error: {e}", file=sys.stderr)
            return 1
        except PixtralError as e:
            parser.error(f"{e} `pixtral-mlx chat --list` shows the saved conversations.")
    missing = [str(p) for p in args.images if not p.expanduser().is_file()]
    if missing:
        parser.error(f"{missing[0]}: no such file.")
    from pixtral_mlx.cli import check_model_args

    try:
        options = check_model_args(args)  # the one Options value the chat runs with
    except PixtralError as e:
        parser.error(str(e))

    # textual_image asks the terminal about graphics support when imported: before the app starts.
    from .app import make_app
    from .engine import Engine

    engine = Engine(
        args.model,
        system=args.system,
        options=options,
        context_length=args.context_length,
        default_system_prompt=not args.no_default_system_prompt,
    )
    app = make_app(engine, data_dir=store.root, images=list(args.images), resume=resume)
    app.run()
    return int(app.return_code or 0)


if __name__ == "__main__":
    sys.exit(main())
