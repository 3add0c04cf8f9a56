"""Tiny tekken.json files of newer versions (v7, v11, v13) for tests.

mistral_common ships only Pixtral-12B's tekken (v3, `tekken_240911.json`), the one bundled tekken with an image
config; the newer files are not bundled (FAMILY.md §5.1). `make_tekken` derives one from it: the same vocabulary,
pattern and 1000 special-token slots, `config.version` set, and the explicit `special_tokens` list that mistral_common
requires above v7 (`Tekkenizer.from_file`). The ranks follow mistral_common's own test layout (its
`get_special_tokens`): the 20 historical tokens at 0-19 (`Tekkenizer.DEPRECATED_SPECIAL_TOKENS`: <unk> <s> </s>
[INST] [/INST] … [TOOL_CALLS] [IMG] … [SYSTEM_PROMPT] [/SYSTEM_PROMPT] [TOOL_CONTENT]), from v11 [ARGS] 32 and
[CALL_ID] 33, from v13 [THINK] 35 and [/THINK] 36 (a reasoning model's; `think=False` leaves them out); every
other slot up to 1000 is a filler `<SPECIAL_n>`. The image config stays (so the tokenizer is multimodal), with
Mistral3's settings by default. v3 gets no list (mistral_common's defaults, as Pixtral-12B's file).

    from tests.tekken_files import make_tekken
    path = make_tekken(tmp_path, "v13")            # tmp_path/tekken.json
    MistralTokenizer.from_file(str(path))
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

MISTRAL3_IMAGE = {"image_patch_size": 14, "max_image_size": 1540, "spatial_merge_size": 2}
VERSIONS = ("v3", "v7", "v11", "v13")  # v15 would need a model_settings_builder as well

# rank -> token, by the version that introduced it (mistral_common's test layout; see the module docstring)
V11_TOKENS = {32: "[ARGS]", 33: "[CALL_ID]"}
THINK_TOKENS = {35: "[THINK]", 36: "[/THINK]"}


def _at_least(version: str, minimum: str) -> bool:
    return int(version[1:]) >= int(minimum[1:])


def special_tokens(version: str = "v13", think: bool | None = None, count: int = 1000) -> list[dict[str, Any]]:
    """The `special_tokens` list of a tekken.json of `version`: `{"rank", "token_str", "is_control"}` for each of
    the `count` slots. `think` (default: from v13 on) adds [THINK]/[/THINK]."""
    from mistral_common.tokens.tokenizers.tekken import Tekkenizer

    if version not in VERSIONS:
        raise ValueError(f"version must be one of {VERSIONS}, got {version!r}")
    think = _at_least(version, "v13") if think is None else think
    if think and not _at_least(version, "v13"):
        raise ValueError("[THINK] tokens need a v13 or later tokenizer")
    named = {t["rank"]: str(t["token_str"]) for t in Tekkenizer.DEPRECATED_SPECIAL_TOKENS}
    if _at_least(version, "v11"):
        named.update(V11_TOKENS)
    if think:
        named.update(THINK_TOKENS)
    return [{"rank": i, "token_str": named.get(i, f"<SPECIAL_{i}>"), "is_control": True} for i in range(count)]


def make_tekken(
    path: str | Path,
    version: str = "v13",
    *,
    think: bool | None = None,
    image: dict[str, Any] | None = None,
) -> Path:
    """Write a tekken.json of `version` (see the module docstring) at `path`, or at `path/tekken.json` when `path`
    is a folder; returns the file's path. `think`: [THINK]/[/THINK] present (default: from v13 on); `image`: the
    image config (default Mistral3's: patch 14, 1540 px, merge 2)."""
    from pixtral_mlx.config import bundled_tekken

    path = Path(path)
    if path.is_dir():
        path = path / "tekken.json"
    data = json.loads(Path(bundled_tekken()).read_text(encoding="utf-8"))
    data["config"]["version"] = version
    data["image"] = dict(MISTRAL3_IMAGE if image is None else image)
    if _at_least(version, "v7"):  # required above v7; at v7 it keeps the ranks explicit
        data["special_tokens"] = special_tokens(version, think, data["config"]["default_num_special_tokens"])
    path.write_text(json.dumps(data), encoding="utf-8")
    return path
