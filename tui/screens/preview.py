"""A large preview of one attached image, with what the model will see."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from PIL import Image as PILImage
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Vertical
from textual.screen import ModalScreen
from textual.widgets import Static
from textual_image.widget import Image

from pixtral_mlx.errors import PixtralError

from ..attachments import Attachment

PREVIEW_EDGE = 1024  # no terminal shows more pixels than this; a smaller copy renders faster


def open_preview(path: Path) -> tuple[PILImage.Image, tuple[int, int]]:
    """`path` decoded and checked as the library will, shrunk for the screen; and its decoded size.

    Raises the library's `ImageError` with one sentence; it names the file by its name only, since the
    preview already shows where it is.
    """
    from pixtral_mlx.errors import ImageError
    from pixtral_mlx.images import load_image

    try:
        img, _ = load_image(str(path))
    except ImageError as e:
        raise ImageError(str(e).replace(str(path), path.name)) from e
    size = img.size
    img.thumbnail((PREVIEW_EDGE, PREVIEW_EDGE))
    return img, size


class PreviewScreen(ModalScreen[None]):
    BINDINGS: ClassVar[list[BindingType]] = [Binding("escape,enter,space,q", "dismiss", "Close")]

    def __init__(self, attachment: Attachment) -> None:
        super().__init__()
        self.attachment = attachment

    def compose(self) -> ComposeResult:
        with Vertical(id="preview"):
            try:
                yield Image(open_preview(self.attachment.path)[0], id="preview-image")
            except PixtralError as e:  # the stored copy was deleted or damaged since it was attached
                yield Static(f"cannot preview: {e}", id="preview-image", markup=False)
            yield Static(self.attachment.label(), markup=False, id="preview-info")

    def on_mount(self) -> None:
        self.query_one("#preview").border_title = self.attachment.name
        self.query_one("#preview").border_subtitle = "esc closes"

    def on_click(self) -> None:
        self.dismiss()
