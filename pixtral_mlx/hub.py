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


TOKENIZER_FILES = ["tekken.json", "*.model.v*", "SYSTEM_PROMPT.txt"]  # tekken or SentencePiece; the system prompt
OFFICIAL_FILES = ["consolidated.safetensors", "params.json", *TOKENIZER_FILES]  # Mistral's own layout of a repo
HF_FILES = ["config.json", "model*.safetensors", "model.safetensors.index.json", *TOKENIZER_FILES]  # HF and MLX layout


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


def layout_files(names: set[str] | None, hf_files: list[str] = HF_FILES) -> list[str]:
    """The files of ONE layout of a repo whose file names are `names` (`repo_files`): the Hugging Face (or MLX)
    layout when the repo has it, else Mistral's official one. Repos such as Mistral Small 3.x ship both, the same
    weights twice; the HF layout is the one `load` reads as it is (FP8 included) and `convert` reads as well.
    Both when `names` is None (the Hub cannot be asked; only the local cache can answer)."""
    if names is None:
        return hf_files + [f for f in OFFICIAL_FILES if f not in hf_files]
    if any(n.startswith("model") and n.endswith(".safetensors") and "/" not in n for n in names):
        return hf_files
    if "consolidated.safetensors" in names:
        return OFFICIAL_FILES
    return hf_files + [f for f in OFFICIAL_FILES if f not in hf_files]


def download_layout(
    repo_id: str,
    hf_files: list[str] = HF_FILES,
    *,
    error: type[PixtralError] = ModelError,
    local_first: bool = False,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """`download` of one layout of `repo_id` (`layout_files`). With `local_first`, a cached copy of either layout
    is returned without asking the Hub (each is checked on its own: a cache holding one layout is complete)."""
    import huggingface_hub

    if local_first:
        for patterns in (OFFICIAL_FILES, hf_files):
            try:
                return Path(huggingface_hub.snapshot_download(repo_id, allow_patterns=patterns, local_files_only=True))
            except Exception:  # not (completely) cached in this layout
                continue
    names = repo_files(repo_id, error)
    return download(repo_id, layout_files(names, hf_files), error=error, progress=progress)
