"""How the TUI draws pictures: which textual-image protocol, and a widget that shows PNG bytes.

textual-image asks the terminal what it can do (sixel, the kitty graphics protocol) when it is
imported, and that only works before Textual takes over the terminal: `image_widget_class` must
run before the app starts. Its guess is not always right (a terminal behind tmux or ssh may answer
for the outer one), so `--image-protocol` can force one; `halfcell` (two pixels per character
cell, in colour) works in every terminal, `none` shows a line of text instead of the picture.
"""

from __future__ import annotations

import io

from PIL import Image as PILImage
from textual.app import ComposeResult
from textual.containers import Container
from textual.widget import Widget
from textual.widgets import Static

from . import IMAGE_PROTOCOLS as PROTOCOLS
# Pixels of one character cell when textual-image has not measured the terminal (a VT340's).
DEFAULT_CELL = (10, 20)


def image_widget_class(protocol: str) -> type[Widget] | None:
    """The textual-image widget class for a protocol (None for `none`); queries the terminal once."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown image protocol {protocol!r}; one of {', '.join(PROTOCOLS)}")
    if protocol == "none":
        return None
    from textual_image import widget

    return {"auto": widget.Image, "sixel": widget.SixelImage, "tgp": widget.TGPImage, "halfcell": widget.HalfcellImage}[protocol]


def protocol_name(cls: type[Widget] | None) -> str:
    if cls is None:
        return "none"
    name = cls.__name__.lower()
    for protocol in ("sixel", "tgp", "halfcell", "unicode"):
        if name.startswith(protocol):
            return protocol
    # textual-image's auto class renders with whatever it detected
    return cls._Renderable.__module__.rsplit(".", 1)[-1] if hasattr(cls, "_Renderable") else name


def cell_pixels() -> tuple[int, int]:
    """The size of a character cell in pixels, as textual-image measured it."""
    from textual_image._terminal import TerminalError, get_cell_size  # the measurement its widgets use

    try:
        size = get_cell_size()
    except TerminalError:  # no terminal to ask (stdout closed)
        return DEFAULT_CELL
    return size.width, size.height


def fit_pixels(columns: int, rows: int, protocol: str) -> int:
    """The longest side, in pixels, of an image that fills columns × rows cells (what to ask
    GetSample for: no bigger than the widget can show)."""
    if protocol == "none":
        return 64
    if protocol in ("halfcell", "unicode"):
        width, height = columns, rows * 2
    else:
        cw, ch = cell_pixels()
        width, height = columns * cw, rows * ch
    return max(16, width, height)


class Picture(Container):
    """PNG bytes drawn with the chosen protocol, or a line of text while there is no picture."""

    DEFAULT_CSS = """
    Picture { align: center middle; }
    Picture > .picture-text { width: 100%; height: auto; content-align: center middle; color: $text-muted; }
    Picture > .picture-image { width: auto; height: 100%; }
    """

    def __init__(self, image_class: type[Widget] | None, text: str = "", *, id: str | None = None, classes: str | None = None):
        super().__init__(id=id, classes=classes)
        self.image_class = image_class
        self.text = text
        self.image: PILImage.Image | None = None

    def compose(self) -> ComposeResult:
        yield Static(self.text, classes="picture-text")
        if self.image_class is not None:
            image = self.image_class(classes="picture-image")
            image.display = False
            yield image

    def show(self, png: bytes | None, text: str = "") -> None:
        """Draw `png` (None: only `text`)."""
        self.image = PILImage.open(io.BytesIO(png)).convert("RGB") if png else None
        self.text = text
        label = self.query_one(".picture-text", Static)
        label.update(text if self.image is None or self.image_class is None else "")
        label.display = self.image is None or self.image_class is None
        if self.image_class is not None:
            widget = self.query_one(".picture-image")
            widget.image = self.image
            widget.display = self.image is not None

    @property
    def protocol(self) -> str:
        return protocol_name(self.image_class)

    def fit(self) -> int:
        """Pixels (longest side) a picture needs to fill this widget."""
        size = self.content_size
        return fit_pixels(max(size.width, 8), max(size.height, 4), self.protocol)
