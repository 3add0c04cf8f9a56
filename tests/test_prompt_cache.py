"""The prefix cache is keyed by content at image positions: two images of one size have the same tokens."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from pixtral_mlx.generate import PromptCache, prompt_keys

GREEDY = {"temperature": 0.0, "max_tokens": 8}


def image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(1000 + seed).integers(0, 256, (32, 48, 3), dtype=np.uint8))


def message(img: Image.Image, text: str = "What is this?") -> dict:
    return {"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": text}]}


def test_prompt_keys_tell_same_sized_images_apart(pixtral):
    a, b = pixtral.encode([message(image(0))]), pixtral.encode([message(image(1))])
    assert a.tokens == b.tokens  # the token ids alone cannot tell the images apart
    img_id = pixtral.args.image_token_id
    ka, kb = prompt_keys(a.tokens, a.images, img_id), prompt_keys(b.tokens, b.images, img_id)
    first = a.tokens.index(img_id)
    assert ka[:first] == kb[:first] == a.tokens[:first] and ka[first] != kb[first]
    assert ka[first] == (a.images[0].digest, 0) and ka.count((a.images[0].digest, 5)) == 1
    rows, cols = a.images[0].grid
    assert sum(isinstance(k, tuple) for k in ka) == rows * cols
    cache = PromptCache([])
    cache.tokens, cache.keys = a.tokens, ka
    assert cache.reusable(b.tokens, kb) == first and cache.reusable(a.tokens, ka) == len(ka) - 1
    assert cache.reusable(b.tokens) == len(ka) - 1  # by tokens alone, as for prompts without images
    cache.keys = []  # a cache whose keys were not recorded reuses nothing of a prompt with images
    assert cache.reusable(a.tokens, ka) == 0


def test_a_shared_cache_never_reuses_another_images_keys_and_values(pixtral):
    cache = pixtral.new_cache()
    first = pixtral.generate([message(image(0))], cache=cache, **GREEDY)
    second = pixtral.generate([message(image(1))], cache=cache, **GREEDY)
    assert first.tokens == pixtral.generate([message(image(0))], **GREEDY).tokens
    assert second.tokens == pixtral.generate([message(image(1))], **GREEDY).tokens
    assert second.prompt_tokens > len(pixtral.encode([message(image(1))])) - 3  # prefilled from the image on
    again = pixtral.generate([message(image(1))], cache=cache, **GREEDY)
    assert again.tokens == second.tokens and again.prompt_tokens == 1  # the same image: all reused


def test_chat_undo_then_another_image_of_the_same_size(pixtral):
    chat = pixtral.chat(**GREEDY)
    chat.send(message(image(0))["content"])
    chat.undo()
    reply = chat.send(message(image(2))["content"])
    assert reply.tokens == pixtral.generate([message(image(2))], **GREEDY).tokens


def test_png_round_trip_keeps_the_digest(pixtral):
    img = image(3)
    data = io.BytesIO()
    img.save(data, format="PNG")
    again = Image.open(io.BytesIO(data.getvalue()))
    assert pixtral.encode([message(img)]).images[0].digest == pixtral.encode([message(again)]).images[0].digest
