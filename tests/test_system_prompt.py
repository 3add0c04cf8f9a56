"""A model folder's SYSTEM_PROMPT.txt (Mistral Small 3.1/3.2, Magistral, Ministral 3; FAMILY.md §5.3) is the
default system prompt: `{today}`/`{yesterday}`/`{name}` filled at encode time, replaced by a user's system
message, turned off by `load(..., default_system_prompt=False)` / `--no-default-system-prompt`; through the
library, `describe --dry-run`, the server and the converter. A tiny random Mistral3 checkpoint with a v7 tekken."""

from __future__ import annotations

import datetime
import json
import shutil

import family_checkpoints
import pytest
from tekken_files import make_tekken
from test_serve import Live

import pixtral_mlx.prompt
from pixtral_mlx.server.app import Settings

TEMPLATE = (
    "You are {name}, a Large Language Model (LLM) created by Mistral AI.\n"
    "The current date is {today}. Yesterday was {yesterday}.\n"
    'Answer in JSON like {"answer": 1} when asked; {unknown} and {{today}} stay as they are.\n'
)
DAY = datetime.date(2026, 3, 1)
ASK = [{"role": "user", "content": "Hello there"}]


def filled(name: str) -> str:
    return (
        f"You are {name}, a Large Language Model (LLM) created by Mistral AI.\n"
        "The current date is 2026-03-01. Yesterday was 2026-02-28.\n"
        'Answer in JSON like {"answer": 1} when asked; {unknown} and {2026-03-01} stay as they are.\n'
    )


