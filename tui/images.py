"""How the TUI draws pictures: which textual-image protocol, and a widget that shows PNG bytes.

textual-image asks the terminal what it can do (sixel, the kitty graphics protocol) when it is
imported, and that only works before Textual takes over the terminal: `image_widget_class` must
run before the app starts. Its guess is not always right (a terminal behind tmux or ssh may answer
for the outer one), so `--image-protocol` can force one; `halfcell` (two pixels per character
cell, in colour) works in every terminal with more than 16 colours, `none` shows a line of text
instead of the picture. Nothing here imports PIL or textual-image until it is used, and
textual-image is imported without numpy (see `_textual_image_widgets`).
"""

from __future__ import annotations

import functools
import io
import sys
from collections import OrderedDict
from dataclasses import dataclass

from textual.app import ComposeResult
from textual.containers import Container
from textual.timer import Timer
from textual.widget import Widget
from textual.widgets import Static

from . import IMAGE_PROTOCOLS as PROTOCOLS

# Pixels of one character cell when textual-image has not measured the terminal (a VT340's).
DEFAULT_CELL = (10, 20)
FEW_COLOURS = {None, "standard", "windows"}  # Rich's names for no colour and the 16 colours of TERM=xterm
FRAMES = 32  # pictures a Picture keeps drawn (a montage's frames): shown again without encoding again
HOLD_S = 0.3  # at most this long hidden after a terminal resize (see Picture.hold)


@dataclass(frozen=True)
class Pictures:
    """How pictures are drawn: the textual-image widget class (None: not at all), and why not."""

    widget: type[Widget] | None
    why_not: str = ""  # shown under the image's path in place of the picture


