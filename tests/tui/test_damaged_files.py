"""Damaged conversation files: skipped with a notice, never rewritten, never hiding the good ones."""

from __future__ import annotations

import json

import pytest
from chat_fakes import FakeEngine, ask, notes, started, wait_for

from pixtral_mlx.tui import make_app
from pixtral_mlx.tui.attachments import inspect
from pixtral_mlx.tui.screens.conversations import ConversationsScreen
from pixtral_mlx.tui.storage import Conversation, StorageError, Store, Turn

SIZE = (110, 36)


def _set(key, value):
    return lambda doc: {**doc, key: value}


def _drop(key):
    return lambda doc: {k: v for k, v in doc.items() if k != key}


def _first_message(**changes):
    return lambda doc: {**doc, "messages": [{**doc["messages"][0], **changes}, *doc["messages"][1:]]}


def _image_part(**changes):
    def change(doc):
        first = doc["messages"][0]
        return _first_message(content=[{**first["content"][0], **changes}, *first["content"][1:]])(doc)

    return change


# name: (how the good file is damaged, words the notice must contain)
DAMAGE = {
    "a JSON list": (lambda doc: [doc], "holds a list where an object is expected"),
    "updated null": (_set("updated", None), "'updated' is null, not a string"),
    "messages a number": (_set("messages", 5), "'messages' is a number, not a list"),
    "no id": (_drop("id"), "it has no 'id'"),
    "no messages": (_drop("messages"), "it has no 'messages'"),
    "a string for a part": (_first_message(content=["a red square"]), "part 1 of message 1 is a string"),
    "title a number": (_set("title", 5), "'title' is a number, not a string"),
    "system a list": (_set("system", ["be brief"]), "'system' is a list, not a string"),
    "id of another file": (_set("id", "someone-else"), "does not match the file name"),
    "a message a string": (_set("messages", ["hello"]), "message 1 is a string, not an object"),
    "an unknown role": (_first_message(role="robot"), "message 1 has the role 'robot'"),
    "content null": (_first_message(content=None), "the content of message 1 is null"),
    "finish a number": (_first_message(finish=3), "the 'finish' of message 1 is a number"),
    "text a number": (_first_message(content=[{"type": "text", "text": 7}]), "the text of part 1 of message 1"),
    "an unknown part": (_first_message(content=[{"type": "audio"}]), "part 1 of message 1 has the type 'audio'"),
    "no image url": (_image_part(image_url={}), "part 1 of message 1 has no image URL"),
    "a bad size": (_image_part(size=[1, "x"]), "the size of part 1 of message 1 is not a [width, height] pair"),
    "tokens a string": (_image_part(tokens="many"), "the token count of part 1 of message 1 is a string"),
    "another format": (_set("format", "something"), "it is not a pixtral-mlx conversation"),
    "a newer version": (_set("version", 99), "written by a newer pixtral-mlx (format version 99)"),
}
RAW_DAMAGE = {  # bytes that are not a JSON document at all
    "cut short": (lambda raw: raw[: len(raw) // 2], "it is not valid JSON"),
    "empty": (lambda raw: b"", "it is not valid JSON"),
    "not UTF-8": (lambda raw: b"\xff\xfe" + raw, "it is not valid JSON"),
    "nested too deep": (lambda raw: b"[" * 100_000 + b"]" * 100_000, "it is not valid JSON"),
}


def _good(store: Store, images, text: str) -> Conversation:
    conv = Conversation(turns=[Turn("user", text, [inspect(images["red"])]), Turn("assistant", "A red square.")])
    store.save(conv)
    return conv


def _damaged(store: Store, images, case: str) -> tuple[str, bytes, str]:
    """A conversation saved properly, then damaged as `case` says; returns (id, its bytes, expected words)."""
    conv = _good(store, images, "Damage me")
    path = store.conversations / f"{conv.id}.json"
    if case in RAW_DAMAGE:
        damage, words = RAW_DAMAGE[case]
        raw = damage(path.read_bytes())
    else:
        change, words = DAMAGE[case]
        raw = json.dumps(change(json.loads(path.read_text())), indent=1).encode()
    path.write_bytes(raw)
    return conv.id, raw, words


@pytest.mark.parametrize("case", [*DAMAGE, *RAW_DAMAGE])
def test_a_damaged_file_is_named_and_the_others_still_list(case, data_dir, images):
    store = Store()
    good = _good(store, images, "Still here")
    bad_id, raw, words = _damaged(store, images, case)
    bad_path = store.conversations / f"{bad_id}.json"

    summaries, damaged = store.scan()
    assert [s.id for s in summaries] == [good.id] and summaries[0].images == 1
    assert [e.path for e in damaged] == [bad_path]
    assert str(damaged[0]).startswith(f"{bad_path} is damaged: ") and words in str(damaged[0])
    assert store.list() == summaries
    with pytest.raises(StorageError, match="is damaged") as error:
        store.load(bad_id)
    assert words in str(error.value)
    assert store.load(good.id).turns[0].text == "Still here"
    assert bad_path.read_bytes() == raw  # left exactly as it was


def test_ids_that_are_not_file_names_are_refused(data_dir, images):
    store = Store()
    _good(store, images, "Hello")
    for conv_id in ("../conversations/x", "/etc/passwd", ".hidden", ""):
        with pytest.raises(ValueError, match="is not a conversation id"):
            store.load(conv_id)


def test_cli_list_and_resume_skip_damaged_files(data_dir, images, capsys):
    from pixtral_mlx.tui.__main__ import main

    store = Store()
    good = _good(store, images, "Still here")
    damaged = {case: _damaged(store, images, case) for case in ("a JSON list", "updated null", "messages a number")}
    assert main(["--list"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith(good.id) and out.rstrip().endswith("1 turn    1 image   Still here")
    assert len(out.splitlines()) == 1
    lines = err.splitlines()
    assert len(lines) == 3
    for bad_id, raw, words in damaged.values():
        path = store.conversations / f"{bad_id}.json"
        (line,) = [line for line in lines if str(path) in line]
        assert line.startswith(f"pixtral-mlx chat: skipped {path}: ") and words in line
        assert line.endswith("; the file was left as it is.")
        assert path.read_bytes() == raw

        assert main(["--resume", bad_id]) == 1  # before the model loads
        err = capsys.readouterr().err
        assert err.startswith(f"pixtral-mlx chat: error: {path} is damaged: ") and words in err
        assert len(err.splitlines()) == 1 and err.count(". ") == 0  # one sentence
        assert path.read_bytes() == raw


async def test_the_app_lists_and_opens_the_good_ones(data_dir, images):
    store = Store(data_dir)
    good = _good(store, images, "Still here")
    bad = [_damaged(store, images, case) for case in ("a string for a part", "no id")]
    engine = FakeEngine()
    app = make_app(engine, data_dir=data_dir)
    async with app.run_test(size=SIZE) as pilot:
        screen = await started(pilot)
        await pilot.press("ctrl+o")
        await wait_for(pilot, lambda: isinstance(app.screen, ConversationsScreen))
        assert app.screen.query_one("#conversation-list").option_count == 1
        assert notes(app)[-1].startswith(f"2 conversation files in {store.conversations} are damaged: ")
        assert notes(app)[-1].endswith("They were skipped and left as they are.")
        await pilot.press("enter")
        await wait_for(pilot, lambda: screen.conversation.id == good.id and len(engine.chat.messages) == 2)
        await ask(pilot, "And now?")
        assert len(store.load(good.id).turns) == 4
        for bad_id, raw, _ in bad:
            assert (store.conversations / f"{bad_id}.json").read_bytes() == raw


async def test_resuming_a_damaged_file_in_the_app_keeps_it(data_dir, images):
    store = Store(data_dir)
    bad_id, raw, words = _damaged(store, images, "messages a number")
    app = make_app(FakeEngine(), data_dir=data_dir, resume=bad_id)
    async with app.run_test(size=SIZE) as pilot:
        screen = await started(pilot)
        await wait_for(pilot, lambda: notes(app), what="the notice")
        assert notes(app)[-1] == f"{store.conversations / bad_id}.json is damaged: {words}."  # its whole text
        await ask(pilot, "A new chat instead")  # the app goes on, in a new conversation
        assert screen.conversation.id != bad_id and app.is_running
    assert (store.conversations / f"{bad_id}.json").read_bytes() == raw
