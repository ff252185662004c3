"""The loradrop terminal client (Textual): screens/, widgets/, one stylesheet. No torch here."""

# How pictures can be drawn (tui/images.py); here, so `loradrop tui --help` needs no Textual.
IMAGE_PROTOCOLS = ("auto", "sixel", "tgp", "halfcell", "none")
