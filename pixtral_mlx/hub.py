"""Hugging Face Hub access for the loader and the converter: repo ids, downloads and their messages.

huggingface-hub does the work (cache, resumable downloads, auth for gated repos); this module only
chooses the files and turns its exceptions into one sentence that says what to do.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from pixtral_mlx.catalog import repo_for

from .errors import ModelError, PixtralError

_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")
LOGIN = "`hf auth login` (or set HF_TOKEN)"


OFFICIAL_FILES = ["consolidated.safetensors", "params.json", "tekken.json"]  # Mistral's own layout of a repo


def is_repo_id(source: str) -> bool:
    """`owner/name`, and not a local path that exists."""
    return bool(_REPO_ID.match(source)) and not source.startswith((".", "~")) and not Path(source).exists()


def short_name(source: str) -> str | None:
    """The official repo id of a family short name (`ministral-3-8b`, `Mistral-Small-3.2`, case-insensitive;
    `pixtral-mlx models` lists them), or None when `source` is not one."""
    return repo_for(source) if "/" not in source else None


def download(
    repo_id: str,
    allow_patterns: list[str],
    *,
    error: type[PixtralError] = ModelError,
    local_first: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """The local folder of `repo_id` with the files matching `allow_patterns`, downloading what is missing.

    `local_first` returns a complete cached copy without asking the Hub (the loader's case: a model
    used before must start offline). Failures raise `error` with one sentence.
    """
    import huggingface_hub
    from huggingface_hub.errors import GatedRepoError, LocalEntryNotFoundError, RepositoryNotFoundError

    if local_first:
        try:
            return Path(
                huggingface_hub.snapshot_download(repo_id, allow_patterns=allow_patterns, local_files_only=True)
            )
        except Exception:  # not (completely) cached: download below
            pass
    if progress:
        progress(f"Downloading {repo_id} from Hugging Face…")
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=allow_patterns))
    except GatedRepoError as e:
        raise gated(repo_id, error) from e
    except RepositoryNotFoundError as e:
        raise not_found(repo_id, error) from e
    except LocalEntryNotFoundError as e:
        raise error(
            f"cannot download {repo_id}: Hugging Face is not reachable (no network, or HF_HUB_OFFLINE is set) and "
            "the repo is not in the local cache; check the network and retry, or download it yourself and pass "
            "the folder."
        ) from e
    except Exception as e:  # a dropped connection, a full disk: the Hub cache resumes next time
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise error(
            f"downloading {repo_id} from Hugging Face failed ({first}); check the network and run the command "
            "again to resume."
        ) from e


def gated(repo_id: str, error: type[PixtralError] = ModelError) -> PixtralError:
    return error(
        f"{repo_id} is gated on Hugging Face: accept its license on https://huggingface.co/{repo_id}, run {LOGIN}, "
        "or download it yourself and pass the folder."
    )


def not_found(repo_id: str, error: type[PixtralError] = ModelError) -> PixtralError:
    return error(
        f"{repo_id} is neither a local folder nor a Hugging Face repo you can access: check the name, or run "
        f"{LOGIN} if it is private."
    )


def repo_files(repo_id: str, error: type[PixtralError] = ModelError) -> set[str] | None:
    """The file names of `repo_id`, or None when the Hub cannot be asked (offline: the cache may do)."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        return {s.rfilename for s in HfApi().model_info(repo_id).siblings or []}
    except GatedRepoError as e:
        raise gated(repo_id, error) from e
    except RepositoryNotFoundError as e:
        raise not_found(repo_id, error) from e
    except Exception:
        return None
