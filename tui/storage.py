"""Saved conversations: one JSON file each, images copied by content hash, Markdown export.

$PIXTRAL_MLX_DATA (or ~/Library/Application Support/pixtral-mlx, or $XDG_DATA_HOME/pixtral-mlx)
  conversations/<id>.json   messages in OpenAI format; image URLs relative to this folder
  images/<sha256>.<ext>     every image sent, stored once, so a chat survives the original moving

One module on purpose, though over 300 lines: one file format, whose types, strict parser (`_parse`), writer
(`Store`) and Markdown export change together.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from pixtral_mlx.errors import PixtralError

from .attachments import Attachment, file_digest

FORMAT = "pixtral-mlx.conversation"
VERSION = 1
MISSING = "[image missing: {name}]"  # stands in for an image whose stored copy is gone


class StorageError(PixtralError):
    """A conversation file that cannot be used; the message is one sentence that names the file."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path} is damaged: {reason}.")
        self.path, self.reason = path, reason


def data_dir() -> Path:
    if env := os.environ.get("PIXTRAL_MLX_DATA"):
        return Path(env).expanduser()
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "pixtral-mlx"
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "pixtral-mlx"


def _now() -> str:
    return datetime.now().isoformat(timespec="milliseconds")


@dataclass
class Turn:
    role: str  # "user", "assistant" or "tool" (a tool's result)
    text: str
    images: list[Attachment] = field(default_factory=list)
    finish: str | None = None  # "interrupted" for a reply stopped with Esc
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # an assistant's calls, in OpenAI form
    tool_call_id: str | None = None  # for a "tool" turn: the call it answers
    reasoning: str = ""  # a reasoning model's thinking (saved as "reasoning_content", never sent back)

    def message(self) -> dict[str, Any]:
        """The OpenAI message (without pixtral-mlx's own keys such as "finish", and without the thinking: a
        conversation goes on from the answers alone)."""
        out: dict[str, Any] = {"role": self.role, "content": self.content()}
        if self.tool_calls:
            out["tool_calls"] = self.tool_calls
        if self.tool_call_id is not None:
            out["tool_call_id"] = self.tool_call_id
        return out

    def content(self) -> str | list[dict[str, Any]]:
        """OpenAI message content: images first, then the text."""
        if not self.images:
            return self.text
        text = [{"type": "text", "text": self.text}] if self.text else []
        return [a.part() for a in self.images] + text


@dataclass
class Conversation:
    id: str = field(default_factory=lambda: datetime.now().strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(2))
    turns: list[Turn] = field(default_factory=list)
    system: str | None = None
    model: str = ""
    created: str = field(default_factory=_now)
    updated: str = ""

    @property
    def title(self) -> str:
        for t in self.turns:
            if t.role == "user":
                text = " ".join(t.text.split()) or ", ".join(a.name for a in t.images)
                return text[:60] + ("…" if len(text) > 60 else "")
        return "New chat"

    def missing_images(self) -> list[Attachment]:
        """Images of the history whose file is gone (deleted from images/ since they were sent)."""
        return [a for t in self.turns for a in t.images if not a.path.is_file()]

    def drop_missing_images(self) -> list[str]:
        """Put a text marker in place of each missing image, so the history stays honest; return their names."""
        dropped = []
        for t in self.turns:
            gone = [a for a in t.images if not a.path.is_file()]
            if gone:
                t.images = [a for a in t.images if a.path.is_file()]
                t.text = "\n".join([*(MISSING.format(name=a.name) for a in gone), *([t.text] if t.text else [])])
                dropped += [a.name for a in gone]
        return dropped

    def messages(self) -> list[dict[str, Any]]:
        """OpenAI-format history for the engine (system prompt first)."""
        out: list[dict[str, Any]] = [{"role": "system", "content": self.system}] if self.system else []
        out += [t.message() for t in self.turns]
        return out


@dataclass
class Summary:
    id: str
    title: str
    updated: str
    turns: int
    images: int


