"""What stops the caption command, or one of its images: each is one sentence for the user, and how it ends
the run decides the exit status (`pixtral_mlx.caption.run`)."""

from __future__ import annotations


class UsageError(Exception):
    """Bad arguments or an output we must not touch: one sentence, exit 2, before any work."""


class OutputError(Exception):
    """The output cannot be opened or written: one sentence, exit 1."""


class RecordError(Exception):
    """One record could not be written (its image counts as failed); the run goes on."""


def os_message(e: OSError) -> str:
    """What went wrong, as the OS says it (`Permission denied`), for the parentheses of a sentence."""
    return e.strerror or str(e)