@pytest.fixture(autouse=True)
def fixed_day(monkeypatch):
    monkeypatch.setattr(pixtral_mlx.prompt, "today", lambda: DAY)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = family_checkpoints.write_checkpoint(
        family_checkpoints.hf_model("A"), tmp_path_factory.mktemp("sp") / "Small-Tiny"
    )
    make_tekken(path, "v7")
    (path / "SYSTEM_PROMPT.txt").write_text(TEMPLATE, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def model(folder):
    import pixtral_mlx

    return pixtral_mlx.load(str(folder))


def reference_tokens(folder, system: str | None, user: str = "Hello there") -> list[int]:
    from mistral_common.protocol.instruct.messages import SystemMessage, UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    messages = ([SystemMessage(content=system)] if system is not None else []) + [UserMessage(content=user)]
    tokenizer = MistralTokenizer.from_file(str(folder / "tekken.json"))
    return tokenizer.encode_chat_completion(ChatCompletionRequest(messages=messages)).tokens


def test_default_system_prompt_exact_tokens(model, folder):
    assert model.encoder.default_system() == filled("Small-Tiny")
    tokens = model.encode(ASK).tokens
    assert tokens == reference_tokens(folder, filled("Small-Tiny"))
    assert tokens[1] == 17  # [SYSTEM_PROMPT] first (v7)


def test_date_is_taken_at_encode_time(model, folder, monkeypatch):
    monkeypatch.setattr(pixtral_mlx.prompt, "today", lambda: datetime.date(2027, 1, 1))
    text = model.encoder.default_system()
    assert "The current date is 2027-01-01. Yesterday was 2026-12-31." in text
    assert model.encode(ASK).tokens == reference_tokens(folder, text)


def test_user_system_message_replaces_it(model, folder):
    messages = [{"role": "system", "content": "Be brief."}, *ASK]
    assert model.encode(messages).tokens == reference_tokens(folder, "Be brief.")
    assert model.encoder.system_prompt_summary(messages) == "given (9 chars)"


def test_turned_off(folder):
    import pixtral_mlx

    off = pixtral_mlx.load(str(folder), default_system_prompt=False)
    assert off.encoder.system_prompt is None and off.encoder.system_prompt_summary(ASK) == "none"
    assert off.encode(ASK).tokens == reference_tokens(folder, None)


def test_generate_and_chat_use_it(model, folder):
    reply = model.generate(ASK, temperature=0, max_tokens=3)
    assert reply.prompt_tokens == len(reference_tokens(folder, filled("Small-Tiny")))
    chat = model.chat()
    chat.send("Hello there", max_tokens=2, temperature=0)
    assert chat.cache.tokens[: len(reference_tokens(folder, filled("Small-Tiny")))] == reference_tokens(
        folder, filled("Small-Tiny")
    )


def test_name_of_a_repo_and_placeholders_only(tmp_path):
    from pixtral_mlx.loading import model_name

    assert (
        model_name("mistralai/Mistral-Small-3.1-24B-Instruct-2503", tmp_path) == "Mistral-Small-3.1-24B-Instruct-2503"
    )
    assert model_name(str(tmp_path), tmp_path) == tmp_path.name
    text = pixtral_mlx.prompt.fill_system_prompt("{ {name} } {0} {today", "X")
    assert text == "{ X } {0} {today"


def test_unreadable_file_is_one_sentence(folder, tmp_path):
    from pixtral_mlx.errors import ModelError
    from pixtral_mlx.loading import read_system_prompt

    (tmp_path / "SYSTEM_PROMPT.txt").write_bytes(b"\xff\xfe bad")
    with pytest.raises(ModelError, match="is not UTF-8 text"):
        read_system_prompt(tmp_path)
    (tmp_path / "SYSTEM_PROMPT.txt").write_text("  \n")
    assert read_system_prompt(tmp_path) is None


def test_describe_dry_run_names_it(folder, tmp_path, capsys):
    from PIL import Image

    from pixtral_mlx.cli.describe import main

    Image.new("RGB", (40, 30), (10, 200, 10)).save(tmp_path / "g.png")
    base = [str(tmp_path / "g.png"), "--model", str(folder), "--dry-run"]
    assert main(base) == 0
    n = len(filled("Small-Tiny"))
    assert f"system prompt: SYSTEM_PROMPT.txt ({n} chars)" in capsys.readouterr().out
    assert main([*base, "--no-default-system-prompt"]) == 0
    assert "system prompt: none" in capsys.readouterr().out
    assert main([*base, "--system", "Be brief."]) == 0
    assert "system prompt: given (9 chars)" in capsys.readouterr().out
    assert main([*base, "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["system_prompt"].startswith("SYSTEM_PROMPT")


def test_every_front_end_has_the_flag(folder):
    from pixtral_mlx.caption.cli import build_parser as caption_parser
    from pixtral_mlx.server import cli as server_cli
    from pixtral_mlx.server.flags import build_parser as serve_parser
    from pixtral_mlx.tui.__main__ import build_parser as chat_parser
    from pixtral_mlx.tui.engine import Engine

    assert caption_parser().parse_args(["x", "--no-default-system-prompt"]).no_default_system_prompt
    assert chat_parser().parse_args(["--no-default-system-prompt"]).no_default_system_prompt
    chat = Engine(str(folder), default_system_prompt=False)._load(lambda text: None)
    assert chat.pixtral.encoder.system_prompt is None and chat.pixtral.encode(ASK).tokens == reference_tokens(
        folder, None
    )
    args = serve_parser().parse_args(["--model", str(folder), "--no-default-system-prompt"])
    assert server_cli._load(args).encoder.system_prompt is None
    args = serve_parser().parse_args(["--model", str(folder)])
    assert server_cli._load(args).encoder.system_prompt == TEMPLATE


def test_server_uses_it(folder):
    server = Live(folder, Settings(model_id="tiny"))
    try:
        client = server.client()
        out = client.chat.completions.create(model="tiny", messages=ASK, max_tokens=2, temperature=0)
        assert out.usage.prompt_tokens == len(reference_tokens(folder, filled("Small-Tiny")))
        mine = [{"role": "system", "content": "Be brief."}, *ASK]
        out = client.chat.completions.create(model="tiny", messages=mine, max_tokens=2, temperature=0)
        assert out.usage.prompt_tokens == len(reference_tokens(folder, "Be brief."))
    finally:
        server.close()


def test_converter_copies_it(folder, tmp_path):
    from pixtral_mlx.convert import convert

    out = convert(folder, tmp_path / "converted", dtype="float32", progress=False)
    assert (out / "SYSTEM_PROMPT.txt").read_text(encoding="utf-8") == TEMPLATE
    assert (out / "tekken.json").read_bytes() == (folder / "tekken.json").read_bytes()
    shutil.rmtree(out)
