"""The images a caption run is given: files, folders (recursive, image files only, hidden entries skipped) and
`--files-from` lists, as one sorted list without duplicates.

An image's key is its path as given or found, normalized (`os.path.normpath`), never resolved: it is what
the records hold and what a resumed run matches. Inputs that cannot be used (an unreadable folder, a sidecar
path that is not a regular file) are reported one `skipped:` line each and counted, so that they make the
exit status 1; they are never silently passed over."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from pixtral_mlx.caption.errors import UsageError, os_message

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}


def is_url(s: str) -> bool:
    return "://" in s or s.startswith("data:")


def skip(message: str) -> None:
    """One `skipped:` line on stderr: an input that cannot be used."""
    print(f"skipped: {message}", file=sys.stderr, flush=True)


def list_images(paths: list[str], files_from: str | None) -> tuple[list[str], int]:
    """The images of the PATH arguments and the `--files-from` list, and how many inputs cannot be used (each
    reported here). No paths, or no image among them, is a `UsageError`."""
    paths = list(paths)
    if files_from:
        paths += read_list(files_from)
    if not paths:
        raise UsageError("give image files or folders (or --files-from LIST).")
    images, unreadable = find_images(paths)
    for message in unreadable:
        skip(message)
    if not images:
        raise UsageError("no image files found in " + ", ".join(paths) + ".")
    return images, len(unreadable)


def find_images(paths: list[str]) -> tuple[list[str], list[str]]:
    """Every image under `paths` (folders recursively, image suffixes only, hidden entries skipped), sorted,
    each once, and a sentence for each folder that could not be read. Paths that are not folders are kept
    as given: a missing or unreadable one becomes an error record, not a failed run."""
    found: set[str] = set()
    unreadable: list[str] = []

    def cannot_read(e: OSError) -> None:
        folder = os.path.normpath(e.filename) if e.filename else "a folder"
        unreadable.append(f"{folder}: the folder cannot be read ({os_message(e)}).")

    for given in paths:
        if not is_url(given) and os.path.isdir(given):
            for root, dirs, files in os.walk(given, onerror=cannot_read):
                dirs[:] = [d for d in dirs if not d.startswith(".")]
                for f in files:
                    if not f.startswith(".") and os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES:
                        found.add(os.path.normpath(os.path.join(root, f)))
        else:
            found.add(given if is_url(given) else os.path.normpath(given))
    return sorted(found), unreadable


def read_list(source: str) -> list[str]:
    """The paths of a list, one a line (blank lines and # comments skipped); a NUL byte refuses the list."""
    try:
        text = sys.stdin.read() if source == "-" else Path(source).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"--files-from {source} cannot be read ({getattr(e, 'strerror', None) or e}).") from None
    paths = []
    for n, line in enumerate(text.split("\n"), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "\0" in line:
            raise UsageError(f"line {n} of --files-from {source} holds a NUL byte; give one path a line.")
        paths.append(line)
    return paths


def sidecar_path(image: str, ext: str) -> Path:
    """The text file next to `image` with its stem and `ext` (`a.png` -> `a.txt`)."""
    p = Path(image)
    return p.with_name(p.stem + ext)


def sidecar_images(images: list[str], ext: str) -> tuple[list[str], int]:
    """The images whose sidecar can be written, and how many cannot (their sidecar path is there but is not a
    regular file; each reported here). A URL, or two images that would share a sidecar, is a `UsageError`."""
    urls = [i for i in images if is_url(i)]
    if urls:
        raise UsageError(f"--sidecar writes next to local files; {urls[0][:60]} is a URL (use --output).")
    owners: dict[Path, str] = {}
    usable, unusable = [], 0
    for image in images:
        target = sidecar_path(image, ext)
        if target in owners:
            raise UsageError(
                f"{owners[target]} and {image} would share the sidecar {target}; use --output or rename one."
            )
        owners[target] = image
        if os.path.lexists(target) and not target.is_file():
            skip(f"{image}: its sidecar {target} is there but is not a regular file.")
            unusable += 1
        else:
            usable.append(image)
    return usable, unusable
