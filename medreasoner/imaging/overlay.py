"""Overlay pictures: image + mask + box + key points, with the reasoning text beside it."""

from __future__ import annotations

import textwrap
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

MASK_RGB = (255, 60, 60)
BOX_RGB = (60, 220, 60)
POINT_RGB = [(255, 220, 0), (0, 200, 255)]
GT_RGB = (255, 255, 255)
MIN_SIDE = 512  # small images are enlarged so the drawing stays legible


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def _outline(draw: ImageDraw.ImageDraw, mask: np.ndarray | None, scale: float, colour) -> None:
    if mask is None or not np.any(mask):
        return
    m = np.asarray(mask, bool)
    edge = m & ~(np.roll(m, 1, 0) & np.roll(m, -1, 0) & np.roll(m, 1, 1) & np.roll(m, -1, 1))
    for y, x in zip(*np.nonzero(edge)):
        draw.rectangle([x * scale, y * scale, (x + 1) * scale - 1, (y + 1) * scale - 1], fill=colour)


def draw_overlay(
    rgb: np.ndarray,
    mask: np.ndarray | None,
    box: Sequence[float] | None,
    points: Sequence[Sequence[float]] | None,
    title: str = "",
    text: str = "",
    banner: str = "",
    alpha: float = 0.45,
    gt_mask: np.ndarray | None = None,
    gt_box: Sequence[float] | None = None,
) -> Image.Image:
    """Return an RGB picture: the annotated image on the left, wrapped text on the right.

    The prediction is red (mask), green (box) and yellow/cyan (key points); an optional ground
    truth is drawn as a white outline and a white box.
    """
    img = np.asarray(rgb, dtype=np.uint8).copy()
    if mask is not None and mask.any():
        m = np.asarray(mask, bool)
        img[m] = (img[m] * (1 - alpha) + np.array(MASK_RGB) * alpha).astype(np.uint8)
    h, w = img.shape[:2]
    scale = max(1.0, MIN_SIDE / max(h, w))
    pic = Image.fromarray(img)
    if scale > 1:
        pic = pic.resize((round(w * scale), round(h * scale)), Image.NEAREST)
    draw = ImageDraw.Draw(pic)
    lw = max(2, round(pic.width / 256))
    _outline(draw, mask, scale, MASK_RGB)  # keeps the mask visible on bright tissue
    _outline(draw, gt_mask, scale, GT_RGB)
    if gt_box is not None:
        draw.rectangle([v * scale for v in gt_box], outline=GT_RGB, width=max(1, lw // 2))
    if box is not None:
        draw.rectangle([box[0] * scale, box[1] * scale, box[2] * scale, box[3] * scale], outline=BOX_RGB, width=lw)
    for i, p in enumerate(points or []):
        r = 3 * lw
        x, y = p[0] * scale, p[1] * scale
        draw.ellipse([x - r, y - r, x + r, y + r], fill=POINT_RGB[i % 2], outline=(0, 0, 0))
        draw.text((x + r + 2, y - r), f"P{i + 1}", fill=POINT_RGB[i % 2], font=_font(14))

    panel_w = max(360, pic.width // 2)
    canvas = Image.new("RGB", (pic.width + panel_w, max(pic.height, 200)), (20, 20, 20))
    canvas.paste(pic, (0, 0))
    d = ImageDraw.Draw(canvas)
    y = 8
    if banner:
        for line in textwrap.wrap(banner, 40):
            d.text((pic.width + 10, y), line, fill=(255, 80, 80), font=_font(16))
            y += 20
        y += 6
    if title:
        for line in textwrap.wrap(title, 44):
            d.text((pic.width + 10, y), line, fill=(255, 255, 255), font=_font(15))
            y += 19
        y += 6
    for para in (text or "").splitlines() or [""]:
        for line in textwrap.wrap(para, 52) or [""]:
            if y > canvas.height - 20:
                d.text((pic.width + 10, y), "...", fill=(200, 200, 200), font=_font(13))
                return canvas
            d.text((pic.width + 10, y), line, fill=(210, 210, 210), font=_font(13))
            y += 16
    return canvas