def image_widget_class(protocol: str) -> type[Widget] | None:
    """The textual-image widget class for a protocol (None for `none`); queries the terminal once."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown image protocol {protocol!r}; one of {', '.join(PROTOCOLS)}")
    if protocol == "none":
        return None
    widget = _textual_image_widgets()
    return {
        "auto": widget.Image,
        "sixel": widget.SixelImage,
        "tgp": widget.TGPImage,
        "halfcell": widget.HalfcellImage,
    }[protocol]


def _textual_image_widgets():
    """textual_image.widget, imported without numpy (unless something has loaded it already).

    numpy is the largest part of importing textual-image (0.06-0.1 s of a 0.5 s first frame),
    and it must be imported before the first frame (the import asks the terminal what it can
    draw). textual-image uses it only to encode sixel, optionally: without it the same bytes
    come out, in about the same time (a 512 px sample: 76 ms instead of 67, each picture once)."""
    if "numpy" in sys.modules:
        from textual_image import widget

        return widget
    sys.modules["numpy"] = None  # `import numpy` raises ImportError: textual-image goes without
    try:
        from textual_image import widget
    finally:
        del sys.modules["numpy"]  # anything after this imports it as usual
    return widget


def choose_pictures(protocol: str, colour_system: str | None, term: str = "") -> Pictures:
    """The pictures `--image-protocol` asks for, in a terminal of `colour_system` (Rich's name).

    Half-cell pictures are coloured character cells: with 16 colours (TERM=xterm) they are noise,
    so `auto` gives them up there for the image's path and a hint; a forced `halfcell` is kept."""
    widget = image_widget_class(protocol)
    if (
        protocol == "auto"
        and protocol_name(widget) in ("halfcell", "unicode")
        and colour_system in FEW_COLOURS
    ):
        colours = "no colours" if colour_system is None else "16 colours"
        why = f"this terminal shows {colours}{f' (TERM={term})' if term else ''}: pictures need sixel (--image-protocol sixel) or TERM=xterm-256color"
        return Pictures(None, why)
    return Pictures(widget)


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
    """PNG bytes drawn with the chosen protocol, or a line of text while there is no picture.

    Each picture drawn keeps its own image widget (the last `FRAMES` of them), shown again by
    switching which one is displayed: textual-image encodes a picture for the terminal (sixel,
    say) once per widget and size, so a montage cycling through its frames encodes each once, not
    four times a second."""

    DEFAULT_CSS = """
    Picture { align: center middle; }
    Picture > .picture-text { width: 100%; height: auto; content-align: center middle; color: $text-muted; }
    Picture > .picture-image { width: auto; height: 100%; }
    """

    def __init__(
        self, pictures: Pictures, text: str = "", *, id: str | None = None, classes: str | None = None
    ):
        super().__init__(id=id, classes=classes)
        self.pictures = pictures
        self.text = text
        self.png: bytes | None = None
        self._drawn: OrderedDict[bytes, Widget] = OrderedDict()  # png -> its image widget
        self._shown_caption = self._caption(text)
        self._release: Timer | None = None  # reveals a held picture whose size a resize left alone

    def compose(self) -> ComposeResult:
        yield Static(self._caption(self.text), classes="picture-text")

    @property
    def image(self):
        """The picture shown, as a PIL image (None while there is none)."""
        from PIL import Image as PILImage  # not before a picture is shown: the first frame needs none

        return PILImage.open(io.BytesIO(self.png)).convert("RGB") if self.png else None

    def show(self, png: bytes | None, text: str = "") -> None:
        """Draw `png` (None: only `text`)."""
        self.png, self.text = png, text
        drawn = png is not None and self.pictures.widget is not None
        label = self.query_one(".picture-text", Static)
        caption = "" if drawn else self._caption(text)
        if caption != self._shown_caption:  # each new text costs a layout: a montage changes none
            label.update(caption)
            self._shown_caption = caption
        label.display = not drawn
        if drawn and png not in self._drawn:
            self._draw(png)
        for key, widget in self._drawn.items():
            widget.display = drawn and key == png
        if drawn:
            self._drawn.move_to_end(png)

    def _draw(self, png: bytes) -> None:
        widget = self.pictures.widget(_decoded(png), classes="picture-image")
        self._drawn[png] = widget
        self.mount(widget)
        while len(self._drawn) > FRAMES:
            self._drawn.popitem(last=False)[1].remove()

    def hold(self) -> None:
        """The terminal is being resized: hide the sixel picture before the screen draws its new
        layout. Drawn in the first passes of that layout, it comes out as a strip of itself at
        the old size, or at a place between the old and the new one (textual-image crops it to
        regions of a layout that is not settled yet), and a terminal keeps those pixels until
        something is drawn over them: seen for 1-1.5 s after a resize. It comes back whole two
        refreshes after its own resize, or after `HOLD_S` if its size did not change."""
        shown = self._shown_sixel()
        if shown is None:
            return
        shown.styles.visibility = "hidden"
        if self._release is not None:
            self._release.stop()
        self._release = self.set_timer(HOLD_S, functools.partial(self._reveal, shown))

    def on_resize(self) -> None:
        shown = self._shown_sixel()
        if shown is None:
            return
        shown.styles.visibility = "hidden"  # a resize of this widget alone (a tab, a pane) too
        self.call_after_refresh(self.call_after_refresh, self._reveal, shown)

    def _shown_sixel(self) -> Widget | None:
        shown = self._drawn.get(self.png) if self.png is not None else None
        return shown if shown is not None and self.protocol == "sixel" else None

    def _reveal(self, widget: Widget) -> None:
        if self._release is not None:
            self._release.stop()
            self._release = None
        widget.styles.visibility = "visible"
        widget.refresh()

    def _caption(self, text: str) -> str:
        return f"{text}\n{self.pictures.why_not}" if text and self.pictures.why_not else text

    @property
    def protocol(self) -> str:
        return protocol_name(self.pictures.widget)

    def fit(self) -> int:
        """Pixels (longest side) a picture needs to fill this widget."""
        size = self.content_size
        return fit_pixels(max(size.width, 8), max(size.height, 4), self.protocol)


def _decoded(png: bytes):
    """The PNG as a PIL image that equals only itself.

    textual-image's sixel widget checks its cache on every repaint with `image == cached`, and a
    PIL image compares pixel by pixel: two full copies of the bytes per repaint, most of what a
    playing montage cost. The pictures here never change once decoded, so identity is equality."""
    from PIL import Image as PILImage

    image = PILImage.open(io.BytesIO(png)).convert("RGB")
    image.__class__ = _itself_only()
    return image


@functools.cache
def _itself_only() -> type:
    from PIL import Image as PILImage

    class Decoded(PILImage.Image):
        __eq__ = object.__eq__
        __hash__ = object.__hash__

    return Decoded