def _kind(value: Any) -> str:
    """The JSON name of a value's type, for messages: "null", "a list", "a number"…"""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    names = {str: "a string", int: "a number", float: "a number", list: "a list", dict: "an object"}
    return names.get(type(value), type(value).__name__)


def _parse(doc: Any, path: Path, root: Path) -> Conversation:
    """Check a conversation file's JSON against the format `Store.save` writes; build the `Conversation`.

    Anything else raises `StorageError`: a file that fails here was not written by us (or was cut
    short), so nothing is guessed and the file is never rewritten.
    """

    def check(ok: bool, reason: str) -> None:
        if not ok:
            raise StorageError(path, reason)

    check(isinstance(doc, dict), f"it holds {_kind(doc)} where an object is expected")
    check(doc.get("format") == FORMAT, "it is not a pixtral-mlx conversation")
    version = doc.get("version", VERSION)
    check(isinstance(version, int) and not isinstance(version, bool), f"'version' is {_kind(version)}")
    check(version <= VERSION, f"it was written by a newer pixtral-mlx (format version {version})")
    check("id" in doc, "it has no 'id'")
    check(doc["id"] == path.stem, f"its 'id' ({doc['id']!r}) does not match the file name")
    for key in ("title", "model", "created", "updated"):
        check(isinstance(doc.get(key, ""), str), f"'{key}' is {_kind(doc.get(key))}, not a string")
    system = doc.get("system")
    check(system is None or isinstance(system, str), f"'system' is {_kind(system)}, not a string")
    check("messages" in doc, "it has no 'messages'")
    messages = doc["messages"]
    check(isinstance(messages, list), f"'messages' is {_kind(messages)}, not a list")
    turns = [_parse_turn(m, f"message {i}", check, root) for i, m in enumerate(messages, 1)]
    return Conversation(
        id=doc["id"],
        turns=turns,
        system=system,
        model=doc.get("model", ""),
        created=doc.get("created", ""),
        updated=doc.get("updated", ""),
    )


def _parse_tool_calls(calls: Any, where: str, check: Callable[[bool, str], None]) -> list[dict[str, Any]]:
    """An assistant message's `tool_calls`: a list of {"id", "type": "function", "function": {"name", "arguments"}}."""
    check(isinstance(calls, list), f"the tool_calls of {where} are {_kind(calls)}, not a list")
    for j, c in enumerate(calls, 1):
        call = f"tool call {j} of {where}"
        check(isinstance(c, dict), f"{call} is {_kind(c)}, not an object")
        check(isinstance(c.get("id", ""), str), f"the id of {call} is {_kind(c.get('id'))}")
        check(c.get("type", "function") == "function", f"{call} has the type {c.get('type')!r}")
        f = c.get("function")
        check(isinstance(f, dict), f"the function of {call} is {_kind(f)}, not an object")
        check(isinstance(f.get("name"), str) and bool(f["name"]), f"{call} has no function name")
        check(isinstance(f.get("arguments", ""), str), f"the arguments of {call} are {_kind(f.get('arguments'))}")
    return calls


