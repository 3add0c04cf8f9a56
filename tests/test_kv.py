"""Quantized KV cache (kv_bits): closeness to the unquantized model, bytes, trimming; chat KV save and resume."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from pixtral_mlx.errors import PromptError

# The tiny checkpoint's heads are 32 wide: the group must divide them (Pixtral-12B's are 128 wide).
KV8 = {"kv_bits": 8, "kv_group_size": 32}
GREEDY = {"temperature": 0.0, "max_tokens": 10}


def noise(w, h, seed):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def parts(*items):
    return [{"type": "image", "image": i} if isinstance(i, Image.Image) else {"type": "text", "text": i} for i in items]


TURNS = [
    parts(noise(96, 64, 11), noise(48, 80, 12), "Compare them."),
    "Which is brighter?",
    parts("And this one?", noise(128, 40, 13)),
]


def last_logits(pixtral, messages, kv_bits=None, kv_group_size=32):
    """Last-position logits of a prefill into a (quantized) cache, in chunks as generation does."""
    import mlx.core as mx

    from pixtral_mlx.kvcache import make_layers

    prompt = pixtral.encode(messages)
    emb = pixtral.embeddings(prompt)
    layers = make_layers(pixtral.model, kv_bits, kv_group_size)
    tokens = mx.array(prompt.tokens)
    step, n = 128, len(prompt.tokens)
    for lo in range(0, n - 1, step):  # several chunks: later ones attend to quantized earlier keys
        hi = min(lo + step, n - 1)
        mx.eval(pixtral.model(tokens[lo:hi][None], cache=layers, input_embeddings=emb[lo:hi][None]))
    out = pixtral.model(tokens[n - 1 :][None], cache=layers, input_embeddings=emb[n - 1 :][None])
    return np.array(out[0, -1].astype(mx.float32))


def test_kv8_multi_image_chat_stays_close_to_unquantized(pixtral):
    """Metric: cosine of the last-position logits of every turn's prompt (bound 0.999; measured ≥0.999995 on the
    tiny model), and greedy agreement of the replies (the first 10 tokens of every turn are equal)."""
    plain, quant = pixtral.chat(**GREEDY), pixtral.chat(**GREEDY, **KV8)
    cosines = []
    for content in TURNS:
        a, b = plain.send(content), quant.send(content)
        assert b.tokens == a.tokens  # greedy agreement, every turn
        history = plain.messages[:-1]
        x, y = last_logits(pixtral, history), last_logits(pixtral, history, kv_bits=8)
        cosines.append(float(x @ y / np.linalg.norm(x) / np.linalg.norm(y)))
    assert min(cosines) > 0.999, cosines
    assert quant.cache.tokens == plain.cache.tokens  # same prefix reuse and trimming, quantized or not


def test_kv4_is_further_than_kv8_but_close(pixtral):
    """Measured on the tiny model: cosine 0.999996 at 8 bits, 0.99875 at 4 bits."""
    msgs = [{"role": "user", "content": TURNS[0]}]
    x = last_logits(pixtral, msgs)
    cos = {bits: float(x @ (y := last_logits(pixtral, msgs, bits)) / np.linalg.norm(x) / np.linalg.norm(y))
           for bits in (8, 4)}  # fmt: skip
    assert cos[4] < cos[8] and cos[4] > 0.99, cos


@pytest.mark.parametrize("bits", [8, 4])
def test_kv_bytes_shrink_by_the_expected_factor(pixtral, bits):
    """Each element: `bits` plus a scale and a bias (compute dtype, here float32) per group of 32, against 32."""
    from pixtral_mlx.memory import kv_allocated, kv_bytes_per_token

    msgs = [{"role": "user", "content": TURNS[0]}]
    plain, quant = pixtral.new_cache(), pixtral.new_cache(kv_bits=bits, kv_group_size=32)
    pixtral.generate(msgs, cache=plain, **GREEDY)
    pixtral.generate(msgs, cache=quant, **GREEDY)
    expected = (bits + 2 * 32 / 32) / 32
    assert quant.nbytes / plain.nbytes == pytest.approx(expected, rel=1e-12)
    t = pixtral.args.text
    for cache, b in ((plain, None), (quant, bits)):
        per_token = kv_bytes_per_token(t.num_hidden_layers, t.num_key_value_heads, t.head_dim, 4, b, 32)
        assert cache.nbytes == per_token * kv_allocated(cache.offset)  # what the memory plan counts


def test_quantized_cache_trims_for_regenerate_and_undo(pixtral):
    chat = pixtral.chat(temperature=1.0, max_tokens=8, **KV8)
    first = chat.send(parts(noise(64, 64, 3), "Tell me something."), seed=1)
    again = "".join(c.text for c in chat.regenerate(seed=1))
    assert again == first.text  # trimmed back to the prompt: same seed, same reply
    chat.send("Second.")
    chat.undo()
    follow = chat.send("Other.", temperature=0.0)
    fresh = pixtral.generate(chat.messages[:-1], temperature=0.0, max_tokens=8, **KV8)
    assert follow.tokens == fresh.tokens


def test_kv_options_are_checked(pixtral):
    with pytest.raises(PromptError) as e:
        pixtral.chat(kv_bits=3)
    assert e.value.param == "kv_bits"
    with pytest.raises(PromptError) as e:
        pixtral.new_cache(kv_bits=8, kv_group_size=48)
    assert e.value.param == "kv_group_size"
    with pytest.raises(PromptError, match="head size 32") as e:
        pixtral.chat(kv_bits=8)  # group 64 does not tile the tiny model's 32-wide heads
    assert e.value.param == "kv_group_size"
    with pytest.raises(PromptError, match="the cache's"):
        pixtral.stream([{"role": "user", "content": "hi"}], cache=pixtral.new_cache(), kv_bits=8, kv_group_size=32)


# Saving and resuming ----------------------------------------------------------------------------------
def two_turn_chat(pixtral, image_path, **kv):
    chat = pixtral.chat(**GREEDY, **kv)
    chat.send([{"type": "image_url", "image_url": {"url": str(image_path)}}, {"type": "text", "text": "Describe."}])
    chat.send(parts("Now compare with", noise(56, 72, 21)))
    return chat


@pytest.mark.parametrize("kv", [{}, KV8], ids=["fp32", "kv8"])
def test_saved_chat_resumes_without_prefill_and_replies_the_same(pixtral, tmp_path, kv):
    from pixtral_mlx.chat import Chat

    noise(80, 60, 20).save(tmp_path / "a.png")
    chat = two_turn_chat(pixtral, tmp_path / "a.png", **kv)
    path = chat.save(tmp_path / "chat.safetensors")
    resumed = Chat.load(pixtral, path)

    def texts(messages):
        return [(m["role"], [p.get("text") for p in m["content"]] if isinstance(m["content"], list) else m["content"])
                for m in messages]  # fmt: skip

    assert texts(resumed.messages) == texts(chat.messages)
    urls = [p["image_url"]["url"] for m in resumed.messages if isinstance(m["content"], list) for p in m["content"]
            if p["type"] == "image_url"]  # fmt: skip
    assert len(urls) == 2 and all(u.startswith("data:image/png;base64,") for u in urls)  # the file is the whole chat
    assert resumed.options == chat.options, (resumed.options, chat.options)
    assert resumed.context_used == chat.context_used
    assert resumed.resumed_tokens == len(resumed.cache.tokens) > 0
    runs = pixtral.vision_runs
    a, b = chat.send("Thanks, and the edges?"), resumed.send("Thanks, and the edges?")
    history = pixtral.encode(chat.messages[:-1]).tokens
    assert b.prompt_tokens == a.prompt_tokens < len(history) - resumed.resumed_tokens + 1
    assert b.tokens == a.tokens and b.text == a.text
    assert pixtral.vision_runs == runs  # no image encoded again


def test_cache_from_another_kv_setting_or_model_is_rebuilt(pixtral, tmp_path, mlx_dir):
    import mlx.core as mx

    import pixtral_mlx
    from pixtral_mlx.chat import Chat

    noise(80, 60, 20).save(tmp_path / "a.png")
    chat = two_turn_chat(pixtral, tmp_path / "a.png", **KV8)
    path = chat.save(tmp_path / "chat.safetensors")
    expected = pixtral.generate(chat.messages + [{"role": "user", "content": "More."}], **GREEDY)
    n_history = len(pixtral.encode(chat.messages + [{"role": "user", "content": "More."}]))

    other_kv = Chat.load(pixtral, path, kv_bits=None)
    assert other_kv.resumed_tokens == 0 and "kv bits" in other_kv.cache_note
    reply = other_kv.send("More.")
    assert reply.prompt_tokens == n_history and reply.tokens == expected.tokens

    # The same architecture and config with other weights: a different model.
    other_dir = tmp_path / "other"
    shutil.copytree(mlx_dir, other_dir)
    f = next(other_dir.glob("model-*.safetensors"))
    weights, metadata = mx.load(str(f), return_metadata=True)
    key = next(k for k in weights if k.endswith("lm_head.weight"))
    weights[key] = weights[key] * 1.5
    mx.save_safetensors(str(f), weights, metadata)
    other = pixtral_mlx.load(str(other_dir))
    moved = Chat.load(other, path)
    assert moved.resumed_tokens == 0 and "model" in moved.cache_note
    reply = moved.send("More.")
    assert reply.prompt_tokens == n_history
    assert reply.tokens == other.generate(moved.messages[:-1], **GREEDY, **KV8).tokens


def test_changed_image_is_prefilled_again(pixtral, tmp_path):
    """Same size, other pixels: the same tokens, but the cache before that image is all that is reused."""
    from pixtral_mlx.kvcache import image_starts

    noise(80, 60, 20).save(tmp_path / "a.png")
    chat = two_turn_chat(pixtral, tmp_path / "a.png")
    path = chat.save(tmp_path / "chat.safetensors")
    noise(80, 60, 99).save(tmp_path / "a.png")  # overwritten in place
    resumed = pixtral.chat(**GREEDY)
    resumed.restore(chat.messages)  # the history names the file (as the chat app's does); a saved chat holds a copy
    resumed.load_cache(path)
    args = pixtral.args
    assert resumed.resumed_tokens == image_starts(chat.cache.tokens, args.image_token_id, args.image_break_token_id)[0]
    reply = resumed.send("More.")
    assert reply.tokens == pixtral.generate(resumed.messages[:-1], **GREEDY).tokens


def test_not_a_kv_file(pixtral, tmp_path):
    from pixtral_mlx.chat import Chat

    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(PromptError, match="not a pixtral-mlx chat KV file"):
        Chat.load(pixtral, tmp_path / "junk.safetensors")
    with pytest.raises(PromptError, match="no such file"):
        Chat.load(pixtral, tmp_path / "missing.safetensors")
    chat = pixtral.chat(**GREEDY)
    chat.restore([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    assert chat.load_cache(tmp_path / "junk.safetensors") == 0 and "not a pixtral-mlx" in chat.cache_note
