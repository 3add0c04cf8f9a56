"""ctrl+f: pick an image from a folder tree that shows only images, with a live preview."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path
from typing import ClassVar

from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding, BindingType
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import DirectoryTree, Input, Static, Tree
from textual_image.widget import Image

from pixtral_mlx.config import MAX_EDGE
from pixtral_mlx.errors import PixtralError

from ..attachments import PATCH, plan
from ..paths import is_image
from .preview import open_preview


class ImageTree(DirectoryTree):
    def filter_paths(self, paths: Iterable[Path]) -> Iterable[Path]:
        return [p for p in paths if not p.name.startswith(".") and (p.is_dir() or is_image(p))]


def describe(
    path: Path, size: tuple[int, int], max_edge: int | None, geometry: tuple[int, int] = (MAX_EDGE, PATCH)
) -> str:
    w, h, tokens = plan(*size, max_edge, patch=geometry[1], image_size=geometry[0])
    return f"{path.name}  {size[0]}×{size[1]} → {w}×{h} · {tokens:,} tokens"


class FilePicker(ModalScreen[Path | None]):
    BINDINGS: ClassVar[list[BindingType]] = [
        Binding("escape", "dismiss(None)", "Cancel"),
        Binding("backspace", "parent", "Parent folder"),
        Binding("tilde", "home", "Home folder"),
        Binding("slash", "type_path", "Type a path"),
    ]

    def __init__(
        self, folder: Path, max_edge: int | None = None, geometry: tuple[int, int] = (MAX_EDGE, PATCH)
    ) -> None:
        super().__init__()
        self.folder = folder if folder.is_dir() else Path.cwd()
        self.max_edge = max_edge
        self.geometry = geometry  # the model's (image size, pixels per token)

    def compose(self) -> ComposeResult:
        with Vertical(id="picker"):
            yield Input(str(self.folder), placeholder="a folder or an image path", id="picker-path")
            with Horizontal():
                yield ImageTree(self.folder, id="picker-tree")
                with Vertical(id="picker-side"):
                    yield Image(None, id="picker-image")
                    yield Static("", id="picker-info", markup=False)
            yield Static(
                "enter attaches · backspace goes up a folder · ~ goes home · / types a path · esc cancels",
                id="picker-hint",
            )

    def on_mount(self) -> None:
        self._set_title()
        self.query_one(ImageTree).focus()

    def _set_title(self) -> None:
        self.query_one("#picker").border_title = "Attach an image"
        self.query_one("#picker-path", Input).value = str(self.query_one(ImageTree).path)

    @on(Tree.NodeHighlighted)
    def highlighted(self, event: Tree.NodeHighlighted) -> None:
        path = getattr(event.node.data, "path", None)
        self.show_preview(Path(path) if path is not None and Path(path).is_file() else None)

    @work(exclusive=True, group="picker-preview")
    async def show_preview(self, path: Path | None) -> None:
        """Decode off the UI thread; a file that cannot be decoded says why in place of the image."""
        image, info = self.query_one("#picker-image", Image), self.query_one("#picker-info", Static)
        if path is None:  # a folder
            image.image, image.display = None, False
            info.update("")
            return
        try:
            img, size = await asyncio.to_thread(open_preview, path)
        except PixtralError as e:
            image.image, image.display = None, False
            info.update(f"cannot preview: {e}")
            return
        image.image, image.display = img, True
        info.update(describe(path, size, self.max_edge, self.geometry))

    @on(DirectoryTree.FileSelected)
    def selected(self, event: DirectoryTree.FileSelected) -> None:
        self.dismiss(Path(event.path))

    @on(Input.Submitted)
    def path_typed(self, event: Input.Submitted) -> None:
        path = Path(event.value.strip()).expanduser()
        if path.is_dir():
            self.query_one(ImageTree).path = path.resolve()
            self._set_title()
            self.query_one(ImageTree).focus()
        elif path.is_file() and is_image(path):
            self.dismiss(path.resolve())
        else:
            self.notify(f"{event.value.strip()}: no such folder or image file.", severity="error")

    def action_type_path(self) -> None:
        self.query_one("#picker-path", Input).focus()

    def action_parent(self) -> None:
        tree = self.query_one(ImageTree)
        tree.path = Path(tree.path).resolve().parent
        self._set_title()

    def action_home(self) -> None:
        self.query_one(ImageTree).path = Path.home()
        self._set_title()
