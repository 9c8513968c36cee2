"""A small line plot drawn with Pillow (no plotting library needed): accuracy vs tokens kept."""

from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#7f7f7f",
           "#bcbd22", "#17becf"]


def line_plot(series: dict[str, list[tuple[float, float]]], path: str | Path, title: str,
              xlabel: str, ylabel: str, reference: float | None = None,
              size: tuple[int, int] = (900, 560)) -> Path:
    """One line per series of (x, y) points; an optional dashed horizontal reference line.
    Writes a PNG to `path` and returns it."""
    width, height = size
    left, right, top, bottom = 80, 220, 50, 60
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    font = ImageFont.load_default()
    points = [p for pts in series.values() for p in pts]
    xs = [x for x, _ in points]
    ys = [y for _, y in points] + ([reference] if reference is not None else [])
    x0, x1 = min(xs + [0]), max(xs) * 1.05 or 1
    y0, y1 = min(ys + [0]), max(ys) * 1.05 or 1

    def at(x: float, y: float) -> tuple[float, float]:
        return (left + (x - x0) / (x1 - x0) * (width - left - right),
                height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom))

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for i in range(6):  # ticks
        y = y0 + (y1 - y0) * i / 5
        _, py = at(x0, y)
        draw.line([left - 4, py, left, py], fill="black")
        draw.text((8, py - 6), f"{y:.2f}", fill="black", font=font)
        x = x0 + (x1 - x0) * i / 5
        px, _ = at(x, y0)
        draw.line([px, height - bottom, px, height - bottom + 4], fill="black")
        draw.text((px - 10, height - bottom + 8), f"{x:.0f}", fill="black", font=font)
    if reference is not None:
        _, py = at(x0, reference)
        for px in range(left, width - right, 12):
            draw.line([px, py, min(px + 6, width - right), py], fill="gray")
    for i, (name, pts) in enumerate(series.items()):
        colour = PALETTE[i % len(PALETTE)]
        pixels = [at(x, y) for x, y in sorted(pts)]
        if len(pixels) > 1:
            draw.line(pixels, fill=colour, width=2)
        for px, py in pixels:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        ly = top + 16 * i
        draw.line([width - right + 12, ly + 6, width - right + 32, ly + 6], fill=colour, width=3)
        draw.text((width - right + 38, ly), name, fill="black", font=font)
    draw.text((left, 18), title, fill="black", font=font)
    draw.text(((width - right + left) // 2 - 40, height - 25), xlabel, fill="black", font=font)
    draw.text((8, top - 30), ylabel, fill="black", font=font)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
