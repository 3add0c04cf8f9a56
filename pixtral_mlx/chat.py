"""Multi-turn conversations that keep their KV cache and image features across turns.

Each turn encodes the whole history with mistral_common (so the tokens are exactly the reference
layout) and runs it through the model's one turn path on the chat's own `PromptCache`, which
prefills only what differs from the tokens already cached. Regenerate and undo are edits of
`messages`; the prefix match trims what changed.
Note: tekken v3 puts the system prompt before the *last* user message, so with a system prompt each
turn re-prefills the text from the last user message on (image features stay cached).
Messages are checked on the way in (`check_messages`, `check_content`): a bad shape is a one-sentence
`PromptError`, never a `TypeError` from deep inside.
"""

from __future__ import annotations

import os
import reprlib
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import PromptError
from .generate import Chunk, Options, Reply, collect, prompt_keys

if TYPE_CHECKING:
    from .memory import MemoryPlan
    from .prompt import Prompt

ROLES = ("system", "user", "assistant", "tool")


def _kind(value: Any) -> str:
    return "None" if value is None else type(value).__name__


def check_content(content: Any, role: str = "user", where: str = "the message content") -> None:
    """PromptError unless `content` is a string or a list of part dicts (a user's: text and image parts)."""
    if isinstance(content, str):
        return
    if not isinstance(content, list):
        raise PromptError(f"{where} must be a string or a list of parts, not {_kind(content)}.")
    for i, part in enumerate(content, 1):
        if not isinstance(part, dict):
            raise PromptError(f"part {i} of {where} must be a dict, not {_kind(part)}.")
        kind = part.get("type")
        if role == "user" and kind not in ("text", "image_url", "image"):
            use = "use 'text', 'image_url' or 'image'"
            raise PromptError(f"part {i} of {where} has the type {reprlib.repr(kind)}; {use}.")
        if not isinstance(part.get("text", ""), str):
            raise PromptError(f"the text of part {i} of {where} must be a string, not {_kind(part['text'])}.")


def check_messages(messages: Any) -> list[dict[str, Any]]:
    """`messages` as a new list, or PromptError when one is not a {'role', 'content'} dict of the right types."""
    if not isinstance(messages, (list, tuple)):
        raise PromptError(f"messages must be a list of {{'role', 'content'}} dicts, not {_kind(messages)}.")
    for i, m in enumerate(messages, 1):
        if not isinstance(m, dict):
            raise PromptError(f"message {i} must be a {{'role', 'content'}} dict, not {_kind(m)}.")
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            use = "use 'system', 'user', 'assistant' or 'tool'"
            raise PromptError(f"message {i} has the role {reprlib.repr(role)}; {use}.")
        content = m.get("content", "")
        if content is None and (m.get("tool_calls") or role == "tool"):
            content = ""  # an assistant message that is only tool calls
        check_content(content, role, f"the content of message {i}")
        if m.get("tool_calls") is not None and not isinstance(m["tool_calls"], list):
            raise PromptError(f"the tool_calls of message {i} must be a list, not {_kind(m['tool_calls'])}.")
    return list(messages)


