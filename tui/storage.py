"""Saved conversations: one JSON file each, images copied by content hash, Markdown export.

$PIXTRAL_MLX_DATA (or ~/Library/Application Support/pixtral-mlx, or $XDG_DATA_HOME/pixtral-mlx)
  conversations/<id>.json   messages in OpenAI format; image URLs relative to this folder
  images/<sha256>.<ext>     every image sent, stored once, so a chat survives the original moving
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from .attachments import Attachment, file_digest

FORMAT = "pixtral-mlx.conversation"
VERSION = 1


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
    role: str  # "user" or "assistant"
    text: str
    images: list[Attachment] = field(default_factory=list)
    finish: str | None = None  # "interrupted" for a reply stopped with Esc

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

    def messages(self) -> list[dict[str, Any]]:
        """OpenAI-format history for the engine (system prompt first)."""
        out: list[dict[str, Any]] = [{"role": "system", "content": self.system}] if self.system else []
        out += [{"role": t.role, "content": t.content()} for t in self.turns]
        return out


@dataclass
class Summary:
    id: str
    title: str
    updated: str
    turns: int
    images: int


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
            turns.append({"role": t.role, "content": content, **({"finish": t.finish} if t.finish else {})})
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
            if {**old, "updated": ""} == doc:
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
        path = self.conversations / f"{conv_id}.json"
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ValueError(f"there is no saved conversation {conv_id!r} in {self.conversations}.") from None
        except (OSError, json.JSONDecodeError) as e:
            raise ValueError(f"{path} cannot be read ({e}).") from e
        if doc.get("format") != FORMAT:
            raise ValueError(f"{path} is not a pixtral-mlx conversation.")
        turns = []
        for m in doc["messages"]:
            content = m["content"]
            if isinstance(content, str):
                turns.append(Turn(m["role"], content, finish=m.get("finish")))
                continue
            text = "".join(p.get("text", "") for p in content if p.get("type") == "text")
            images = [Attachment.from_json(p, self.root) for p in content if p.get("type") == "image_url"]
            turns.append(Turn(m["role"], text, images, finish=m.get("finish")))
        return Conversation(
            id=doc["id"],
            turns=turns,
            system=doc.get("system"),
            model=doc.get("model", ""),
            created=doc.get("created", ""),
            updated=doc.get("updated", ""),
        )

    def list(self) -> list[Summary]:
        """Saved conversations, most recently updated first."""
        out = []
        for path in self.conversations.glob("*.json"):
            try:
                doc = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, json.JSONDecodeError):
                continue
            msgs = doc.get("messages", [])
            n_images = sum(
                1
                for m in msgs
                if isinstance(m.get("content"), list)
                for p in m["content"]
                if p.get("type") == "image_url"
            )
            out.append(
                Summary(
                    doc.get("id", path.stem),
                    doc.get("title", ""),
                    doc.get("updated", ""),
                    sum(1 for m in msgs if m.get("role") == "user"),
                    n_images,
                )
            )
        return sorted(out, key=lambda s: (s.updated, s.id), reverse=True)

    def kv_path(self, conv_id: str) -> Path:
        """The conversation's saved KV cache (mlx-lm's prompt-cache format), beside its JSON file."""
        return self.conversations / f"{conv_id}.kv.safetensors"

    def delete(self, conv_id: str) -> None:
        (self.conversations / f"{conv_id}.json").unlink(missing_ok=True)
        self.kv_path(conv_id).unlink(missing_ok=True)


def to_markdown(conv: Conversation) -> str:
    lines = [f"# {conv.title}", ""]
    saved = conv.updated.replace("T", " ")[:16]
    meta = [f"model {conv.model}" if conv.model else "", f"saved {saved}" if saved else ""]
    lines += [f"*pixtral-mlx conversation{''.join(' · ' + m for m in meta if m)}*", ""]
    if conv.system:
        lines += ["## System", "", conv.system, ""]
    for t in conv.turns:
        lines += ["## You" if t.role == "user" else "## Pixtral", ""]
        for a in t.images:
            lines += [f"![{a.name}]({a.path.as_uri()})", "", f"*{a.label()}*", ""]
        if t.text:
            lines += [t.text, ""]
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
