"""`max_edge` above Pixtral-12B's 1024: any value up to the family's largest image size (the Mistral3 models' 1540)
is a valid option before a model is known; the encoder refuses one above the loaded model's own image size."""

from __future__ import annotations

import family_checkpoints
import numpy as np
import pytest
from PIL import Image
from test_describe import pixtral_cli

from pixtral_mlx.config import FAMILY_MAX_EDGE, MAX_EDGE
from pixtral_mlx.errors import PromptError
from pixtral_mlx.prompt import PromptEncoder
from pixtral_mlx.turn import Options


def picture(w: int, h: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8), "RGB")


def message(image: Image.Image) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "What?"}]}]


@pytest.fixture(scope="module")
def mistral3(tmp_path_factory):
    tekken = family_checkpoints.tekken(tmp_path_factory.mktemp("tok") / "tekken.json")
    return PromptEncoder(tekken, image_size=1540, patch_size=14, spatial_merge_size=2)


def test_options_take_the_family_range():
    assert (MAX_EDGE, FAMILY_MAX_EDGE) == (1024, 1540)
    assert Options(max_edge=1400).max_edge == 1400 and Options(max_edge=1540).max_edge == 1540
    with pytest.raises(PromptError, match=r"max edge must be between 16 and 1540 pixels \(a whole number\), got 1541"):
        Options(max_edge=1541)


def test_mistral3_uses_1400(mistral3):
    image = mistral3.encode(message(picture(2000, 1000)), max_edge=1400).images[0]
    assert image.size == (1400, 700)  # 28-px cells: 50 x 25 [IMG] tokens, each 2x2 patches of 14 px
    assert image.grid == (25, 50) and image.n_tokens == 25 * 51 and image.patches == 50 * 100
    full = mistral3.encode(message(picture(2000, 1000))).images[0]
    assert full.size == (1540, 784) and full.grid == (28, 55)  # 1540 x 770 in whole cells: the model's own size


def test_pixtral_refuses_1400_with_its_limit():
    pixtral = PromptEncoder(image_size=1024)
    with pytest.raises(PromptError) as e:
        pixtral.encode(message(picture(64, 64)), max_edge=1400)
    assert str(e.value) == "max edge 1400 is above this model's image size of 1024 pixels: use 1024 or less."
    assert e.value.param == "max_edge"
    assert pixtral.encode(message(picture(2000, 1000)), max_edge=1024).images[0].grid == (32, 64)


def test_server_passes_1400_to_the_model():
    from pixtral_mlx.server.schema import ChatRequest, request_options

    req = ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}], max_edge=1400)
    assert request_options(req, Options(), None).max_edge == 1400


def test_describe_dry_run_names_the_model_limit(mlx_dir, tmp_path):
    picture(300, 200).save(tmp_path / "a.png")
    run = pixtral_cli("describe", str(tmp_path / "a.png"), "--model", str(mlx_dir), "--max-edge", "1400", "--dry-run")
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.strip() == (
        "error: --max-edge 1400 is above this model's image size of 1024 pixels: use 1024 or less."
    )
