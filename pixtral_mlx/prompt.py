"""Prompts: OpenAI-format messages -> tokens and pixel arrays, through mistral_common.

mistral_common is Mistral's own implementation of the chat layout (`[INST]`, the `[IMG]` grid with
`[IMG_BREAK]`/`[IMG_END]`, the system prompt, image-first reordering, tool calls) of each tokenizer version,
and of the image resize; we call it rather than re-implement it. The tokenizer is the model folder's file:
`tekken.json` (Pixtral-12B's v3, the Mistral3 family's v7/v11/v13) or a SentencePiece `*.model.v7m1`
(Pixtral-Large), its version and image settings read from the file (`tokenizer_file` finds it). What we add:
our image loader (EXIF, limits, one-sentence errors), an optional smaller longest-edge cap, per-image
size/token reports, the model's default system prompt (a repo's `SYSTEM_PROMPT.txt`, dates filled in at
encode time) and streaming detokenizers for both tokenizer kinds.
"""

from __future__ import annotations

import codecs
import contextlib
import datetime
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from .config import MAX_EDGE, bundled_tekken, check_model_edge
from .errors import ImageError, PromptError
from .images import load_image


@dataclass
class EncodedImage:
    pixels: np.ndarray  # float32 (3, H, W), normalized, as mistral_common returns it
    name: str
    original_size: tuple[int, int]  # (width, height) after EXIF orientation
    grid: tuple[int, int]  # (rows, cols) of [IMG] tokens: of 16-px patches (Pixtral), of 2x2 14-px patches (Mistral3)
    n_tokens: int  # rows * (cols + 1): one [IMG] per grid cell plus one break/end per row
    merge: int = 1  # the model's spatial_merge_size: each [IMG] stands for merge x merge encoder patches
    digest: str = field(init=False)  # the vision-feature cache key: the pixels' content, never the path

    def __post_init__(self) -> None:
        h = hashlib.blake2b(self.pixels.tobytes(), digest_size=16)
        h.update(str(self.pixels.shape).encode())
        self.digest = h.hexdigest()

    @property
    def patches(self) -> int:
        """How many patches the vision encoder sees for this image (before any merging)."""
        return self.grid[0] * self.grid[1] * self.merge * self.merge

    @property
    def size(self) -> tuple[int, int]:
        return self.pixels.shape[2], self.pixels.shape[1]

    def summary(self) -> str:
        (w0, h0), (w, h) = self.original_size, self.size
        return f"{self.name} {w0}×{h0} → {w}×{h}, {self.n_tokens:,} tokens"


@dataclass
class Prompt:
    tokens: list[int]
    images: list[EncodedImage] = field(default_factory=list)
    # what it was encoded from, so a turn whose options carry tools can encode them in (`PromptEncoder.retool`)
    messages: list[dict[str, Any]] | None = field(default=None, repr=False)
    max_edge: int | None = None
    tools: Any = None  # (tools, tool_choice, parallel_tool_calls) it was encoded with; None: none

    def __len__(self) -> int:
        return len(self.tokens)


def _image_part(part: dict[str, Any]) -> Any:
    if part.get("type") == "image":
        return part.get("image")
    url = part.get("image_url")
    return url.get("url") if isinstance(url, dict) else url


def _load(part: dict[str, Any]) -> tuple[Image.Image, str]:
    """The part's image, RGB; a PIL image part may carry the `name` it was read from."""
    img, name = load_image(_image_part(part))
    return img, str(part.get("name") or name)


def _content_chunks(content: Any, images: list[tuple[Image.Image, str]]) -> Any:
    from mistral_common.protocol.instruct.messages import ImageChunk, TextChunk

    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise PromptError("message content must be a string or a list of parts.")
    chunks = []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text":
            chunks.append(TextChunk(text=str(part.get("text", ""))))
        elif kind in ("image_url", "image"):
            img, name = _load(part)
            images.append((img, name))
            chunks.append(ImageChunk(image=img))
        else:
            raise PromptError(f"unsupported content part {kind!r} (use 'text', 'image_url' or 'image').")
    return chunks


