"""Burned-in RGB overlay: the attribution heatmap over the grayscale source, a colour bar, and text.

Layout of :func:`render_overlay`'s result (uint8 RGB, ``[rows, cols + strip, 3]``):

- columns ``0 .. cols-1``: the source frame at its own resolution, pixel (r, c) of the overlay is
  pixel (r, c) of the source. Where the map is zero (or negative) the pixel is exactly the
  grayscale display value; elsewhere the heat colour is blended in with an opacity that grows
  with the value, so anatomy stays visible under weak evidence. The text lines are drawn in the
  top-left corner, white (the warnings in red-orange, the disclaimer in amber), outlined in black
  when large, on a translucent dark box when small; lines are word-wrapped to the image width.
  A warning line is drawn for each trust signal that flags the result
  (:func:`overlay_warning_lines`), none when nothing is flagged.
- columns ``cols ..``: a black strip on the right holding the vertical colour bar (high at the
  top) with its scale labels in the map's raw units. The strip is appended rather than drawn
  over the image so no anatomy is hidden and source coordinates stay valid.

Signed maps show their positive part only. For the methods pacs-xai runs, positive attribution
is evidence *for* the explained class (what a reader asks "why did it say nodule?"), negative
attribution is evidence against it. A one-sided perceptual heat scale over a grayscale image
reads unambiguously; a diverging scale would put dark blue over dark anatomy and make "low
evidence" and "negative evidence" hard to tell apart. The signed values themselves are kept in
the Parametric Map output.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from dicom_io.writers.descriptions import DISCLAIMER
from dicom_io.writers.result import ExplanationResult

__all__ = [
    "INFERNO_LUT",
    "overlay_columns",
    "overlay_title_lines",
    "overlay_warning_lines",
    "positive_scale",
    "render_overlay",
    "save_png",
]

# Matplotlib's "inferno" sampled at 17 evenly spaced points (perceptually uniform, black ->
# purple -> orange -> pale yellow); interpolated linearly to 256 entries below.
_INFERNO_KNOTS = np.array(
    [
        (0, 0, 4),
        (11, 7, 36),
        (33, 12, 74),
        (61, 9, 101),
        (87, 16, 110),
        (113, 25, 110),
        (138, 34, 106),
        (163, 44, 97),
        (188, 55, 84),
        (210, 70, 68),
        (228, 90, 49),
        (241, 115, 29),
        (249, 142, 9),
        (252, 172, 17),
        (249, 203, 53),
        (242, 234, 105),
        (252, 255, 164),
    ],
    dtype=np.float32,
)


def _interpolate_lut(knots: np.ndarray, size: int = 256) -> np.ndarray:
    """A [size, 3] uint8 colour table interpolated linearly between evenly spaced knots."""
    positions = np.linspace(0.0, 1.0, len(knots))
    samples = np.linspace(0.0, 1.0, size)
    channels = [np.interp(samples, positions, knots[:, c]) for c in range(3)]
    return np.round(np.stack(channels, axis=1)).astype(np.uint8)


#: 256-entry inferno-like colour table, index = value scaled to 0..255.
INFERNO_LUT: np.ndarray = _interpolate_lut(_INFERNO_KNOTS)

_TEXT_FILL = (255, 255, 255)
_DISCLAIMER_FILL = (255, 191, 0)
_WARNING_FILL = (255, 110, 60)
_OUTLINE_FILL = (0, 0, 0)
_BAR_FRAME_FILL = (160, 160, 160)
_BOX_ALPHA = 0.6  # opacity of the dark box behind small text
_MIN_TEXT_SIZE = 6  # px; below this Pillow's font is no longer legible
_MIN_OUTLINED_SIZE = 14  # px; smaller text gets a box instead of an outline
_WIDEST_LABEL = "-8.88e+88"  # the longest "%.3g" rendering the strip must hold


def overlay_title_lines(result: ExplanationResult) -> list[str]:
    """The text burned into an overlay: method, class and probability, model name and version."""
    return [
        f"XAI: {result.method}",
        f"class: {result.class_name}  p={float(result.probability):.3f}",
        f"model: {result.model_name} {result.model_version}",
    ]


def overlay_warning_lines(result: ExplanationResult) -> list[str]:
    """One warning per trust signal that flags the result: "attribution outside anatomy: 82 %" when
    a shortcut is suspected, "input unlike the model's training data" when the input is out of
    distribution; none when nothing is flagged or no signal was computed."""
    lines = []
    if result.shortcut is not None and result.shortcut.suspected:
        lines.append(f"attribution outside anatomy: {result.shortcut.share_percent:.0f} %")
    if result.ood is not None and result.ood.out_of_distribution:
        lines.append("input unlike the model's training data")
    return lines


def positive_scale(attribution: np.ndarray, clip_percentile: float = 99.5) -> float:
    """Top of the colour scale in raw map units: a high percentile of the positive values.

    A percentile rather than the maximum keeps a few extreme pixels (common in gradient maps)
    from washing out everything else; values above it are shown in the top colour. Returns 0.0
    when the map has no positive value.
    """
    if not 0.0 < clip_percentile <= 100.0:
        raise ValueError(f"clip_percentile must be in (0, 100], got {clip_percentile!r}")
    positive = attribution[attribution > 0]
    if positive.size == 0:
        return 0.0
    return float(np.percentile(positive, clip_percentile))


def _check_inputs(display: np.ndarray, attribution: np.ndarray) -> None:
    """Both 2-D, same shape, finite; display within [0, 1] (a rounding margin is tolerated)."""
    for name, array in (("display", display), ("attribution", attribution)):
        if not isinstance(array, np.ndarray) or array.ndim != 2 or 0 in array.shape:
            shape = getattr(array, "shape", type(array).__name__)
            raise ValueError(f"{name} must be a non-empty 2-D numpy array, got {shape}")
        bad = int(np.count_nonzero(~np.isfinite(array)))
        if bad:
            raise ValueError(f"{name} has {bad} non-finite (NaN/inf) values")
    if display.shape != attribution.shape:
        raise ValueError(f"display shape {display.shape} differs from attribution shape {attribution.shape}")
    low, high = float(display.min()), float(display.max())
    if low < -1e-3 or high > 1.0 + 1e-3:
        raise ValueError(f"display must be scaled to [0, 1], found values in [{low:.4g}, {high:.4g}]")


def _gray_levels(display: np.ndarray) -> np.ndarray:
    """The windowed display frame as uint8 gray levels 0..255."""
    return np.round(np.clip(display.astype(np.float32), 0.0, 1.0) * 255.0).astype(np.uint8)


@functools.lru_cache(maxsize=8)
def _blend_table(max_alpha: float) -> np.ndarray:
    """``[256 * 256, 3]`` uint8: RGB of gray level ``g`` under heat level ``k`` at index ``g * 256 + k``.

    The heat colour is ``INFERNO_LUT[k]`` at opacity ``max_alpha * k / 255``; ``k = 0`` leaves the
    gray exactly. One table lookup per pixel replaces float blending of the whole RGB frame
    (a 2k² radiograph: ~100 ms -> ~20 ms)."""
    gray = np.arange(256, dtype=np.float32)[:, None, None]
    level = np.arange(256, dtype=np.float32)[None, :, None]
    alpha = np.float32(max_alpha) * level / np.float32(255.0)
    colour = INFERNO_LUT.astype(np.float32)[None, :, :]
    table = np.round(gray * (1.0 - alpha) + colour * alpha).astype(np.uint8)
    return table.reshape(256 * 256, 3)


def _blend(gray: np.ndarray, attribution: np.ndarray, vmax: float, max_alpha: float) -> np.ndarray:
    """Heat colour over gray (uint8 levels) with opacity ``max_alpha * value / vmax``, colour and
    opacity quantised to 256 levels; exactly gray where value <= 0. Returns uint8 RGB."""
    if vmax <= 0.0:
        return np.repeat(gray[:, :, None], 3, axis=2)
    level = np.clip(attribution.astype(np.float32) * np.float32(255.0 / vmax), 0.0, 255.0)
    index = gray.astype(np.intp) * 256 + np.round(level).astype(np.intp)
    return np.take(_blend_table(float(max_alpha)), index, axis=0)


@functools.lru_cache(maxsize=32)
def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    """Pillow's built-in font at ``size`` pixels (needs Pillow >= 10.1 with FreeType)."""
    return ImageFont.load_default(size=size)


