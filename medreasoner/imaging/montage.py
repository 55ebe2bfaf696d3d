"""A picture of a volume result: the slices the CRM read and a few propagated ones, with masks."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from medreasoner.constants import TINY_WARNING
from medreasoner.imaging.overlay import draw_overlay


def volume_montage(slice_rgb: Callable[[int], np.ndarray], masks: Mapping[int, np.ndarray],
                   asked: Sequence[dict], chosen: int | None, query: str, status: str,
                   warnings: Sequence[str], size: int = 256):
    """Up to 9 tiles (the asked slices first, then slices spread over the segmented range) with
    their masks, boxes, key points and reasoning; None when there is nothing to show."""
    from PIL import Image, ImageDraw

    shown = [p["slice"] for p in asked][:5]
    if masks:
        seg = sorted(masks)
        extra = [seg[round(k * (len(seg) - 1) / 3)] for k in range(4)] if len(seg) > 1 else seg
        shown += [s for s in extra if s not in shown]
    info = {p["slice"]: p for p in asked}
    banner = TINY_WARNING if TINY_WARNING in warnings else ""
    tiles = []
    for s in shown[:9]:
        p = info.get(s, {})
        kind = "key slice (chosen)" if s == chosen else ("asked" if s in info else "propagated")
        tile = draw_overlay(slice_rgb(s), masks.get(s), p.get("box"), p.get("points"),
                            title=f"slice {s}: {kind}", text=(p.get("reasoning") or "")[:400], banner=banner)
        tiles.append(tile.resize((size * tile.width // tile.height, size)))
    if not tiles:
        return None
    cols = min(3, len(tiles))
    w = max(t.width for t in tiles)
    rows = (len(tiles) + cols - 1) // cols
    grid = Image.new("RGB", (w * cols, size * rows + 24), (0, 0, 0))
    ImageDraw.Draw(grid).text((6, 4), f"{query}  [{status}]", fill=(255, 255, 255))
    for k, t in enumerate(tiles):
        grid.paste(t, ((k % cols) * w, 24 + (k // cols) * size))
    return grid