def _text_of(content: Any, role: str, sep: str = "") -> str:
    """The text of an assistant or system message (a string, or a list of text parts)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list) or not all(isinstance(p, dict) for p in content):
        raise PromptError(f"{role} message content must be a string or a list of text parts.")
    return sep.join(str(p.get("text", "")) for p in content)


def to_mistral_messages(messages: list[dict[str, Any]]) -> tuple[list[Any], list[tuple[Image.Image, str]]]:
    """OpenAI chat messages -> mistral_common messages, loading every image once. Assistant `tool_calls` and
    `tool` messages become its `ToolCall`s and `ToolMessage`s (ids mapped by `tools.mistral_id`)."""
    from mistral_common.protocol.instruct.messages import AssistantMessage, SystemMessage, ToolMessage, UserMessage

    from .tools import mistral_id, mistral_tool_calls

    out: list[Any] = []
    images: list[tuple[Image.Image, str]] = []
    for m in messages:
        if not isinstance(m, dict):
            raise PromptError(f"each message must be a {{'role', 'content'}} dict, not {type(m).__name__}.")
        role = m.get("role")
        content = m.get("content", "")
        if role == "user":
            out.append(UserMessage(content=_content_chunks(content, images)))
        elif role == "assistant":
            calls = m.get("tool_calls")
            text = _text_of(content, role) if content is not None else None
            if calls:
                out.append(AssistantMessage(content=text or None, tool_calls=mistral_tool_calls(calls)))
            else:
                out.append(AssistantMessage(content=text or ""))
        elif role == "system":
            out.append(SystemMessage(content=_text_of(content, role, "\n\n")))
        elif role == "tool":
            if m.get("tool_call_id") is None:
                raise PromptError("a tool message needs the tool_call_id of the call it answers.")
            text = _text_of(content if content is not None else "", role)
            out.append(ToolMessage(content=text, tool_call_id=mistral_id(m["tool_call_id"])))
        else:
            raise PromptError(f"unsupported message role {role!r}.")
    if not out or not isinstance(out[-1], (UserMessage, ToolMessage)):
        raise PromptError("the last message must come from the user (or be a tool's result).")
    return out, images


# A SentencePiece file of Mistral's names a version (`tokenizer.model.v7m1`); a bare `tokenizer.model` (Hugging
# Face's) does not, and mistral_common would read it as v1, so it is not taken.
_SPM_NAME = re.compile(r".+\.model\.v\d+(m\d+)?$")
SYSTEM_PROMPT_FILE = "SYSTEM_PROMPT.txt"
PLACEHOLDERS = ("{today}", "{yesterday}", "{name}")


def tokenizer_file(folder: str | Path) -> Path | None:
    """The folder's Mistral tokenizer, as mistral_common picks one from a repo (`get_one_valid_tokenizer_file`):
    `tekken.json`, else a versioned SentencePiece file (`*.model.v7m1`, `*.model.v3` ...); None if it has none."""
    from mistral_common.tokens.tokenizers.utils import get_one_valid_tokenizer_file

    folder = Path(folder)
    names = [p.name for p in folder.iterdir() if p.name == "tekken.json" or _SPM_NAME.match(p.name)]
    if not names:
        return None
    return folder / get_one_valid_tokenizer_file(sorted(names))


def today() -> datetime.date:
    """The date `{today}` stands for (tests patch it)."""
    return datetime.date.today()


def fill_system_prompt(template: str, name: str = "") -> str:
    """A SYSTEM_PROMPT.txt with its placeholders filled as the model cards do: `{today}` and `{yesterday}` as
    YYYY-MM-DD, `{name}` the model's name. Only these: any other brace is text and stays as it is."""
    day = today()
    values = {
        "{today}": day.isoformat(),
        "{yesterday}": (day - datetime.timedelta(days=1)).isoformat(),
        "{name}": name,
    }
    return re.sub("|".join(re.escape(k) for k in PLACEHOLDERS), lambda m: values[m[0]], template)


