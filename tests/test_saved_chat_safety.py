"""A saved chat is data, never instructions: loading one reads that file only, adopts its KV cache only for the
tokens it was computed from, finds the file under any name `save` took, and bad message shapes are one sentence."""

from __future__ import annotations

import http.server
import json
import os
import sys
import threading

import numpy as np
import pytest
from PIL import Image

from pixtral_mlx.errors import PixtralError

GREEDY = {"temperature": 0.0, "max_tokens": 8}
OPENED: list[str] = []  # paths opened while `watching` (an audit hook: nothing else sees every open)
WATCH = {"on": False}


def _audit(event, args):
    if WATCH["on"] and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
        OPENED.append(os.fsdecode(args[0]))
    if WATCH["on"] and event == "socket.connect":
        OPENED.append(f"socket:{args[1]}")


sys.addaudithook(_audit)


def noise(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def one_sentence(e):
    msg = str(e)
    assert msg.endswith(".") and "\n" not in msg and ". " not in msg, msg
    return msg


def image_chat(pixtral, text="Describe the red one."):
    chat = pixtral.chat(**GREEDY)
    chat.send([{"type": "image", "image": noise(64, 48, 5)}, {"type": "text", "text": text}])
    return chat


def edited(path, out, change):
    """A copy of the chat KV file at `path` with its metadata changed by `change(meta)` (as a text editor could)."""
    import mlx.core as mx

    arrays, raw = mx.load(str(path), return_metadata=True)
    key = next(k for k in raw if k.endswith("pixtral_mlx"))
    meta = json.loads(raw[key])
    change(meta)
    mx.save_safetensors(str(out), arrays, {**raw, key: json.dumps(meta)})
    return out


def set_image(url):
    def change(meta):
        meta["messages"][0]["content"][0] = url

    return change


# Loading touches nothing outside the file -------------------------------------------------------------
def test_loading_never_fetches_an_image_url(pixtral, tmp_path, monkeypatch):
    from pixtral_mlx.chat import Chat
    from pixtral_mlx.images import load_image

    monkeypatch.setenv("no_proxy", "*")
    monkeypatch.setenv("NO_PROXY", "*")
    png = tmp_path / "a.png"
    noise(64, 48, 5).save(png)
    requests = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            body = png.read_bytes()
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/a.png"
    try:
        saved = image_chat(pixtral).save(tmp_path / "chat.safetensors")
        bad = edited(saved, tmp_path / "bad.safetensors", set_image({"type": "image_url", "image_url": {"url": url}}))
        with pytest.raises(PixtralError, match="only as data: URLs") as e:
            Chat.load(pixtral, bad)
        assert url in one_sentence(e.value)
        assert requests == []
        load_image(url)  # the server does answer: had loading asked, it would have been seen
        assert requests == ["/a.png"]
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize("form", ["path", "file_url", "image_part"])
def test_loading_never_reads_a_local_image(pixtral, tmp_path, form):
    from pixtral_mlx.chat import Chat
    from pixtral_mlx.images import load_image

    secret = tmp_path / "secret.png"
    noise(64, 48, 6).save(secret)
    part = {
        "path": {"type": "image_url", "image_url": {"url": str(secret)}},
        "file_url": {"type": "image_url", "image_url": secret.as_uri()},
        "image_part": {"type": "image", "image": str(secret)},
    }[form]
    saved = image_chat(pixtral).save(tmp_path / "chat.safetensors")
    bad = edited(saved, tmp_path / "bad.safetensors", set_image(part))
    OPENED.clear()
    WATCH["on"] = True
    try:
        with pytest.raises(PixtralError, match="only as data: URLs") as e:
            Chat.load(pixtral, bad)
        opened_by_load = list(OPENED)
        load_image(str(secret))  # the hook does see an image being read
    finally:
        WATCH["on"] = False
    one_sentence(e.value)
    assert not [p for p in opened_by_load if "secret" in p or p.startswith("socket:")], opened_by_load
    assert str(secret) in OPENED[len(opened_by_load) :]


def test_saved_images_are_data_urls_whatever_their_source(pixtral, tmp_path):
    """A path's image goes into the file, so the loaded chat no longer needs (or reads) the path."""
    from pixtral_mlx.chat import Chat

    noise(72, 40, 7).save(tmp_path / "a.png")
    chat = pixtral.chat(**GREEDY)
    chat.send([{"type": "image_url", "image_url": {"url": str(tmp_path / "a.png")}}, {"type": "text", "text": "Hi."}])
    path = chat.save(tmp_path / "chat.safetensors")
    expected = chat.send("More.")
    (tmp_path / "a.png").unlink()
    resumed = Chat.load(pixtral, path)
    part = resumed.messages[0]["content"][0]
    assert part["image_url"]["url"].startswith("data:image/png;base64,") and part["name"] == str(tmp_path / "a.png")
    assert resumed.resumed_tokens >= len(pixtral.encode(resumed.messages[:1]))  # same pixels: the image's keys too
    runs = pixtral.vision_runs
    assert resumed.send("More.").tokens == expected.tokens
    assert pixtral.vision_runs == runs


# The KV cache is adopted only for its own tokens --------------------------------------------------
def _swap_text(pixtral, tokens, old, new):
    """`tokens` with the first user message's text `old` replaced by `new` (same token count), as an editor
    who wanted the model to continue from a context the user cannot see would write them."""
    a = pixtral.encode([{"role": "user", "content": old}]).tokens
    b = pixtral.encode([{"role": "user", "content": new}]).tokens
    assert len(a) == len(b) and tokens[: len(a)] != b
    return b + tokens[len(a) :]


def test_edited_tokens_are_not_adopted_and_the_history_is_prefilled_again(pixtral, tmp_path):
    from pixtral_mlx.chat import Chat
    from pixtral_mlx.generate import common_prefix
    from pixtral_mlx.kvcache import read_meta

    chat = pixtral.chat(**GREEDY)
    chat.send("Say the word red.")
    saved = chat.save(tmp_path / "chat.safetensors")
    same = edited(saved, tmp_path / "same.safetensors", lambda meta: None)

    def change(meta):
        meta["messages"][0]["content"] = "Say the word blue."
        meta["tokens"] = _swap_text(pixtral, meta["tokens"], "Say the word red.", "Say the word blue.")

    bad = edited(saved, tmp_path / "bad.safetensors", change)

    # Unedited: adopted, and the reply continues exactly as the original chat's does.
    resumed = Chat.load(pixtral, same)
    assert resumed.resumed_tokens == len(resumed.cache.tokens) >= len(pixtral.encode(chat.messages[:1])) > 0
    assert resumed.send("Again.").tokens == chat.send("Again.").tokens

    # Edited: its tokens match the edited history (so without the hash the old keys would be adopted)…
    loaded = Chat.load(pixtral, bad)
    history = pixtral.encode(loaded.messages + [{"role": "user", "content": ""}]).tokens
    assert common_prefix(read_meta(bad)["tokens"], history) >= len(pixtral.encode(loaded.messages[:1]))
    # …but they are not: the cache starts empty, the messages stay, and the next turn equals a fresh chat's.
    assert loaded.resumed_tokens == 0 and loaded.cache.offset == 0 and loaded.cache.tokens == []
    assert "changed" in loaded.cache_note
    assert loaded.messages[0] == {"role": "user", "content": "Say the word blue."}
    fresh = pixtral.chat(**GREEDY)
    fresh.restore(loaded.messages)
    a, b = loaded.send("Again."), fresh.send("Again.")
    assert a.tokens == b.tokens and a.prompt_tokens == b.prompt_tokens == len(pixtral.encode(loaded.messages[:-1]))


def test_edited_image_digest_is_not_adopted(pixtral, tmp_path):
    """Without the hash, an edited digest would still reuse the cache up to that image; with it, nothing."""
    from pixtral_mlx.chat import Chat

    saved = image_chat(pixtral).save(tmp_path / "chat.safetensors")
    bad = edited(saved, tmp_path / "bad.safetensors", lambda meta: meta["image_digests"].__setitem__(0, "0" * 32))
    loaded = Chat.load(pixtral, bad)
    assert loaded.resumed_tokens == 0 and loaded.cache.offset == 0 and "changed" in loaded.cache_note
    assert Chat.load(pixtral, saved).resumed_tokens > 0


@pytest.mark.parametrize(
    "change, match",
    [
        (lambda m: m.update(messages="hello"), "messages must be a list"),
        (lambda m: m.update(messages=[5]), "message 1 must be a"),
        (lambda m: m["messages"][0].update(role=7), "has the role 7"),
        (lambda m: m["messages"][0].update(content={"text": "x"}), "must be a string or a list of parts"),
        (lambda m: m.update(options={"max_tokens": "many"}), "max_tokens must be"),
        (lambda m: m.update(max_edge="big"), "max edge must be"),
    ],
)
def test_malformed_saved_chat_is_one_sentence(pixtral, tmp_path, change, match):
    from pixtral_mlx.chat import Chat

    chat = pixtral.chat(**GREEDY)
    chat.send("Hi.")
    bad = edited(chat.save(tmp_path / "chat.safetensors"), tmp_path / "bad.safetensors", change)
    with pytest.raises(PixtralError, match=match) as e:
        Chat.load(pixtral, bad)
    one_sentence(e.value)


@pytest.mark.parametrize(
    "tokens, note", [("1 2 3", "not a list of token ids"), ([1, "2"], "not a list of token ids"), ([1, 2], "changed")]
)
def test_malformed_tokens_are_not_adopted(pixtral, tmp_path, tokens, note):
    from pixtral_mlx.chat import Chat

    chat = pixtral.chat(**GREEDY)
    chat.send("Hi.")
    saved = chat.save(tmp_path / "chat.safetensors")
    bad = edited(saved, tmp_path / "bad.safetensors", lambda m: m.update(tokens=tokens))
    loaded = Chat.load(pixtral, bad)
    assert loaded.resumed_tokens == 0 and loaded.cache.offset == 0 and note in loaded.cache_note
    assert loaded.messages == chat.messages


# Whatever name `save` takes, `load` reads back ------------------------------------------------------
@pytest.mark.parametrize("save_as, load_as", [("mychat", "mychat"), ("mychat", "mychat.safetensors"),
                                              ("mychat.safetensors", "mychat")])  # fmt: skip
def test_save_and_load_resolve_the_same_name(pixtral, tmp_path, save_as, load_as):
    from pixtral_mlx.chat import Chat

    chat = pixtral.chat(**GREEDY)
    chat.send("Hi.")
    written = chat.save(tmp_path / save_as)
    assert written == tmp_path / "mychat.safetensors" and written.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mychat.safetensors"]  # nothing else, no temporary
    resumed = Chat.load(pixtral, str(tmp_path / load_as))
    assert resumed.messages == chat.messages
    assert resumed.resumed_tokens >= len(pixtral.encode(chat.messages[:1])) > 0
    other = pixtral.chat(**GREEDY)
    other.restore(chat.messages)
    assert other.load_cache(tmp_path / load_as) == resumed.resumed_tokens


def test_missing_name_says_which_file(pixtral, tmp_path):
    from pixtral_mlx.chat import Chat

    with pytest.raises(PixtralError, match="mychat.safetensors: no such file") as e:
        Chat.load(pixtral, tmp_path / "mychat")
    one_sentence(e.value)


# Bad message shapes are PixtralErrors, not TypeErrors ----------------------------------------------
@pytest.mark.parametrize(
    "messages, match",
    [
        (5, "messages must be a list of"),
        ("hello", "messages must be a list of"),
        ({"role": "user", "content": "hi"}, "messages must be a list of"),
        ([5], "message 1 must be a"),
        (["hi"], "message 1 must be a"),
        ([{"content": "hi"}], "message 1 has the role None"),
        ([{"role": ["user"], "content": "hi"}], r"message 1 has the role \['user'\]"),
        ([{"role": "user", "content": 3}], "content of message 1 must be a string or a list of parts, not int"),
        ([{"role": "user", "content": "a"}, {"role": "assistant", "content": {"text": "b"}}], "message 2"),
        ([{"role": "user", "content": [1]}], "part 1 of the content of message 1 must be a dict"),
        ([{"role": "user", "content": [{"type": "text", "text": 3}]}], "the text of part 1"),
        ([{"role": "user", "content": [{"type": "video"}]}], "has the type 'video'"),
    ],
)
def test_restore_bad_shapes(pixtral, messages, match):
    chat = pixtral.chat(**GREEDY)
    good = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."}]
    chat.restore(good)
    with pytest.raises(PixtralError, match=match) as e:
        chat.restore(messages)
    one_sentence(e.value)
    assert chat.messages == good  # a refused history leaves the chat as it was


@pytest.mark.parametrize(
    "content, match",
    [
        (5, "must be a string or a list of parts, not int"),
        ({"type": "text", "text": "hi"}, "not dict"),
        (None, "not None"),
        ([None], "part 1 of the message content must be a dict"),
        ([{"type": ["text"], "text": "hi"}], r"has the type \['text'\]"),
        ([{"type": "text", "text": b"hi"}], "must be a string, not bytes"),
    ],
)
def test_send_bad_content(pixtral, content, match):
    chat = pixtral.chat(**GREEDY)
    for call in (chat.send, chat.stream, chat.tokens_needed, chat.memory_plan):
        with pytest.raises(PixtralError, match=match) as e:
            call(content)
        one_sentence(e.value)
    assert chat.messages == []
    assert chat.send("Hi.").tokens  # still usable
