"""The chat's non-UI parts: image plans, slash commands, storage and export, clipboard errors."""

from __future__ import annotations

import json
import random

import pytest

from pixtral_mlx.tui import clipboard, commands
from pixtral_mlx.tui.attachments import inspect, plan
from pixtral_mlx.tui.storage import Conversation, Store, Turn, data_dir, export_path, to_markdown


def test_plan_matches_mistral_common():
    from mistral_common.tokens.tokenizers.image import ImageConfig, ImageEncoder, SpecialImageIDs

    class Sized:
        size = (0, 0)

    rng = random.Random(0)
    for max_edge in (1024, 768, 16):
        enc = ImageEncoder(ImageConfig(16, max_edge), SpecialImageIDs(img=10, img_break=12, img_end=13))
        for _ in range(300):
            Sized.size = (rng.randint(1, 6000), rng.randint(1, 6000))
            cols, rows = enc._image_to_num_tokens(Sized)
            assert plan(*Sized.size, max_edge=max_edge) == (
                cols * 16,
                rows * 16,
                rows * (cols + 1),
            ), Sized.size
    assert plan(3024, 4032) == (768, 1024, 3136)


def test_mistral3_chips_use_the_loaded_models_geometry(images, tmp_path):
    """Before a model loads, chips are planned with Pixtral-12B's 1024 px and 16-px tokens; once a Mistral3 model is
    loaded, with its 1540 px and 2x2 14-px patches per token, and they equal its encoder's."""
    from types import SimpleNamespace

    import family_checkpoints  # tests/ is on the path (tests/conftest.py)

    from pixtral_mlx.prompt import PromptEncoder
    from pixtral_mlx.tui.engine import Engine

    engine = Engine("some/model")
    assert engine.geometry == (1024, 16)
    encoder = PromptEncoder(
        family_checkpoints.tekken(tmp_path / "tekken.json"), image_size=1540, patch_size=14, spatial_merge_size=2
    )
    engine.chat = SimpleNamespace(pixtral=SimpleNamespace(encoder=encoder))
    assert engine.geometry == (1540, 28)
    for key in ("red", "photo"):
        att = inspect(images[key], geometry=engine.geometry)
        prompt = encoder.encode([{"role": "user", "content": [att.part(), {"type": "text", "text": "hi"}]}])
        (img,) = prompt.images
        assert (att.size, att.tokens) == (img.size, img.n_tokens)
    label = inspect(images["photo"], geometry=engine.geometry).label()
    assert label == "photo.jpg 3024×4032 → 1176×1540 · 2,365 tokens"  # 55 rows of 42 cells of 28 px


def test_inspect_matches_the_library_encoder(images):
    from pixtral_mlx.prompt import PromptEncoder

    encoder = PromptEncoder()
    for key in ("red", "photo"):
        att = inspect(images[key])
        prompt = encoder.encode([{"role": "user", "content": [att.part(), {"type": "text", "text": "hi"}]}])
        (img,) = prompt.images
        assert (att.original_size, att.size, att.tokens) == (
            img.original_size,
            img.size,
            img.n_tokens,
        )
    assert inspect(images["photo"]).label() == "photo.jpg 3024×4032 → 768×1024 · 3,136 tokens"
    with pytest.raises(ValueError, match="not an image file"):
        inspect(images["broken"])


@pytest.mark.parametrize(
    "text, expected",
    [
        ("/image ~/a b.png", ("image", "~/a b.png")),
        ("/img x", ("image", "x")),
        ("/new", ("new", "")),
        ("/export out.md", ("export", "out.md")),
        ("/regen", ("regen", "")),
        ("/frobnicate", ("?frobnicate", "")),
        ("/usr/bin is a folder", None),
        ("hello /new", None),
        ("", None),
    ],
)
def test_slash_commands(text, expected):
    assert commands.parse(text) == expected


def test_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("PIXTRAL_MLX_DATA", str(tmp_path / "d"))
    assert data_dir() == tmp_path / "d"
    monkeypatch.delenv("PIXTRAL_MLX_DATA")
    monkeypatch.setattr("sys.platform", "linux")
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    assert data_dir() == tmp_path / "xdg" / "pixtral-mlx"
    monkeypatch.setattr("sys.platform", "darwin")
    assert data_dir().parts[-3:] == ("Library", "Application Support", "pixtral-mlx")