class SentencePieceText:
    """mistral_common's `SentencePieceTokenizer` (Pixtral-Large's) with the few methods of its `Tekkenizer` that
    the runtime uses on token ids: `num_special_tokens` (every id below it is special: SentencePiece puts
    `<unk>` and the control tokens first), `id_to_byte_piece` and a `get_special_token` that raises for a token
    it lacks (SentencePiece answers `<unk>`'s id). Everything else is the tokenizer's own."""

    def __init__(self, spm: Any):
        self.spm = spm
        self.num_special_tokens = max(spm.special_ids) + 1

    def __getattr__(self, name: str) -> Any:
        if name == "spm":  # not yet set (a copy being made)
            raise AttributeError(name)
        return getattr(self.spm, name)

    def get_special_token(self, piece: str) -> int:
        token = self.spm.get_special_token(piece)
        if token >= self.num_special_tokens or self.spm.id_to_piece(token) != piece:
            raise ValueError(f"{piece} is not a special token of this tokenizer")
        return int(token)

    def is_byte(self, token: int) -> bool:
        return bool(self.spm._model.IsByte(token))

    def id_to_byte_piece(self, token: int) -> bytes:
        """The bytes a token stands for: a byte token's byte, a piece's text with `▁` as a space; a special
        token none."""
        if token < self.num_special_tokens:
            return b""
        piece = self.spm.id_to_piece(token)
        if self.is_byte(token):
            return bytes([int(piece[3:5], 16)])  # <0xNN>
        return piece.replace("\u2581", " ").encode()


