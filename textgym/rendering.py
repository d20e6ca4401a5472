"""Text drawn as an RGB frame: ``render_mode="rgb_array"`` of the text envs.

Gymnasium's video wrappers (``gymnasium.wrappers.RecordVideo``) and SB3's ``VecVideoRecorder``
record ``rgb_array`` frames, and SB3's ``make_vec_env`` asks every env for that mode; a text env
that offers it records episodes like any other env. Matplotlib (a dependency) draws the frame; it
is imported on the first frame only.
"""

from __future__ import annotations

import textwrap

import numpy as np

FRAME_HEIGHT, FRAME_WIDTH = 360, 640
"""Frame size in pixels (16:9, what video encoders take without padding)."""

_DPI = 100


def text_frame(text: str, height: int = FRAME_HEIGHT, width: int = FRAME_WIDTH, font_size: float = 9.0) -> np.ndarray:
    """``text`` in a monospace font, wrapped to the frame's width, black on white, from the top left.

    Lines that do not fit below the frame's bottom are cut (the end of a long conversation is lost,
    as on a terminal of that size).

    :param text: what to draw; newlines are kept.
    :param height: frame height in pixels.
    :param width: frame width in pixels.
    :param font_size: font size in points (at 100 pixels per inch).
    :return: ``uint8`` array of shape ``(height, width, 3)``.
    :raises ValueError: a non-positive size.
    """
    if height <= 0 or width <= 0 or font_size <= 0:
        raise ValueError(f"frame size and font size must be positive, got {height}x{width} at {font_size} pt")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    chars_per_line = max(1, int(0.97 * width / (0.61 * font_size * _DPI / 72)))  # a monospace glyph: ~0.6 em
    wrapped = "\n".join(textwrap.fill(line, chars_per_line) or " " for line in text.splitlines() or [""])
    figure = Figure(figsize=(width / _DPI, height / _DPI), dpi=_DPI, facecolor="white")
    figure.text(0.01, 0.99, wrapped, family="monospace", size=font_size, va="top", ha="left")
    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()