def _text_width(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, stroke: int = 0) -> int:
    return int(math.ceil(font.getlength(text))) + 2 * stroke


def _line_height(font: ImageFont.FreeTypeFont | ImageFont.ImageFont) -> int:
    left, top, right, bottom = font.getbbox("Ag|")
    return int(bottom) + max(1, int(bottom) // 5)


def _stroke(size: int) -> int:
    """Outline width; small text gets a dark backing box instead (an outline would swallow it)."""
    return max(1, size // 12) if size >= _MIN_OUTLINED_SIZE else 0


def _wrap(text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont, width: float, stroke: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels; a single word that is too wide keeps its own line."""
    lines: list[str] = []
    current = ""
    for word in text.split():
        candidate = f"{current} {word}" if current else word
        if current and _text_width(candidate, font, stroke) > width:
            lines.append(current)
            current = word
        else:
            current = candidate
    return [*lines, current] if current else lines


def _base_size(rows: int, cols: int) -> int:
    """Font size for the grid: about 1/40 of the shorter side, at least 8 px."""
    return max(8, round(min(rows, cols) / 40))


def _layout_text(
    rows: int, cols: int, lines: Sequence[tuple[str, tuple[int, int, int]]]
) -> tuple[int, list[tuple[str, tuple[int, int, int]]]]:
    """Font size and wrapped (text, colour) lines for the title block.

    The size starts at about 1/40 of the shorter image side (at least 8 px) and shrinks, down to
    6 px, until the wrapped block fits in 96 % of the width and half of the height; on tiny
    images the block may then cover more, but the disclaimer is never dropped.
    """
    size = _base_size(rows, cols)
    while True:
        font = _font(size)
        stroke = _stroke(size)
        wrapped = [(part, fill) for text, fill in lines for part in _wrap(text, font, 0.96 * cols, stroke)]
        if size <= _MIN_TEXT_SIZE or _line_height(font) * len(wrapped) <= 0.5 * rows:
            return size, wrapped
        size -= 1


def _scale_labels(vmax: float) -> tuple[str, str, str]:
    """Colour bar labels (top, middle, bottom) in raw units, 3 significant digits."""
    return f"{vmax:.3g}", f"{vmax / 2:.3g}", "0"


def _strip_width(size: int) -> int:
    """Width of the colour-bar strip: fixed for a font size (room for the widest "%.3g" label), so
    every overlay of a source grid has the same columns whatever the map's scale."""
    font = _font(size)
    margin = max(2, size // 2)
    bar = max(4, round(size * 0.8))
    return margin + bar + margin + _text_width(_WIDEST_LABEL, font) + margin


def _draw_colour_bar(canvas: Image.Image, x0: int, size: int, labels: Sequence[str]) -> None:
    """Vertical colour bar (high at top) in the strip starting at column ``x0``, labels to its right."""
    draw = ImageDraw.Draw(canvas)
    font = _font(size)
    rows = canvas.height
    margin = max(2, size // 2)
    bar_width = max(4, round(size * 0.8))
    half_label = _line_height(font) // 2
    top, bottom = margin + half_label, rows - 1 - margin - half_label
    if bottom - top < 2:  # tiny image: a bar without labels
        top, bottom = 1, rows - 2
    height = bottom - top + 1
    if height < 2:
        return
    ramp = INFERNO_LUT[np.round(np.linspace(255, 0, height)).astype(np.intp)]
    bar = np.repeat(ramp[:, None, :], bar_width, axis=1)
    x_bar = x0 + margin
    canvas.paste(Image.fromarray(bar, "RGB"), (x_bar, top))
    draw.rectangle((x_bar - 1, top - 1, x_bar + bar_width, bottom + 1), outline=_BAR_FRAME_FILL)
    if bottom - top < 2 * _line_height(font):
        return
    x_label = x_bar + bar_width + margin
    for text, y in zip(labels, (top, (top + bottom) // 2, bottom)):
        draw.text((x_label, y), text, font=font, fill=_TEXT_FILL, anchor="lm")


def _draw_title(canvas: Image.Image, lines: Sequence[tuple[str, tuple[int, int, int]]], size: int) -> None:
    """Text block in the top-left corner of ``canvas`` (the image area only).

    Large text is outlined so it reads on any background; small text sits on a translucent dark
    box per line instead.
    """
    font = _font(size)
    stroke = _stroke(size)
    step = _line_height(font)
    x = y = max(2, size // 3) + stroke
    if not stroke:
        shade = Image.new("L", canvas.size, 0)
        shade_draw = ImageDraw.Draw(shade)
        for index, (text, _) in enumerate(lines):
            top = y + index * step - 1
            shade_draw.rectangle((x - 2, top, x + _text_width(text, font) + 1, top + step), fill=int(255 * _BOX_ALPHA))
        canvas.paste(Image.new("RGB", canvas.size, _OUTLINE_FILL), (0, 0), shade)
    draw = ImageDraw.Draw(canvas)
    for text, fill in lines:
        draw.text((x, y), text, font=font, fill=fill, stroke_width=stroke, stroke_fill=_OUTLINE_FILL)
        y += step


def overlay_columns(rows: int, cols: int) -> int:
    """Columns of the overlay :func:`render_overlay` makes for a ``rows`` x ``cols`` source frame."""
    return cols + _strip_width(_base_size(rows, cols))


def render_overlay(
    display: np.ndarray,
    attribution: np.ndarray,
    *,
    title_lines: Sequence[str],
    warning_lines: Sequence[str] = (),
    disclaimer: str | None = DISCLAIMER,
    clip_percentile: float = 99.5,
    max_alpha: float = 0.6,
    vmax: float | None = None,
) -> np.ndarray:
    """Render the burned-in overlay; returns uint8 RGB ``[rows, cols + strip, 3]`` (see module doc).

    The strip width depends on the grid only (:func:`overlay_columns`).

    display: float [rows, cols] in [0, 1], the windowed grayscale source frame (1 = bright).
    attribution: float [rows, cols], signed, raw units; its positive part is shown, scaled from
    0 to :func:`positive_scale` (``clip_percentile``; ``vmax`` instead where given, e.g. one
    scale for all the slices of a volume), at most ``max_alpha`` opaque. A flat,
    all-zero or all-negative map gives the plain grayscale image and a 0..0 scale.
    title_lines: drawn top-left; ``warning_lines`` follow them in red-orange; ``disclaimer``
    (default "NOT FOR DIAGNOSTIC USE") is appended unless already among them; pass ``None`` only
    where the image will never leave the process.
    """
    _check_inputs(display, attribution)
    if not 0.0 < max_alpha <= 1.0:
        raise ValueError(f"max_alpha must be in (0, 1], got {max_alpha!r}")
    rows, cols = display.shape
    if vmax is None:
        vmax = positive_scale(attribution, clip_percentile)
    image = _blend(_gray_levels(display), attribution, vmax, max_alpha)

    texts = [str(line) for line in title_lines]
    lines = [(text, _DISCLAIMER_FILL if text == disclaimer else _TEXT_FILL) for text in texts]
    lines += [(str(line), _WARNING_FILL) for line in warning_lines]
    if disclaimer is not None and disclaimer not in texts:
        lines.append((disclaimer, _DISCLAIMER_FILL))
    size, wrapped = _layout_text(rows, cols, lines)
    picture = Image.fromarray(image, "RGB")
    _draw_title(picture, wrapped, size)  # clipped to the image area: never over the colour bar

    bar_size = _base_size(rows, cols)  # the strip depends on the grid only, not on the text
    canvas = Image.new("RGB", (cols + _strip_width(bar_size), rows), (0, 0, 0))
    canvas.paste(picture, (0, 0))
    _draw_colour_bar(canvas, cols, bar_size, _scale_labels(vmax))
    return np.asarray(canvas, dtype=np.uint8).copy()


def save_png(rgb: np.ndarray, path: str | os.PathLike[str]) -> None:
    """Write a uint8 RGB ``[rows, cols, 3]`` array as a PNG file (for previews and the demo)."""
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        found = f"{rgb.dtype} {rgb.shape}" if isinstance(rgb, np.ndarray) else type(rgb).__name__
        raise ValueError(f"save_png needs a uint8 [rows, cols, 3] RGB array, got {found}")
    Image.fromarray(rgb, "RGB").save(os.fspath(path), format="PNG")