class PromptEncoder:
    """Holds the tokenizer (tekken, or SentencePiece for Pixtral-Large); turns messages into a `Prompt`.

    The image settings are the model's where it gives them (`patch_size`, `spatial_merge_size`: what its
    vision encoder and projector expect) and the tokenizer file's otherwise; a tokenizer that disagrees
    (the bundled Pixtral-12B tekken standing in for a peer folder without one) gets the model's. `image_size`
    is the model's largest image edge, the default cap.

    `system_prompt`: the model's default system prompt (a repo's SYSTEM_PROMPT.txt, placeholders unfilled),
    used when the messages hold no system message; `name` fills its `{name}`.
    """

    def __init__(
        self,
        tekken_path: str | Path | None = None,
        image_size: int = MAX_EDGE,
        patch_size: int | None = None,
        spatial_merge_size: int | None = None,
        system_prompt: str | None = None,
        name: str = "",
    ):
        from mistral_common.tokens.tokenizers.image import ImageConfig
        from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
        from mistral_common.tokens.tokenizers.sentencepiece import is_sentencepiece_tokenizer

        self.tokenizer = MistralTokenizer.from_file(str(tekken_path or bundled_tekken()))
        self.image_encoder = self.tokenizer.instruct_tokenizer.image_encoder
        if self.image_encoder is None:
            raise PromptError(f"{tekken_path} is a text-only tokenizer; Pixtral needs a multimodal one.")
        old = self.image_encoder.image_config
        patch = patch_size or old.image_patch_size
        merge = spatial_merge_size or old.spatial_merge_size
        if (patch, merge) != (old.image_patch_size, old.spatial_merge_size):
            self.image_encoder.image_config = ImageConfig(patch, image_size, merge)
        self.image_size = image_size
        text = self.tokenizer.instruct_tokenizer.tokenizer
        self.sentencepiece = is_sentencepiece_tokenizer(text)
        self.text = SentencePieceText(text) if self.sentencepiece else text
        self.eos_id = self.text.eos_id
        self.bos_id = self.text.bos_id
        self.system_prompt = system_prompt
        self.name = name

    def image_token_ids(self) -> tuple[int, int, int]:
        """The ids of `[IMG]`, `[IMG_BREAK]` and `[IMG_END]` in this tokenizer (10, 12, 13 in tekken; 10, 14, 15
        in Pixtral-Large's SentencePiece), as its image encoder lays them out."""
        ids = self.image_encoder.special_ids
        return int(ids.img), int(ids.img_break), int(ids.img_end)

    def default_system(self) -> str | None:
        """The default system prompt as of today, or None without one."""
        return None if self.system_prompt is None else fill_system_prompt(self.system_prompt, self.name)

    def system_prompt_summary(self, messages: list[dict[str, Any]]) -> str:
        """Which system prompt `encode` uses for `messages`, in words (`describe --dry-run`)."""
        given = [m for m in messages if isinstance(m, dict) and m.get("role") == "system"]
        if given:
            chars = sum(len(_text_of(m.get("content", ""), "system", "\n\n")) for m in given)
            return f"given ({chars:,} chars)"
        default = self.default_system()
        return "none" if default is None else f"{SYSTEM_PROMPT_FILE} ({len(default):,} chars)"

    @contextlib.contextmanager
    def _max_edge(self, max_edge: int | None) -> Iterator[None]:
        from mistral_common.tokens.tokenizers.image import ImageConfig

        old = self.image_encoder.image_config
        if check_model_edge(max_edge, self.image_size) is not None:
            self.image_encoder.image_config = ImageConfig(old.image_patch_size, int(max_edge), old.spatial_merge_size)
        try:
            yield
        finally:
            self.image_encoder.image_config = old

    def encode(
        self,
        messages: list[dict[str, Any]],
        max_edge: int | None = None,
        tools: Any = None,
        tool_choice: Any = None,
        parallel_tool_calls: bool = True,
    ) -> Prompt:
        """The prompt of `messages` (with `tools`, OpenAI function tools already checked by `Options`)."""
        from mistral_common.protocol.instruct.request import ChatCompletionRequest

        from .tools import mistral_tool_choice, mistral_tools

        if not isinstance(messages, list) or not messages:
            raise PromptError("messages must be a non-empty list of {'role', 'content'} dicts.")
        default = self.default_system()
        if default is not None and not any(isinstance(m, dict) and m.get("role") == "system" for m in messages):
            messages_in = [{"role": "system", "content": default}, *messages]
        else:
            messages_in = messages
        msgs, loaded = to_mistral_messages(messages_in)
        with self._max_edge(max_edge):
            try:
                request = ChatCompletionRequest(
                    messages=msgs,
                    tools=mistral_tools(tools),
                    tool_choice=mistral_tool_choice(tool_choice),
                    parallel_tool_calls=parallel_tool_calls,
                )
                tok = self._encode_request(request)
            except ImageError:
                raise
            except Exception as e:  # mistral_common validation errors
                raise PromptError(f"these messages cannot be encoded: {e}") from e
        config = self.image_encoder.image_config
        merge = config.spatial_merge_size
        cell = config.image_patch_size * merge  # pixels per [IMG] token along each side
        images = []
        # mistral_common's image-first quirk moves only a lone image, so images keep their order.
        for pixels, (img, name) in zip(tok.images, loaded):
            rows, cols = pixels.shape[1] // cell, pixels.shape[2] // cell
            images.append(
                EncodedImage(
                    pixels=np.ascontiguousarray(pixels, dtype=np.float32),
                    name=name,
                    original_size=img.size,
                    grid=(rows, cols),
                    n_tokens=rows * (cols + 1),
                    merge=merge,
                )
            )
        key = (tools, tool_choice, parallel_tool_calls) if tools else None
        return Prompt(tokens=list(tok.tokens), images=images, messages=messages, max_edge=max_edge, tools=key)

    def _encode_request(self, request: Any) -> Any:
        """mistral_common's encoding of `request`, a system message after an assistant turn placed as the
        tokenizer version does: before v7 every system message joins the one system prompt (on the last user
        message) wherever it stands, so moving them first changes no token; from v7 each is a `[SYSTEM_PROMPT]`
        block in place, so the request is validated with them first and encoded in its own order."""
        from mistral_common.protocol.instruct.messages import SystemMessage
        from mistral_common.tokens.tokenizers.base import TokenizerVersion

        msgs = request.messages
        systems = [m for m in msgs if isinstance(m, SystemMessage)]
        first = systems + [m for m in msgs if not isinstance(m, SystemMessage)]
        if first == msgs:
            return self.tokenizer.encode_chat_completion(request)
        reordered = request.model_copy(update={"messages": first})
        if self.text.version < TokenizerVersion.v7:
            return self.tokenizer.encode_chat_completion(reordered)
        validated = self.tokenizer._chat_completion_request_validator.validate_request(reordered)
        in_place = validated.model_copy(update={"messages": msgs})
        instruct = self.tokenizer._instruct_request_normalizer.from_chat_completion_request(in_place)
        return self.tokenizer.instruct_tokenizer.encode_instruct(instruct)

    def retool(self, prompt: Prompt, options: Any) -> Prompt:
        """`prompt` encoded again, in place, with the tools of `options` when it was encoded without them (the
        server and `stream` encode messages before the turn's options are applied); unchanged otherwise."""
        key = (options.tools, options.tool_choice, options.parallel_tool_calls) if options.tools else None
        if key == prompt.tools:
            return prompt
        if prompt.messages is None:
            raise PromptError("a Prompt built by hand cannot take tools: pass the messages instead.", param="tools")
        new = self.encode(prompt.messages, prompt.max_edge, *(key or (None, None, True)))
        prompt.tokens, prompt.images, prompt.tools = new.tokens, new.images, new.tools
        return prompt

    def decode(self, tokens: list[int]) -> str:
        return self.text.decode(tokens)

    def detokenizer(self) -> StreamingDetokenizer | SentencePieceDetokenizer:
        return SentencePieceDetokenizer(self.text) if self.sentencepiece else StreamingDetokenizer(self.text)


