"""Pasted and dropped paths: every terminal's dialect, and text that must stay text."""

from __future__ import annotations

import urllib.parse

import pytest

from pixtral_mlx.tui.paths import parse_paste


@pytest.fixture
def files(tmp_path):
    folder = tmp_path / "My Photos"
    folder.mkdir()
    names = [
        "a b.png",
        "bob's.jpg",
        "c.webp",
        "notes.txt",
        "Screenshot 2024-05-01 at 10.00.00\u202fPM.png",
    ]
    for name in names:
        (folder / name).write_bytes(b"x")
    return folder


def test_quoted_escaped_and_plain(files):
    p = files / "a b.png"
    for text in (f"'{p}'", f'"{p}"', str(p).replace(" ", "\\ "), str(p), f"{p}\n", f"  '{p}' \r\n"):
        assert parse_paste(text).images == [p], text


def test_file_urls_are_percent_decoded(files):
    p = files / "a b.png"
    url = "file://" + urllib.parse.quote(str(p))
    assert parse_paste(url).images == [p]
    assert parse_paste("file://localhost" + urllib.parse.quote(str(p))).images == [p]
    assert not parse_paste("file://otherhost" + urllib.parse.quote(str(p)))


def test_several_paths_in_any_dialect(files):
    a, b, c = files / "a b.png", files / "bob's.jpg", files / "c.webp"

    def escape(p):
        return str(p).replace(" ", "\\ ").replace("'", "\\'")

    shell = f"'{a}' {escape(b)} {escape(c)}"
    assert parse_paste(shell).images == [a, b, c]
    urls = "\r\n".join("file://" + urllib.parse.quote(str(p)) for p in (a, b, c)) + "\r\n"
    assert parse_paste(urls).images == [a, b, c]
    assert parse_paste(f"{a}\n{b}\n").images == [a, b]  # one per line, spaces unescaped


def test_apostrophe_and_macos_screenshot_names(files):
    assert parse_paste(str(files / "bob's.jpg")).images == [files / "bob's.jpg"]
    typed = str(files / "Screenshot 2024-05-01 at 10.00.00 PM.png")  # a plain space before PM
    assert parse_paste(typed).images == [files / "Screenshot 2024-05-01 at 10.00.00\u202fPM.png"]


def test_home_folder(files, monkeypatch):
    monkeypatch.setenv("HOME", str(files.parent))
    assert parse_paste("~/My\\ Photos/c.webp").images == [files / "c.webp"]


def test_non_images_are_reported_not_attached(files):
    pasted = parse_paste(f"'{files / 'notes.txt'}' '{files / 'c.webp'}'")
    assert pasted.images == [files / "c.webp"] and pasted.others == [files / "notes.txt"]


@pytest.mark.parametrize(
    "text",
    [
        "hello world",
        "what's in /tmp?",
        "",
        "   ",
        "'unbalanced",
        "/",
        "~/nope.png",
        "look at this: {p}",
        "{p} and more words",
    ],
)
def test_text_stays_text(files, text):
    assert not parse_paste(text.format(p=files / "c.webp"))


def test_bare_file_names_stay_text_unless_images(files, monkeypatch):
    monkeypatch.chdir(files)
    assert not parse_paste("notes.txt")
    assert parse_paste("c.webp").images == [files / "c.webp"]
