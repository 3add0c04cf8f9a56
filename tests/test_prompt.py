"""Prompt encoding equals mistral_common.encode_chat_completion; image loading rules and errors."""

from __future__ import annotations

import base64
import io

import numpy as np
import pytest
from mistral_common.protocol.instruct.messages import (
    AssistantMessage,
    ImageChunk,
    SystemMessage,
    TextChunk,
    UserMessage,
)
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer
from PIL import Image

from pixtral_mlx.images import MAX_PIXELS, ImageError, load_image
from pixtral_mlx.prompt import PromptEncoder, PromptError, bundled_tekken


@pytest.fixture(scope="module")
def enc():
    return PromptEncoder()


@pytest.fixture(scope="module")
def mc():
    return MistralTokenizer.from_file(str(bundled_tekken()))


def img(w, h, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    if mode == "P":
        im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert("P")
        im.info["transparency"] = 0
        return im
    if mode == "L":
        return Image.fromarray(rng.integers(0, 256, (h, w), dtype=np.uint8), "L")
    if mode == "I;16":
        return Image.fromarray(rng.integers(0, 65536, (h, w), dtype=np.uint16))  # mode I;16
    c = {"RGB": 3, "RGBA": 4}[mode]
    return Image.fromarray(rng.integers(0, 256, (h, w, c), dtype=np.uint8), mode)


def reference(mc, messages):
    """The same conversation through mistral_common's own types."""
    out = []
    for m in messages:
        if m["role"] == "system":
            out.append(SystemMessage(content=m["content"]))
        elif m["role"] == "assistant":
            out.append(AssistantMessage(content=m["content"]))
        elif isinstance(m["content"], str):
            out.append(UserMessage(content=m["content"]))
        else:
            out.append(
                UserMessage(
                    content=[
                        ImageChunk(image=p["image"]) if p["type"] == "image" else TextChunk(text=p["text"])
                        for p in m["content"]
                    ]
                )
            )
    return mc.encode_chat_completion(ChatCompletionRequest(messages=out))


def u(*parts):
    return {
        "role": "user",
        "content": [
            {"type": "image", "image": p} if isinstance(p, Image.Image) else {"type": "text", "text": p} for p in parts
        ],
    }


CONVERSATIONS = {
    "single": [u(img(32, 48), "Describe.")],
    "text_only": [{"role": "user", "content": "Hello!"}],
    "multi_turn": [
        u(img(32, 48), "Describe."),
        {"role": "assistant", "content": "A noisy image."},
        {"role": "user", "content": "Thanks. What colors?"},
    ],
    "system": [
        {"role": "system", "content": "Be brief."},
        u(img(48, 32), "Describe."),
        {"role": "assistant", "content": "Noise."},
        {"role": "user", "content": "Again?"},
    ],
    "several_per_turn": [
        u("Compare", img(300, 200, seed=1), "with", img(64, 900, seed=2)),
        {"role": "assistant", "content": "Different."},
        u(img(1000, 1421, seed=3), img(2000, 1000, seed=4), "and these?"),
    ],
    "modes": [u(img(40, 40, "RGBA"), img(50, 30, "P"), img(30, 50, "L"), "Modes.")],
}


@pytest.mark.parametrize("name", list(CONVERSATIONS))
def test_encode_equals_mistral_common(name, enc, mc):
    messages = CONVERSATIONS[name]
    ours = enc.encode(messages)
    ref = reference(mc, messages)
    assert ours.tokens == ref.tokens
    assert len(ours.images) == len(ref.images)
    for a, b in zip(ours.images, ref.images):
        assert a.pixels.dtype == np.float32
        np.testing.assert_array_equal(a.pixels, b)
        assert a.n_tokens == a.grid[0] * (a.grid[1] + 1)
    assert sum(i.grid[0] * i.grid[1] for i in ours.images) == ours.tokens.count(10)


def test_known_token_layout(enc):
    """docs/MODEL.md §11 example A, byte for byte."""
    p = enc.encode(CONVERSATIONS["multi_turn"])
    assert p.tokens == [
        1,
        3,
        10,
        10,
        12,
        10,
        10,
        12,
        10,
        10,
        13,
        5847,
        13089,
        1046,
        4,
        1065,
        83029,
        3937,
        1046,
        2,
        3,
        21310,
        1046,
        5675,
        18666,
        1063,
        4,
    ]
    assert p.images[0].grid == (3, 2) and p.images[0].n_tokens == 9


def test_sixteen_bit_is_scaled_not_clipped(enc, mc):
    """mistral_common clips 16-bit images to white; we scale them to 8 bits, then encode identically."""
    im = img(40, 40, "I;16")
    ours = enc.encode([u(im, "x")]).images[0].pixels
    eight = Image.fromarray((np.array(im, dtype=np.float64) / 257).round().astype(np.uint8), "L").convert("RGB")
    ref = reference(mc, [u(eight, "x")]).images[0]
    np.testing.assert_allclose(ours, ref, atol=0.02)
    assert ours.std() > 0.5  # not a blank white image


def test_max_edge_caps_tokens(enc):
    full = enc.encode([u(img(1600, 1200), "x")]).images[0]
    small = enc.encode([u(img(1600, 1200), "x")], max_edge=512).images[0]
    assert full.size == (1024, 768) and small.size == (512, 384)
    assert small.n_tokens == 24 * 33 < full.n_tokens
    assert small.summary() == "<PIL image> 1600×1200 → 512×384, 792 tokens"


def test_exif_orientation_applied(tmp_path, enc):
    im = img(64, 32)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    path = tmp_path / "phone.jpg"
    im.save(path, exif=exif)
    p = enc.encode(
        [
            {
                "role": "user",
                "content": [{"type": "image_url", "image_url": {"url": str(path)}}, {"type": "text", "text": "x"}],
            }
        ]
    )
    assert p.images[0].original_size == (32, 64) and p.images[0].grid == (4, 2)


def test_alpha_composited_on_white(tmp_path):
    im = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    path = tmp_path / "clear.png"
    im.save(path)
    rgb, _ = load_image(str(path))
    assert rgb.mode == "RGB" and np.array(rgb).min() == 255


def test_sources(tmp_path):
    im = img(20, 10)
    path = tmp_path / "a b.png"
    im.save(path)
    data = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    for src in (str(path), path, "file://" + str(path).replace(" ", "%20"), data, im):
        rgb, _ = load_image(src)
        np.testing.assert_array_equal(np.array(rgb), np.array(im))


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda p: p / "missing.png", "no such file"),
        (lambda p: p, "is a directory"),
        (lambda p: (p / "text.png").write_text("hello") and p / "text.png", "not an image"),
        (lambda p: (p / "empty.png").write_bytes(b"") or p / "empty.png", "not an image"),
    ],
)
def test_bad_files(tmp_path, make, message):
    with pytest.raises(ImageError, match=message):
        load_image(str(make(tmp_path)))


def test_truncated_image(tmp_path):
    buf = io.BytesIO()
    img(200, 200).save(buf, "PNG")
    path = tmp_path / "cut.png"
    path.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(str(path))


def test_decompression_bomb(tmp_path):
    side = int(MAX_PIXELS**0.5) + 100
    path = tmp_path / "bomb.png"
    Image.new("1", (side, side)).save(path)  # a few KB on disk, 100+ megapixels decoded
    assert path.stat().st_size < 2_000_000
    with pytest.raises(ImageError, match="decompression bombs"):
        load_image(str(path))


def test_bad_messages(enc):
    with pytest.raises(PromptError, match="last message must come from the user"):
        enc.encode([{"role": "assistant", "content": "hi"}])
    with pytest.raises(PromptError, match="unsupported content part"):
        enc.encode([{"role": "user", "content": [{"type": "audio"}]}])
    with pytest.raises(PromptError, match="max edge"):
        enc.encode([u(img(20, 20), "x")], max_edge=5000)
