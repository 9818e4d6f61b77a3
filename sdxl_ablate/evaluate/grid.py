"""The one image-grid renderer: labelled rows of equally sized tiles on white.

Evaluation writes each variant's base-vs-LoRA grid with it (`make_grid`: a row per model, a
column per prompt) and the report its per-prompt comparison (a row per variant, a column per
seed, a caption under each tile, a title on top). One layout, so both read the same way.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

from PIL import Image, ImageDraw, ImageFont

HEADER_LINES = 3  # column labels are wrapped to at most this many lines


@dataclass(frozen=True)
class GridLayout:
    """A title band (optional), a header band of column labels, a column of row labels, then
    `rows` x `n` tiles, each followed by `caption_h` pixels of caption and a `gap`."""

    tile: tuple[int, int]  # (width, height) as drawn
    n: int
    font_size: int
    label_w: int
    header_h: int
    gap: int
    rows: int = 2
    caption_h: int = 0
    title_h: int = 0

    @property
    def size(self) -> tuple[int, int]:
        w, h = self.tile
        return (self.label_w + self.n * (w + self.gap),
                self.title_h + self.header_h + self.rows * (h + self.caption_h + self.gap))

    def tile_origin(self, row: int, col: int) -> tuple[int, int]:
        w, h = self.tile
        return (self.label_w + col * (w + self.gap),
                self.title_h + self.header_h + row * (h + self.caption_h + self.gap))


def grid_layout(tile: tuple[int, int], n: int, rows: int = 2, label_w: Optional[int] = None,
                captions: bool = False, title_lines: int = 0) -> GridLayout:
    # The font grows with the tile, so labels stay legible on 1024 px images.
    font_size = max(10, tile[0] // 16)
    line_h = font_size + font_size // 4
    gap = font_size // 2
    return GridLayout(tile, n, font_size, label_w=4 * font_size if label_w is None else label_w,
                      header_h=HEADER_LINES * line_h + gap, gap=gap, rows=rows,
                      caption_h=line_h if captions else 0, title_h=title_lines * line_h + (gap if title_lines else 0))


def wrap_label(text: str, font, width: int, max_lines: int) -> list[str]:
    """Words wrapped to `width` pixels; what does not fit in `max_lines` lines ends in '...'."""
    lines, line = [], ""
    for word in text.split():
        candidate = f"{line} {word}".strip()
        if line and font.getlength(candidate) > width:
            lines.append(line)
            candidate = word
        line = candidate
    lines.append(line)
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] += "..."
    return [_fit(line, font, width) for line in lines]


def _fit(line: str, font, width: int) -> str:
    while font.getlength(line) > width and len(line) > 3:
        line = line[:-4] + "..."
    return line


def render_grid(rows: Sequence[tuple[str, Sequence[Image.Image]]], column_labels: Sequence[str],
                captions: Optional[Sequence[Sequence[str]]] = None, title: Optional[Sequence[str]] = None,
                min_tile: int = 0) -> Image.Image:
    """`rows`: (label, one image per column); a row label may have several lines ('\\n').
    `captions`: a line under each tile, per row. `title`: lines above everything. Tiles smaller
    than `min_tile` px are enlarged by an integer factor with NEAREST (every generated pixel a
    visible block, nothing invented)."""
    n = len(column_labels)
    if not rows or not n or any(len(images) != n for _, images in rows):
        raise ValueError(f"a grid needs at least one row and column, and as many images in each row as column "
                         f"labels ({n}); got rows of {[len(images) for _, images in rows]}")
    sizes = {im.size for _, images in rows for im in images}
    if len(sizes) != 1:
        raise ValueError(f"a grid needs images of one size, got {sorted(sizes)}")
    (w, h), = sizes
    factor = max(1, math.ceil(min_tile / max(w, h))) if min_tile else 1
    tile = (w * factor, h * factor)
    probe = grid_layout(tile, n)
    font = ImageFont.load_default(size=probe.font_size)
    widest = max(font.getlength(line) for label, _ in rows for line in label.split("\n"))
    layout = grid_layout(tile, n, rows=len(rows), label_w=max(probe.label_w, math.ceil(widest) + 2 * probe.gap),
                         captions=captions is not None, title_lines=len(title or ()))
    line_h = (layout.header_h - layout.gap) // HEADER_LINES
    title_w = max((font.getlength(line) for line in title or ()), default=0)
    grid = Image.new("RGB", (max(layout.size[0], math.ceil(title_w) + 2 * layout.gap), layout.size[1]), "white")
    draw = ImageDraw.Draw(grid)
    for k, line in enumerate(title or ()):
        draw.text((layout.gap, k * line_h), line, fill="black" if k == 0 else "dimgray", font=font)
    for col, label in enumerate(column_labels):
        x, _ = layout.tile_origin(0, col)
        for k, line in enumerate(wrap_label(label, font, tile[0], HEADER_LINES)):
            draw.text((x, layout.title_h + k * line_h), line, fill="black", font=font)
    for row, (label, images) in enumerate(rows):
        _, y = layout.tile_origin(row, 0)
        lines = label.split("\n")
        for k, line in enumerate(lines):
            draw.text((layout.gap, y + tile[1] // 2 + (k - (len(lines) - 1) / 2) * line_h), line,
                      fill="black" if k == 0 else "dimgray", font=font, anchor="lm")
        for col, im in enumerate(images):
            x, _ = layout.tile_origin(row, col)
            im = im.convert("RGB")
            grid.paste(im.resize(tile, Image.NEAREST) if factor > 1 else im, (x, y))
            if captions is not None:
                draw.text((x, y + tile[1] + 1), captions[row][col], fill="dimgray", font=font)
    return grid


def make_grid(base: list[Image.Image], lora: list[Image.Image], labels: list[str]) -> Image.Image:
    """Row 1 the base model's images, row 2 the LoRA's, one column per label."""
    if not (len(base) == len(lora) == len(labels)) or not base:
        raise ValueError(f"make_grid needs as many base ({len(base)}) as LoRA ({len(lora)}) images as labels "
                         f"({len(labels)}), at least one")
    return render_grid([("base", base), ("LoRA", lora)], labels)