def _parse_turn(m: Any, where: str, check: Callable[[bool, str], None], root: Path) -> Turn:
    check(isinstance(m, dict), f"{where} is {_kind(m)}, not an object")
    role = m.get("role")
    check(role in ("user", "assistant", "tool"), f"{where} has the role {role!r}")
    finish = m.get("finish")
    check(finish is None or isinstance(finish, str), f"the 'finish' of {where} is {_kind(finish)}")
    calls = _parse_tool_calls(m["tool_calls"], where, check) if "tool_calls" in m else []
    check(not calls or role == "assistant", f"{where} has tool_calls but the role {role!r}")
    call_id = m.get("tool_call_id")
    if role == "tool":
        check(isinstance(call_id, str), f"the tool_call_id of {where} is {_kind(call_id)}, not a string")
        check(isinstance(m.get("content"), str), f"the content of {where} is {_kind(m.get('content'))}, not a string")
    else:
        check(call_id is None, f"{where} has a tool_call_id but the role {role!r}")
    reasoning = m.get("reasoning_content", "")
    check(isinstance(reasoning, str), f"the reasoning_content of {where} is {_kind(reasoning)}, not a string")
    check(not reasoning or role == "assistant", f"{where} has reasoning_content but the role {role!r}")
    content = m.get("content")
    if content is None and calls:
        content = ""  # an assistant message that is only tool calls
    if isinstance(content, str):
        return Turn(role, content, finish=finish, tool_calls=calls, tool_call_id=call_id, reasoning=reasoning)
    check(isinstance(content, list), f"the content of {where} is {_kind(content)}, not a string or a list")
    text, images = "", []
    for j, p in enumerate(content, 1):
        part = f"part {j} of {where}"
        check(isinstance(p, dict), f"{part} is {_kind(p)}, not an object")
        if p.get("type") == "text":
            check(isinstance(p.get("text"), str), f"the text of {part} is {_kind(p.get('text'))}")
            text += p["text"]
            continue
        check(p.get("type") == "image_url", f"{part} has the type {p.get('type')!r}")
        url = p.get("image_url", {}).get("url") if isinstance(p.get("image_url"), dict) else None
        check(isinstance(url, str) and bool(url), f"{part} has no image URL")
        check(isinstance(p.get("name", ""), str), f"the name of {part} is {_kind(p.get('name'))}")
        for key in ("original_size", "size"):
            size = p.get(key, [0, 0])
            ok = isinstance(size, list) and len(size) == 2 and all(type(n) is int for n in size)
            check(ok, f"the {key} of {part} is not a [width, height] pair")
        check(type(p.get("tokens", 0)) is int, f"the token count of {part} is {_kind(p.get('tokens'))}")
        images.append(Attachment.from_json(p, root))
    return Turn(role, text, images, finish=finish, tool_calls=calls, reasoning=reasoning)