def test_save_load_survives_the_original_moving(images, tmp_path):
    store = Store(tmp_path / "data")
    red = inspect(images["red"])
    conv = Conversation(system="Be brief.", model="tiny")
    conv.turns += [
        Turn("user", "What is it?", [red]),
        Turn("assistant", "A red square.", finish="interrupted"),
    ]
    path = store.save(conv)
    images["red"].unlink()  # the original is gone; the stored copy remains
    doc = json.loads(path.read_text())
    part = doc["messages"][0]["content"][0]
    assert part["image_url"]["url"] == f"images/{red.digest}.png" and part["tokens"] == 260
    back = store.load(conv.id)
    assert back.title == "What is it?" and back.system == "Be brief."
    (img,) = back.turns[0].images
    assert img.path.exists() and img.path.parent == store.images and img.label() == red.label()
    assert back.turns[1].finish == "interrupted"
    assert back.messages()[0] == {"role": "system", "content": "Be brief."}
    assert back.messages()[1]["content"][0] == {
        "type": "image_url",
        "image_url": {"url": str(img.path)},
    }
    assert [s.id for s in store.list()] == [conv.id] and store.list()[0].images == 1
    store.delete(conv.id)
    assert store.list() == []


def test_saving_unchanged_keeps_the_time(tmp_path):
    store = Store(tmp_path / "data")
    conv = Conversation(turns=[Turn("user", "Hi"), Turn("assistant", "Hello")])
    store.save(conv)
    first = conv.updated
    store.save(conv)
    assert conv.updated == first == store.list()[0].updated
    conv.turns.append(Turn("user", "More"))
    store.save(conv)
    assert store.list()[0].updated >= first and store.load(conv.id).turns[-1].text == "More"


def test_same_image_is_stored_once(images, tmp_path):
    store = Store(tmp_path / "data")
    a = store.store_image(inspect(images["red"]))
    b = store.store_image(inspect(images["red"]))
    assert a.path == b.path and len(list(store.images.iterdir())) == 1


def test_markdown_export(images, tmp_path):
    store = Store(tmp_path / "data")
    conv = Conversation(model="tiny")
    conv.turns += [
        Turn("user", "Hi", [store.store_image(inspect(images["red"]))]),
        Turn("assistant", "**Hello**"),
    ]
    md = to_markdown(conv)
    assert md.startswith("# Hi\n")
    assert "## You" in md and "## Pixtral\n\n**Hello**" in md
    assert "*red square.png 300×200 → 304×208 · 260 tokens*" in md and "![red square.png](file://" in md
    first = export_path(conv, tmp_path)
    first.write_text(md)
    assert first.name == "hi.md" and export_path(conv, tmp_path).name == "hi-2.md"


def test_clipboard_says_what_is_missing(monkeypatch, tmp_path):
    monkeypatch.setattr("sys.platform", "linux")
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.delenv("DISPLAY", raising=False)
    with pytest.raises(clipboard.ClipboardError, match="no clipboard is reachable"):
        clipboard.grab_image(tmp_path)
    monkeypatch.setenv("DISPLAY", ":0")
    monkeypatch.setattr(clipboard.shutil, "which", lambda name: None)
    with pytest.raises(clipboard.ClipboardError, match="xclip"):
        clipboard.grab_image(tmp_path)
    assert list(tmp_path.iterdir()) == []  # no empty temp files left behind


def test_clipboard_with_xclip(monkeypatch, tmp_path):
    png = b"\x89PNG fake bytes"
    calls = []

    def run(cmd):
        calls.append(cmd)
        out = b"TARGETS\nimage/png\n" if "TARGETS" in cmd else png
        return clipboard.subprocess.CompletedProcess(cmd, 0, out, b"")

    monkeypatch.setattr("sys.platform", "linux")
    monkeypatch.delenv("WAYLAND_DISPLAY", raising=False)
    monkeypatch.setenv("DISPLAY", ":0")
    monkeypatch.setattr(clipboard.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(clipboard, "_run", run)
    path = clipboard.grab_image(tmp_path)
    assert path.read_bytes() == png and path.suffix == ".png"
    assert calls[-1][:4] == ["xclip", "-selection", "clipboard", "-t"]


def test_cli_list_resume_and_errors(data_dir, images, capsys):
    from pixtral_mlx.tui.__main__ import main

    assert main(["--list"]) == 0 and capsys.readouterr().out == ""
    store = Store()
    conv = Conversation(turns=[Turn("user", "Hello there"), Turn("assistant", "Hi")])
    store.save(conv)
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(conv.id) and out.rstrip().endswith("  1 turn    0 images  Hello there")
    for argv, error in (
        (["--resume", "nope"], "no saved conversation 'nope'"),
        ([str(images["red"].parent / "missing.png")], "missing.png: no such file"),
        (["--max-edge", "4096"], "--max-edge must be between 16 and 1540"),
    ):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and error in capsys.readouterr().err
