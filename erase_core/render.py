"""Pictures people would rather look at than read: heatmap overlays, labelled grids, masks (PIL only)."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

# anchor colours of an inferno-like ramp, dark → bright
_RAMP = torch.tensor([[0.0, 0.0, 0.02], [0.34, 0.06, 0.43], [0.73, 0.21, 0.33], [0.98, 0.55, 0.04], [0.99, 1.0, 0.64]])


def to_pil(img: torch.Tensor, scale: int = 1) -> Image.Image:
    """(3, H, W) in [0, 1] → RGB image, enlarged ``scale``× with nearest neighbours."""
    arr = (img.detach().float().clamp(0, 1) * 255).round().byte().permute(1, 2, 0).cpu().numpy()
    pil = Image.fromarray(arr, mode="RGB")
    return pil.resize((pil.width * scale, pil.height * scale), Image.NEAREST) if scale != 1 else pil


def normalise(m: torch.Tensor, vmax: float | None = None) -> torch.Tensor:
    """Scale a map to [0, 1] by its max (or a shared ``vmax`` so several maps compare)."""
    top = float(vmax) if vmax is not None else float(m.max())
    return (m / top).clamp(0, 1) if top > 0 else torch.zeros_like(m)


def colormap(m: torch.Tensor) -> torch.Tensor:
    """(h, w) in [0, 1] → (3, h, w) colours along the ramp."""
    pos = m.clamp(0, 1) * (len(_RAMP) - 1)
    lo = pos.floor().long().clamp(max=len(_RAMP) - 2)
    frac = (pos - lo).unsqueeze(-1)
    rgb = _RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac
    return rgb.permute(2, 0, 1)


def upsample(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(h, w) map → (H, W), bilinear."""
    return F.interpolate(m[None, None].float(), size=size, mode="bilinear", align_corners=False)[0, 0]


def overlay(image: torch.Tensor, m: torch.Tensor, alpha: float = 0.6, vmax: float | None = None) -> torch.Tensor:
    """Blend a heatmap (h, w) over an image (3, H, W); returns (3, H, W)."""
    heat = colormap(upsample(normalise(m, vmax), image.shape[-2:]))
    return (1 - alpha) * image.float() + alpha * heat


def mask(m: torch.Tensor, size: tuple[int, int], threshold: float = 0.5) -> torch.Tensor:
    """Binary mask (H, W) where the upsampled, max-normalised map reaches ``threshold``."""
    return (upsample(normalise(m), size) >= threshold).float()