class Store:
    def __init__(self, root: Path | None = None):
        self.root = (Path(root) if root else data_dir()).expanduser().resolve()

    @property
    def conversations(self) -> Path:
        return self.root / "conversations"

    @property
    def images(self) -> Path:
        return self.root / "images"

    def store_image(self, att: Attachment) -> Attachment:
        """Copy the image into images/ under its content hash (once); return the stored copy."""
        if att.path.parent == self.images:
            return att
        self.images.mkdir(parents=True, exist_ok=True)
        digest = att.digest or file_digest(att.path)
        dest = self.images / f"{digest}{att.path.suffix.lower() or '.png'}"
        if not dest.exists():
            tmp = dest.with_suffix(dest.suffix + ".part")
            shutil.copyfile(att.path, tmp)
            tmp.replace(dest)
        return Attachment(dest, att.name, att.original_size, att.size, att.tokens, digest)

    def save(self, conv: Conversation) -> Path:
        """Write the conversation; `updated` changes only when the content did."""
        self.conversations.mkdir(parents=True, exist_ok=True)
        turns = []
        for t in conv.turns:
            stored = [self.store_image(a) for a in t.images]
            parts = [a.to_json(f"images/{a.path.name}") for a in stored]
            content: Any = parts + [{"type": "text", "text": t.text}] if parts else t.text
            own = {"finish": t.finish} if t.finish else {}
            if t.reasoning:
                own["reasoning_content"] = t.reasoning
            turns.append({**t.message(), "content": content, **own})
        doc = {
            "format": FORMAT,
            "version": VERSION,
            "id": conv.id,
            "title": conv.title,
            "model": conv.model,
            "system": conv.system,
            "created": conv.created,
            "updated": "",
            "messages": turns,
        }
        path = self.conversations / f"{conv.id}.json"
        try:
            old = json.loads(path.read_text(encoding="utf-8"))
            if isinstance(old, dict) and {**old, "updated": ""} == doc:
                conv.updated = old["updated"]
                return path
        except (OSError, ValueError):
            pass
        doc["updated"] = conv.updated = _now()
        tmp = path.with_suffix(".json.part")
        tmp.write_text(json.dumps(doc, indent=1, ensure_ascii=False), encoding="utf-8")
        tmp.replace(path)
        return path

    def load(self, conv_id: str) -> Conversation:
        """The saved conversation `conv_id`; raises `StorageError` (a `PixtralError`) naming a damaged file."""
        if not re.fullmatch(r"[\w-][\w.-]*", conv_id):
            raise PixtralError(f"{conv_id!r} is not a conversation id.")
        path = self.conversations / f"{conv_id}.json"
        if not path.is_file():
            raise PixtralError(f"there is no saved conversation {conv_id!r} in {self.conversations}.")
        return self._read(path)

    def scan(self) -> tuple[list[Summary], list[StorageError]]:
        """Saved conversations, most recently updated first, and the damaged files that were skipped."""
        out, damaged = [], []
        for path in sorted(self.conversations.glob("*.json")):
            try:
                conv = self._read(path)
            except StorageError as e:
                damaged.append(e)
                continue
            user_turns = sum(1 for t in conv.turns if t.role == "user")
            out.append(Summary(conv.id, conv.title, conv.updated, user_turns, sum(len(t.images) for t in conv.turns)))
        return sorted(out, key=lambda s: (s.updated, s.id), reverse=True), damaged

    def list(self) -> list[Summary]:
        """Saved conversations, most recently updated first; damaged files are left out (`scan` names them)."""
        return self.scan()[0]

    def _read(self, path: Path) -> Conversation:
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except OSError as e:
            raise StorageError(path, f"it cannot be read ({e.strerror or e})") from e
        except (ValueError, RecursionError) as e:  # JSONDecodeError, UnicodeDecodeError
            raise StorageError(path, f"it is not valid JSON ({e})") from e
        return _parse(doc, path, self.root)

    def kv_path(self, conv_id: str) -> Path:
        """The conversation's saved KV cache (mlx-lm's prompt-cache format), beside its JSON file."""
        return self.conversations / f"{conv_id}.kv.safetensors"

    def delete(self, conv_id: str) -> None:
        (self.conversations / f"{conv_id}.json").unlink(missing_ok=True)
        self.kv_path(conv_id).unlink(missing_ok=True)


def tool_call_text(call: dict[str, Any]) -> str:
    """A tool call as one line: `get_weather({"city": "Paris"})`."""
    f = call.get("function") or {}
    return f"{f.get('name', '?')}({f.get('arguments', '')})"


def to_markdown(conv: Conversation) -> str:
    lines = [f"# {conv.title}", ""]
    saved = conv.updated.replace("T", " ")[:16]
    meta = [f"model {conv.model}" if conv.model else "", f"saved {saved}" if saved else ""]
    lines += [f"*pixtral-mlx conversation{''.join(' · ' + m for m in meta if m)}*", ""]
    if conv.system:
        lines += ["## System", "", conv.system, ""]
    for t in conv.turns:
        if t.role == "tool":
            lines += ["## Tool result", "", "```", t.text, "```", ""]
            continue
        lines += ["## You" if t.role == "user" else "## Pixtral", ""]
        for a in t.images:
            lines += [f"![{a.name}]({a.path.as_uri()})", "", f"*{a.label()}*", ""]
        if t.reasoning:
            lines += ["<details><summary>Thinking</summary>", "", t.reasoning, "", "</details>", ""]
        if t.text:
            lines += [t.text, ""]
        lines += [f"→ `{tool_call_text(c)}`" for c in t.tool_calls] + ([""] if t.tool_calls else [])
        if t.finish == "interrupted":
            lines += ["*(stopped)*", ""]
    return "\n".join(lines)


def export_path(conv: Conversation, folder: Path) -> Path:
    """A new file name in `folder` made from the title: never overwrites."""
    slug = re.sub(r"[^\w-]+", "-", conv.title.lower()).strip("-")[:40] or "chat"
    path = folder / f"{slug}.md"
    n = 2
    while path.exists():
        path, n = folder / f"{slug}-{n}.md", n + 1
    return path
