"""Pixtral-Large-Instruct-2411's tokenizer: SentencePiece v7m1 (mistral_common's
`mistral_instruct_tokenizer_241114.model.v7m1`) instead of tekken, with its own image token ids ([IMG]=10,
[IMG_BREAK]=14, [IMG_END]=15). A tiny random Pixtral-architecture checkpoint with a 32768-token vocabulary and
that tokenizer, in the official layout (converted) and the Hugging Face llava layout (loaded as is): prompts,
generation, streaming detokenization, tool-call parsing, and the one-sentence refusal of grammars."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import checkpoints
import numpy as np
import pytest
from PIL import Image

from pixtral_mlx.errors import PromptError

VOCAB = 32768


def spm_path() -> Path:
    import mistral_common

    return Path(mistral_common.__file__).parent / "data" / "mistral_instruct_tokenizer_241114.model.v7m1"


def reference():
    from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

    return MistralTokenizer.from_file(str(spm_path()))


def noise(w: int, h: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


IMAGES = [noise(100, 60, 1), noise(40, 70, 2)]
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": [{"type": "image", "image": IMAGES[0]}, {"type": "text", "text": "What is it?"}]},
    {"role": "assistant", "content": "A picture."},
    {"role": "user", "content": [{"type": "text", "text": "And this one?"}, {"type": "image", "image": IMAGES[1]}]},
]


def mistral_request():
    from mistral_common.protocol.instruct.messages import (
        AssistantMessage,
        ImageChunk,
        SystemMessage,
        TextChunk,
        UserMessage,
    )
    from mistral_common.protocol.instruct.request import ChatCompletionRequest

    return ChatCompletionRequest(
        messages=[
            SystemMessage(content="You are terse."),
            UserMessage(content=[ImageChunk(image=IMAGES[0]), TextChunk(text="What is it?")]),
            AssistantMessage(content="A picture."),
            UserMessage(content=[TextChunk(text="And this one?"), ImageChunk(image=IMAGES[1])]),
        ]
    )


@pytest.fixture(scope="module")
def large_model():
    return checkpoints.hf_model(seed=3, text={"vocab_size": VOCAB})


@pytest.fixture(scope="module")
def official_large(large_model, tmp_path_factory):
    """Mistral's layout: consolidated.safetensors + params.json (Pixtral-Large's image ids) + tokenizer.model.v7m1."""
    path = checkpoints.write_official_checkpoint(large_model, tmp_path_factory.mktemp("pl") / "official")
    (path / "tekken.json").unlink()
    shutil.copy(spm_path(), path / "tokenizer.model.v7m1")
    params = json.loads((path / "params.json").read_text())
    params["vision_encoder"].update(image_break_token_id=14, image_end_token_id=15)
    (path / "params.json").write_text(json.dumps(params))
    return path


@pytest.fixture(scope="module")
def large(official_large, tmp_path_factory):
    import pixtral_mlx
    from pixtral_mlx.convert import convert

    out = convert(official_large, tmp_path_factory.mktemp("pl") / "mlx", dtype="float32", progress=False)
    return pixtral_mlx.load(str(out))


@pytest.fixture(scope="module")
def hf_large(large_model, tmp_path_factory):
    """The Hugging Face llava layout (image_break_token_id absent from config.json: the tokenizer gives it)."""
    import pixtral_mlx

    path = checkpoints.write_hf_checkpoint(large_model, tmp_path_factory.mktemp("pl") / "hf")
    config = json.loads((path / "config.json").read_text())
    config["text_config"]["vocab_size"] = VOCAB  # not the default: a real config.json names it
    (path / "config.json").write_text(json.dumps(config))
    shutil.copy(spm_path(), path / "tokenizer.model.v7m1")
    return pixtral_mlx.load(str(path))


def test_official_layout_converts_with_its_tokenizer(large):
    names = {p.name for p in large.path.iterdir()}
    assert "tokenizer.model.v7m1" in names and "tekken.json" not in names
    assert large.encoder.sentencepiece and large.encoder.text.n_words == VOCAB
    assert large.encoder.image_token_ids() == (10, 14, 15)
    args = large.args
    assert (args.image_token_id, args.image_break_token_id, args.image_end_token_id) == (10, 14, 15)
    config = large.encoder.image_encoder.image_config
    assert (config.image_patch_size, config.max_image_size, config.spatial_merge_size) == (16, 1024, 1)


def test_prompt_equals_mistral_common(large):
    prompt = large.encode(MESSAGES)
    ref = reference().encode_chat_completion(mistral_request())
    assert prompt.tokens == ref.tokens
    assert len(prompt.images) == 2 and all(np.array_equal(a.pixels, b) for a, b in zip(prompt.images, ref.images))
    assert prompt.tokens[:2] == [1, 16] and prompt.tokens.index(17) < prompt.tokens.index(3)  # system, then [INST]
    # 100x60 px with 16-px patches: a 7x4 grid, rows ended by [IMG_BREAK]=14, the last by [IMG_END]=15
    first = prompt.tokens.index(10)
    assert prompt.tokens[first : first + 32] == ([10] * 7 + [14]) * 3 + [10] * 7 + [15]
    assert prompt.images[0].grid == (4, 7) and prompt.images[0].n_tokens == 32


def test_image_starts_use_the_tokenizers_break_id(large):
    from pixtral_mlx.kvcache import image_starts

    prompt = large.encode(MESSAGES)
    starts = image_starts(prompt.tokens, large.args.image_token_id, large.args.image_break_token_id)
    assert len(starts) == 2  # with tekken's 12 for [IMG_BREAK] every row would look like a new image


def test_hf_layout_loads_and_agrees(large, hf_large):
    assert hf_large.encoder.sentencepiece and hf_large.args.image_break_token_id == 14
    assert hf_large.encode(MESSAGES).tokens == large.encode(MESSAGES).tokens
    a, b = large.logits(MESSAGES), hf_large.logits(MESSAGES)
    assert np.allclose(a, b, atol=1e-4)


def test_logits_match_transformers(large, large_model):
    import torch

    prompt = large.encode(MESSAGES)
    with torch.no_grad():
        ref = large_model(
            input_ids=torch.tensor([prompt.tokens]), **checkpoints.transformers_image_inputs(prompt)
        ).logits[0]
    ours = large.logits(MESSAGES)
    assert np.abs(ours - ref.numpy()).max() < 2e-3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_generated_text_is_mistral_commons_decode(large, seed):
    ref = reference()
    streamed = "".join(c.text for c in large.stream(MESSAGES, temperature=1.0, seed=seed, max_tokens=24))
    reply = large.generate(MESSAGES, temperature=1.0, seed=seed, max_tokens=24)
    assert reply.tokens and reply.text == ref.decode(reply.tokens) == streamed
    assert all(t < VOCAB for t in reply.tokens)


def test_detokenizer_equals_decode_on_any_tokens(large):
    """Random runs of byte tokens (<0x..>, invalid UTF-8 included), control tokens, <unk> and pieces."""
    enc, ref = large.encoder, reference()
    rng = random.Random(0)
    for _ in range(400):
        tokens = []
        for _ in range(rng.randint(1, 24)):
            r = rng.random()
            tokens.append(
                rng.randint(771, 1026) if r < 0.4 else rng.randint(0, 770) if r < 0.5 else rng.randint(1027, VOCAB - 1)
            )
        detok = enc.detokenizer()
        assert "".join(detok.add(t) for t in tokens) + detok.flush() == ref.decode(tokens), tokens


def test_detokenizer_is_incremental_and_utf8_safe(large):
    enc = large.encoder
    text = "Héllo wörld — 日本語 🦩 ok\n  done"
    tokens = enc.text.encode(text, bos=False, eos=False)
    assert sum(enc.text.is_byte(t) for t in tokens) >= 4  # the flamingo falls back to its 4 UTF-8 bytes
    detok = enc.detokenizer()
    pieces = [detok.add(t) for t in tokens]
    assert "".join(pieces) + detok.flush() == text == enc.decode(tokens)
    assert "\ufffd" not in "".join(pieces) and sum(1 for p in pieces if p) > len(tokens) // 2
    emoji = [i for i, p in enumerate(pieces) if "🦩" in p]
    assert len(emoji) == 1 and all(pieces[i] == "" for i in range(emoji[0] - 3, emoji[0]))  # held until whole


def test_tool_calls_parse_in_the_v7_format(large):
    from pixtral_mlx.tools import parse_tool_calls

    text = large.encoder.text
    body = '[{"name": "get_weather", "arguments": {"city": "Paris"}}]'
    tokens = text.encode("Sure.", bos=False, eos=False) + [5] + text.encode(body, bos=False, eos=False) + [2]
    content, calls = parse_tool_calls(text, tokens)
    assert content == "Sure."
    assert [c["function"] for c in calls] == [{"name": "get_weather", "arguments": '{"city": "Paris"}'}]


def test_prompt_with_tools_equals_mistral_common(large):
    from mistral_common.protocol.instruct.messages import UserMessage
    from mistral_common.protocol.instruct.request import ChatCompletionRequest
    from mistral_common.protocol.instruct.tool_calls import Function, Tool

    params = {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather", "parameters": params}}]
    ours = large.encoder.encode([{"role": "user", "content": "Weather in Paris?"}], tools=tools).tokens
    request = ChatCompletionRequest(
        messages=[UserMessage(content="Weather in Paris?")],
        tools=[Tool(function=Function(name="get_weather", description="Weather", parameters=params))],
    )
    assert ours == reference().encode_chat_completion(request).tokens and 6 in ours  # [AVAILABLE_TOOLS]


def test_grammars_are_refused_in_one_sentence(large):
    with pytest.raises(PromptError, match="SentencePiece") as e:
        large.generate(MESSAGES, json_object=True, max_tokens=4)
    assert e.value.param == "json_schema"
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    with pytest.raises(PromptError, match="SentencePiece"):
        large.generate(MESSAGES, tools=tools, tool_choice="required", max_tokens=4)


def test_a_saved_chats_fingerprint_covers_the_sentencepiece_tokenizer(tmp_path):
    """A KV cache saved with one SentencePiece tokenizer is not reused with another: its file is fingerprinted
    as tekken.json is."""
    from types import SimpleNamespace

    from pixtral_mlx import kvcache

    prints = []
    for text in (b"one tokenizer", b"another tokenizer"):
        folder = tmp_path / text.decode().replace(" ", "-")
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        (folder / "tokenizer.model.v7m1").write_bytes(text)
        prints.append(kvcache.fingerprint(SimpleNamespace(path=folder)))
    assert prints[0] != prints[1]