class Chat:
    """A conversation: `messages`, the KV cache of what the model has read (`cache`) and the default `options`
    of its turns. `pixtral` is the `Pixtral` it runs on (its `plan_turn`/`run_turn`, encoder and features)."""

    def __init__(self, pixtral: Any, system: str | None = None, options: Options | None = None, **overrides: Any):
        self.pixtral = pixtral
        self.messages: list[dict[str, Any]] = []
        if system:
            self.messages.append({"role": "system", "content": system})
        self.options = Options.of(options, **overrides)
        self.cache = pixtral.new_cache(self.options.kv_bits, self.options.kv_group_size)
        self.context_used = 0  # tokens of the history after the last turn
        self.last_finish: str | None = None  # "stop", "length" or "interrupted"
        self.resumed_tokens = 0  # tokens `load_cache` adopted from a saved KV cache
        self.cache_note = ""  # why a saved KV cache was not used
        self.last_tool_calls: list[dict[str, Any]] = []  # the last reply's tool calls (with `tools`)

    @property
    def max_edge(self) -> int | None:
        return self.options.max_edge

    # Public API --------------------------------------------------------------------------------
    def send(self, content: Any, options: Options | None = None, **overrides: Any) -> Reply:
        """Add a user message and return the whole reply (options as in `stream`); with `tools` a reply that
        calls them carries `tool_calls` (and `finish_reason` "tool_calls")."""
        return self._collect(self.stream(content, options, **overrides))

    def send_tool_results(self, results: dict[str, Any], options: Options | None = None, **overrides: Any) -> Reply:
        """Answer the last reply's tool calls: `results` maps each call's id to its result (a string, or any
        JSON value), added as `tool` messages; then return the model's next reply (options as in `stream`)."""
        import json

        if not isinstance(results, dict) or not results:
            raise PromptError("results must map tool call ids to their results.")
        added = 0
        for call_id, result in results.items():
            text = result if isinstance(result, str) else json.dumps(result, ensure_ascii=False)
            self.messages.append({"role": "tool", "tool_call_id": call_id, "content": text})
            added += 1
        try:
            chunks = self._turn(self._options(options, overrides))
        except Exception:
            del self.messages[-added:]
            raise
        return self._collect(chunks)

    def _collect(self, chunks: Iterator[Chunk]) -> Reply:
        reply = collect(chunks)
        if self.last_tool_calls:
            reply.tool_calls = [dict(c) for c in self.last_tool_calls]
            reply.finish_reason = "tool_calls"
        return reply

    def stream(self, content: Any, options: Options | None = None, **overrides: Any) -> Iterator[Chunk]:
        """Add a user message and stream the reply; `options` (an `Options`, replacing the chat's) and options
        by name override the chat's for this turn (the KV setting and `max_edge` stay the chat's).

        A turn that cannot start (bad image, over the context, bad option) raises here and leaves the
        history unchanged.
        """
        options = self._options(options, overrides)
        check_content(content)
        self.messages.append({"role": "user", "content": content})
        try:
            return self._turn(options)
        except Exception:
            self.messages.pop()
            raise

    def regenerate(self, options: Options | None = None, **overrides: Any) -> Iterator[Chunk]:
        """Replace the last reply with a new one (options as in `stream`)."""
        if not self.messages or self.messages[-1]["role"] != "assistant":
            raise PromptError("there is no reply to regenerate.")
        options = self._options(options, overrides)
        last = self.messages.pop()
        try:
            return self._turn(options)
        except Exception:
            self.messages.append(last)
            raise

    def undo(self) -> dict[str, Any] | None:
        """Remove the last user turn (and its reply); return the removed user message."""
        removed = None
        while self.messages and self.messages[-1]["role"] in ("assistant", "tool"):
            self.messages.pop()
        if self.messages and self.messages[-1]["role"] == "user":
            removed = self.messages.pop()
        self.context_used = self.history_tokens()
        return removed

    def reset(self) -> None:
        self.messages = [m for m in self.messages if m["role"] == "system"]
        self.cache = self.pixtral.new_cache(self.options.kv_bits, self.options.kv_group_size)
        self.context_used = 0

    def restore(self, messages: list[dict[str, Any]]) -> None:
        """Start from a saved history; the next turn prefills it once."""
        messages = check_messages(messages)
        self.reset()
        self.messages = messages
        self.context_used = self.history_tokens()

    def history_tokens(self) -> int:
        """Tokens the history uses on its own (0 for an empty chat)."""
        if not any(m["role"] != "system" for m in self.messages):
            return 0
        return max(self.tokens_needed("") - 2, 0)  # less the `[INST][/INST]` of an empty message

    def tokens_needed(self, content: Any) -> int:
        """How many tokens the history would use with `content` as the next user message."""
        check_content(content)
        return len(self.pixtral.encode(self.messages + [{"role": "user", "content": content}], max_edge=self.max_edge))

    def memory_plan(self, content: Any = "") -> MemoryPlan:
        """The memory plan of a next turn with `content` (by default the figures of the history alone)."""
        check_content(content)
        prompt = self.pixtral.encode(self.messages + [{"role": "user", "content": content}], max_edge=self.max_edge)
        return self.pixtral.memory_plan(prompt, self.options, cache=self.cache)

    # Saving and resuming the KV cache ----------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write the history and its KV cache (mlx-lm's prompt-cache format) to `path`, so that
        `Chat.load` resumes without prefilling it again; return the file written (`.safetensors` is appended
        to a name without it, as mlx does, and `Chat.load` finds it under the same name).

        Every image goes into the file as a data: URL, so loading it never reads another file or URL."""
        from . import kvcache

        tokens = self.cache.tokens
        # Each cached image's content digest, from the cache's own keys: the pixels its keys were computed from.
        digests = [key[0] for key in self.cache.keys if isinstance(key, tuple) and key[1] == 0]
        meta = {
            "version": kvcache.VERSION,
            "messages": kvcache.jsonable(self.messages),
            "max_edge": self.max_edge,
            "options": {k: getattr(self.options, k) for k in ("max_tokens", "temperature", "top_p", "seed")},
            "tokens": tokens,
            "context_used": self.context_used,
            "image_digests": digests,
            "tokens_sha256": kvcache.tokens_hash(tokens, digests),
            "fingerprint": kvcache.fingerprint(self.pixtral),
            "kv_bits": self.options.kv_bits,
            "kv_group_size": self.options.kv_group_size if self.options.kv_bits else None,
            "kv_dtype": kvcache.kv_dtype(self.pixtral.model),
        }
        return kvcache.write_file(path, self.cache.layers, meta)

    @classmethod
    def load(cls, pixtral: Any, path: str | os.PathLike, **kwargs: Any) -> Chat:
        """A chat with the history saved in `path`, resuming its KV cache when it was computed by this model
        with this KV setting (by default the file's) for these tokens; otherwise the next turn prefills the
        history again. Keyword arguments as for `Pixtral.chat` (by default the saved chat's);
        `resumed_tokens` says how many tokens were reused.

        The file is data: its images must be data: URLs (PromptError otherwise), so loading reads nothing else."""
        from . import kvcache

        meta = kvcache.read_meta(path)
        try:
            messages = check_messages(meta.get("messages", []))
        except PromptError as e:
            raise PromptError(f"{kvcache.resolve(path)} holds messages that cannot be used: {e}") from None
        kvcache.check_images(messages, kvcache.resolve(path))
        saved = meta.get("options") if isinstance(meta.get("options"), dict) else {}
        for key in ("max_tokens", "temperature", "top_p", "seed"):
            if key in saved:
                kwargs.setdefault(key, saved[key])
        if "kv_bits" not in kwargs:
            kwargs.update(kv_bits=meta.get("kv_bits"), kv_group_size=meta.get("kv_group_size") or 64)
        kwargs.setdefault("max_edge", meta.get("max_edge"))
        chat = cls(pixtral, **kwargs)
        chat.restore(messages)
        if type(meta.get("context_used")) is int and meta["context_used"] >= 0:
            chat.context_used = meta["context_used"]  # as counted live (a reply's tokens, not their re-encoding)
        chat.load_cache(path)
        return chat

    def load_cache(self, path: str | os.PathLike) -> int:
        """Adopt the KV cache saved in `path` for the current history, as far as it holds the same tokens and
        images; return how many tokens it saves prefilling (0 when it is unusable: `cache_note` says why)."""
        from . import kvcache
        from .generate import PromptCache, common_prefix

        found, reason = kvcache.read_file(path, self.pixtral, self.options.kv_bits, self.options.kv_group_size)
        self.resumed_tokens, self.cache_note = 0, reason
        if found is None:
            return 0
        layers, meta = found
        tokens = meta["tokens"]
        prompt = self.pixtral.encode(self.messages + [{"role": "user", "content": ""}], max_edge=self.max_edge)
        keep = common_prefix(tokens, prompt.tokens)
        args = self.pixtral.args
        digests = [img.digest for img in prompt.images]
        for i, start in enumerate(kvcache.image_starts(tokens, args.image_token_id, args.image_break_token_id)):
            saved = meta.get("image_digests") or []
            if i >= len(saved) or i >= len(digests) or saved[i] != digests[i]:
                keep = min(keep, start)  # same tokens, other pixels: never reuse that image's keys
                break
        cache = PromptCache(layers, self.options.kv_bits, self.options.kv_group_size)
        cache.tokens = list(tokens)
        # The images up to `keep` are the saved ones (digests checked above): their content keys hold too.
        cache.keys = prompt_keys(prompt.tokens, prompt.images, args.image_token_id)[:keep]
        cache.trim(keep)
        self.cache, self.resumed_tokens = cache, keep
        self.cache_note = "" if keep else "it holds none of this history"
        return keep

    # Internals ---------------------------------------------------------------------------------
    def _options(self, options: Options | None, overrides: dict[str, Any]) -> Options:
        """This turn's options: the chat's (or `options`) with the overrides; a turn that asks for its own JSON
        constraint (`json_schema`, or `json_object=True`) replaces the chat's rather than combining with it.
        The KV setting and `max_edge` belong to the conversation (its cache and its encoded history)."""
        base = self.options if options is None else Options.of(options)
        if overrides.get("json_schema") is not None or overrides.get("json_object"):
            base = replace(base, json_schema=None, json_object=False)
        fixed = {k: getattr(self.options, k) for k in ("kv_bits", "kv_group_size", "max_edge")}
        return replace(base.merge(**overrides), **fixed)

    def _turn(self, options: Options) -> Iterator[Chunk]:
        tic = time.perf_counter()
        prompt = self.pixtral.encode(self.messages, options=options)  # its max_edge and tools
        turn = self.pixtral.plan_turn(prompt, self.cache, options, context_used=self.context_used, start=tic)
        return self._record(prompt, self.pixtral.run_turn(turn), options)

    def _record(self, prompt: Prompt, chunks: Iterator[Chunk], options: Options | None = None) -> Iterator[Chunk]:
        """Pass the chunks on; at the end (or on a stop) the reply, partial or not, joins the history."""
        reply = Reply()
        try:
            for chunk in chunks:
                reply.add(chunk)
                yield chunk
        finally:
            chunks.close()  # type: ignore[attr-defined]
            from .reasoning import answer_tokens
            from .tools import calls_active, parse_tool_calls

            parsed = None
            if options is not None and calls_active(options) and reply.finish_reason == "stop":
                tekken = self.pixtral.encoder.text
                parsed = parse_tool_calls(tekken, answer_tokens(tekken, reply.tokens))  # the thinking is no content
            self.last_tool_calls = parsed[1] if parsed else []
            if parsed:
                self.messages.append({"role": "assistant", "content": parsed[0] or None, "tool_calls": parsed[1]})
            else:
                self.messages.append({"role": "assistant", "content": reply.text})
            self.last_finish = ("tool_calls" if parsed else reply.finish_reason) or "interrupted"
            stop = 1 if reply.finish_reason == "stop" else 0  # the </s> is in the context too
            self.context_used = len(prompt) + len(reply.tokens) + stop