def _font(size: int = 12) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def grid(tiles: Sequence[Image.Image], cols: int, labels: Sequence[str] | None = None,
         row_labels: Sequence[str] | None = None, title: str | None = None, pad: int = 4) -> Image.Image:
    """Tiles in a grid with an optional caption under each tile, a label before each row and a title."""
    if not tiles:
        raise ValueError("grid needs at least one tile")
    w, h = tiles[0].size
    font = _font(12)
    cap = 16 if labels else 0
    left = (max(len(s) for s in row_labels) * 7 + 8) if row_labels else 0
    top = 20 if title else 0
    rows = (len(tiles) + cols - 1) // cols
    out = Image.new("RGB", (left + cols * (w + pad) + pad, top + rows * (h + cap + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    if title:
        draw.text((pad, 3), title, fill=(0, 0, 0), font=font)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        x, y = left + pad + c * (w + pad), top + pad + r * (h + cap + pad)
        out.paste(tile, (x, y))
        if labels:
            draw.text((x, y + h + 1), labels[i][: max(4, w // 6)], fill=(0, 0, 0), font=font)
    for r, text in enumerate(row_labels or []):
        draw.text((4, top + pad + r * (h + cap + pad) + h // 2 - 6), text, fill=(0, 0, 0), font=font)
    return out


def bar_chart(values: dict[str, float], title: str, width: int = 360, vmax: float | None = None) -> Image.Image:
    """A horizontal bar chart (e.g. attention mass or a concept's rate per prompt)."""
    font = _font(12)
    rows = list(values.items())
    top = vmax if vmax is not None else max([v for _, v in rows] + [1e-9])
    label_w = max(len(k) for k, _ in rows) * 7 + 10
    out = Image.new("RGB", (label_w + width + 60, 24 + 18 * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    draw.text((4, 4), title, fill=(0, 0, 0), font=font)
    for i, (k, v) in enumerate(rows):
        y = 24 + 18 * i
        draw.text((4, y), k, fill=(0, 0, 0), font=font)
        draw.rectangle([label_w, y + 2, label_w + int(width * min(1.0, v / top)), y + 14], fill=(200, 70, 50))
        draw.text((label_w + width + 4, y), f"{v:.3g}", fill=(0, 0, 0), font=font)
    return out


def matrix_image(m: torch.Tensor, names: Sequence[str], title: str, cell: int = 22) -> Image.Image:
    """A labelled heatmap of a square matrix in [0, 1] (e.g. pairwise overlap of LoRA deltas), values printed."""
    n = m.shape[0]
    font = _font(10)
    label_w = max(len(s) for s in names) * 6 + 8
    title_font = _font(12)
    title_w = int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(title, font=title_font)) + 8
    out = Image.new("RGB", (max(label_w + n * cell + 8, title_w), 24 + label_w + n * cell), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    draw.text((4, 4), title, fill=(0, 0, 0), font=title_font)
    colours = colormap(m.float().clamp(0, 1))
    y0 = 24 + label_w
    for i in range(n):
        draw.text((4, y0 + i * cell + cell // 2 - 5), names[i], fill=(0, 0, 0), font=font)
        col = Image.new("RGB", (label_w, 12), (255, 255, 255))
        ImageDraw.Draw(col).text((0, 0), names[i], fill=(0, 0, 0), font=font)
        out.paste(col.rotate(90, expand=True), (label_w + i * cell + cell // 2 - 6, 24))
        for j in range(n):
            rgb = tuple(int(255 * v) for v in colours[:, i, j].tolist())
            x, y = label_w + j * cell, y0 + i * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=rgb)
            ink = (0, 0, 0) if sum(rgb) > 380 else (255, 255, 255)
            draw.text((x + 2, y + cell // 2 - 5), f"{float(m[i, j]):.1f}"[-3:] if i != j else "", fill=ink, font=font)
    return out


_SERIES = ((200, 70, 50), (40, 110, 200), (60, 160, 70), (150, 80, 180), (230, 150, 30), (90, 90, 90))


def line_plot(series: dict[str, list[tuple[float, float]]], title: str, xlabel: str, ylabel: str,
              size: tuple[int, int] = (420, 260), ylim: tuple[float, float] | None = None) -> Image.Image:
    """A small line chart (e.g. loss curves, or efficacy against the number of merged LoRAs)."""
    font = _font(11)
    w, h = size
    left, right, top, bottom = 48, 110, 24, 34
    out = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(out)
    draw.text((left, 4), title, fill=(0, 0, 0), font=_font(12))
    pts = [p for s in series.values() for p in s if all(map(lambda v: v == v, p))]
    if not pts:
        return out
    x0, x1 = min(p[0] for p in pts), max(p[0] for p in pts)
    y0, y1 = ylim or (min(p[1] for p in pts), max(p[1] for p in pts))
    x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1)
    pw, ph = w - left - right, h - top - bottom

    def xy(p):
        return left + (p[0] - x0) / (x1 - x0) * pw, top + (1 - (min(max(p[1], y0), y1) - y0) / (y1 - y0)) * ph

    draw.rectangle([left, top, left + pw, top + ph], outline=(120, 120, 120))
    for frac in (0.0, 0.5, 1.0):
        yv = y0 + frac * (y1 - y0)
        draw.text((4, top + (1 - frac) * ph - 6), f"{yv:.3g}", fill=(0, 0, 0), font=font)
        xv = x0 + frac * (x1 - x0)
        draw.text((left + frac * pw - 8, top + ph + 4), f"{xv:.3g}", fill=(0, 0, 0), font=font)
    draw.text((left + pw // 2 - 3 * len(xlabel), h - 14), xlabel, fill=(0, 0, 0), font=font)
    draw.text((4, top - 14), ylabel, fill=(80, 80, 80), font=font)
    for i, (name, s) in enumerate(series.items()):
        colour = _SERIES[i % len(_SERIES)]
        coords = [xy(p) for p in s]
        if len(coords) > 1:
            draw.line(coords, fill=colour, width=2)
        for cx, cy in coords:
            draw.ellipse([cx - 2, cy - 2, cx + 2, cy + 2], fill=colour)
        draw.text((left + pw + 8, top + 14 * i), name[:16], fill=colour, font=font)
    return out