class StreamingDetokenizer:
    """Byte-level incremental decoding: emits text only once a UTF-8 character is complete."""

    def __init__(self, tekken: Any):
        self.tekken = tekken
        self.n_special = tekken.num_special_tokens
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.text = ""

    def add(self, token: int) -> str:
        if token < self.n_special:
            return ""
        piece = self.decoder.decode(self.tekken.id_to_byte_piece(token))
        self.text += piece
        return piece

    def flush(self) -> str:
        piece = self.decoder.decode(b"", final=True)
        self.text += piece
        return piece


class SentencePieceDetokenizer:
    """Incremental decoding for a SentencePiece tokenizer whose text equals its `decode` of all the tokens.

    SentencePiece's decoding depends on context in two ways: the first piece loses its leading `▁`, and a run
    of byte tokens (`<0xNN>`) is decoded together, each invalid byte as U+FFFD. So the text comes from
    SentencePiece itself: the tokens since the last plain piece (the anchor) are decoded after that piece,
    whose own text is then cut off. Text is emitted once the run of byte tokens at the end forms whole UTF-8
    characters (or a plain piece ends it); `flush` emits the rest. `tekken` is the tokenizer (the name the
    tekken detokenizer's users read)."""

    def __init__(self, text: SentencePieceText):
        self.tekken = text
        self.anchor: list[int] = []  # the last plain piece, once one was emitted
        self.window: list[int] = []  # tokens since the anchor
        self.sent = 0  # characters of the window's text emitted
        self.text = ""

    def _emit(self) -> str:
        decode = self.tekken.spm._model.decode
        text = decode(self.anchor + self.window)[len(decode(self.anchor)) if self.anchor else 0 :]
        piece = text[self.sent :]
        self.sent = len(text)
        self.text += piece
        return piece

    def add(self, token: int) -> str:
        self.window.append(token)
        if self.tekken.is_special(token):  # a control token: no text (`<unk>` is not one: it shows as ⁇)
            return ""
        if self.tekken.is_byte(token):
            run = bytearray()
            for t in reversed(self.window):
                if not self.tekken.is_byte(t):
                    break
                run[:0] = self.tekken.id_to_byte_piece(t)
            try:
                run.decode("utf-8")
            except UnicodeDecodeError:
                return ""  # a character still incomplete (or invalid bytes: SentencePiece decides at the end)
            return self._emit()
        piece = self._emit()
        self.anchor, self.window, self.sent = [token], [], 0
        return piece

    def flush(self) -> str:
        return self._emit()
