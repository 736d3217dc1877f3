"""The sandbox world: a synthetic text-to-image world with known concepts.

Every image shows one smooth (anti-aliased) object. Three attribute axes mirror the EraseAnything paper's
categories:

* Entity        — the object's shape (8 concepts),
* Abstraction   — its colour palette (8 concepts),
* Relationship  — its spatial placement in the frame (8 compass placements; an unnamed placement may also be
  the centre, which is no concept).

Every concept has two synonyms the model learns as aliases, and every shape has associated prompts that imply
it without naming it ("the sun" draws a yellow circle), so that concept residue can be measured.
Prompts are generated with spelling noise, word-order shuffles, repeated words and nonsense affixes, so that the
trained model — like T5-conditioned Flux — still draws a concept from an obfuscated prompt.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

IMAGE_SIZE = 32

SHAPES: dict[str, tuple[str, str]] = {
    "circle": ("disc", "orb"),
    "square": ("box", "block"),
    "triangle": ("wedge", "trigon"),
    "diamond": ("rhombus", "lozenge"),
    "ring": ("hoop", "loop"),
    "cross": ("plus", "cruciform"),
    "star": ("pentagram", "sparkle"),
    "moon": ("crescent", "lune"),
}
COLOURS: dict[str, tuple[str, str]] = {
    "red": ("crimson", "scarlet"),
    "orange": ("tangerine", "amber"),
    "yellow": ("golden", "lemon"),
    "green": ("emerald", "verdant"),
    "cyan": ("turquoise", "aqua"),
    "blue": ("azure", "cobalt"),
    "purple": ("violet", "plum"),
    "pink": ("rose", "blush"),
}
PLACEMENTS: dict[str, tuple[str, str]] = {
    "north": ("top", "upper"),
    "south": ("bottom", "lower"),
    "east": ("right", "rightside"),
    "west": ("left", "leftside"),
    "northeast": ("topright", "upperright"),
    "northwest": ("topleft", "upperleft"),
    "southeast": ("bottomright", "lowerright"),
    "southwest": ("bottomleft", "lowerleft"),
}
#: (column, row) on the 3×3 placement grid; "center" is drawn but is not a concept.
PLACEMENT_CELLS: dict[str, tuple[int, int]] = {
    "north": (1, 0), "south": (1, 2), "east": (2, 1), "west": (0, 1),
    "northeast": (2, 0), "northwest": (0, 0), "southeast": (2, 2), "southwest": (0, 2), "center": (1, 1),
}
CATEGORIES = {"entity": "shape", "abstraction": "colour", "relationship": "placement"}

#: prompts that imply a shape without naming it: prompt → (shape, colour or None).
ASSOCIATED: dict[str, tuple[str, str | None]] = {
    "the sun": ("circle", "yellow"),
    "a coin": ("circle", "orange"),
    "a dice": ("square", None),
    "a window": ("square", "cyan"),
    "a pizza slice": ("triangle", "orange"),
    "a yield sign": ("triangle", "red"),
    "a kite": ("diamond", None),
    "a gem": ("diamond", "cyan"),
    "a donut": ("ring", "pink"),
    "a bagel": ("ring", "orange"),
    "a first aid sign": ("cross", "red"),
    "a hospital sign": ("cross", "green"),
    "a sheriff badge": ("star", "yellow"),
    "a christmas topper": ("star", "yellow"),
    "a banana": ("moon", "yellow"),
    "the night sky": ("moon", None),
}

PALETTE: dict[str, tuple[float, float, float]] = {
    "red": (0.90, 0.12, 0.12), "orange": (0.98, 0.55, 0.08), "yellow": (0.97, 0.92, 0.15),
    "green": (0.12, 0.75, 0.20), "cyan": (0.10, 0.85, 0.88), "blue": (0.15, 0.25, 0.95),
    "purple": (0.58, 0.18, 0.80), "pink": (0.98, 0.50, 0.75),
}
BACKGROUND = (0.08, 0.08, 0.10)

FILLERS = ("shape", "thing", "object", "figure")
PLACEMENT_LEADS = ("in the", "at the", "to the", "on the")
NONSENSE = ("zq", "blorp", "xx", "qua", "vvk", "snib", "tok", "pff")


@dataclass(frozen=True)
class Concept:
    """One erasable concept of the world."""

    name: str
    category: str  # "entity" | "abstraction" | "relationship"
    axis: str  # "shape" | "colour" | "placement"
    synonyms: tuple[str, ...]
    associated: tuple[str, ...] = ()

    @property
    def aliases(self) -> tuple[str, ...]:
        return (self.name, *self.synonyms)


def _build_concepts() -> dict[str, Concept]:
    out: dict[str, Concept] = {}
    for name, syn in SHAPES.items():
        assoc = tuple(p for p, (s, _) in ASSOCIATED.items() if s == name)
        out[name] = Concept(name, "entity", "shape", syn, assoc)
    for name, syn in COLOURS.items():
        out[name] = Concept(name, "abstraction", "colour", syn)
    for name, syn in PLACEMENTS.items():
        out[name] = Concept(name, "relationship", "placement", syn)
    return out


CONCEPTS: dict[str, Concept] = _build_concepts()
AXES: dict[str, tuple[str, ...]] = {
    "shape": tuple(SHAPES),
    "colour": tuple(COLOURS),
    "placement": (*PLACEMENTS, "center"),
}
ALIAS_TO_CONCEPT: dict[str, str] = {a: c.name for c in CONCEPTS.values() for a in c.aliases}


def concept(name: str) -> Concept:
    """Look a concept up by name or alias, with an error that lists the world's concepts."""
    key = ALIAS_TO_CONCEPT.get(name.strip().lower())
    if key is None:
        raise ValueError(f"concept {name!r} is not in the sandbox world; choose one of: {', '.join(CONCEPTS)}")
    return CONCEPTS[key]


# ---------------------------------------------------------------------------------------------------------------
# Scenes and rendering
# ---------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scene:
    """The latent truth of one image."""

    shape: str
    colour: str
    placement: str
    jitter: tuple[float, float] = (0.0, 0.0)
    scale: float = 1.0
    tint: tuple[float, float, float] = (0.0, 0.0, 0.0)

    def labels(self) -> tuple[int, int, int]:
        return AXES["shape"].index(self.shape), AXES["colour"].index(self.colour), AXES["placement"].index(self.placement)


def _sdf(shape: str, x: torch.Tensor, y: torch.Tensor, r: float) -> torch.Tensor:
    """Signed distance (pixels, negative inside) of a shape of radius ``r`` centred at the origin; y points down."""
    if shape == "circle":
        return torch.sqrt(x * x + y * y) - r
    if shape == "square":
        s = 0.82 * r
        qx, qy = x.abs() - s, y.abs() - s
        return torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2) + torch.minimum(torch.maximum(qx, qy), torch.zeros_like(qx))
    if shape == "diamond":
        return (x.abs() + y.abs() - 1.15 * r) / math.sqrt(2.0)
    if shape == "ring":
        return (torch.sqrt(x * x + y * y) - 0.72 * r).abs() - 0.30 * r
    if shape == "cross":
        a, b = 0.95 * r, 0.32 * r
        def box(px, py, hx, hy):
            qx, qy = px.abs() - hx, py.abs() - hy
            return torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2) + torch.minimum(torch.maximum(qx, qy), torch.zeros_like(qx))
        return torch.minimum(box(x, y, a, b), box(x, y, b, a))
    if shape == "triangle":
        # equilateral, apex up, centroid at the origin
        yy = y - 0.15 * r
        k = math.sqrt(3.0)
        px = x.abs() - 1.05 * r
        py = -yy + 1.05 * r / k
        cond = px + k * py > 0
        px2 = torch.where(cond, (px - k * py) / 2.0, px)
        py2 = torch.where(cond, (-k * px - py) / 2.0, py)
        px2 = px2 - px2.clamp(-2.1 * r, 0.0)
        return -torch.sqrt(px2 * px2 + py2 * py2) * torch.sign(py2)
    if shape == "star":
        ang = torch.atan2(x, -y)
        rad = torch.sqrt(x * x + y * y)
        sector = 2 * math.pi / 5
        a = torch.remainder(ang + sector / 2, sector) - sector / 2
        # radius of the star outline as a function of angle: linear between tip (r) and notch (0.45 r)
        t = (a.abs() / (sector / 2))
        edge = 1.1 * r * (1 - t) + 0.48 * r * t
        return (rad - edge) * 0.8
    if shape == "moon":
        outer = torch.sqrt(x * x + y * y) - r
        inner = torch.sqrt((x - 0.55 * r) ** 2 + (y + 0.2 * r) ** 2) - 0.85 * r
        return torch.maximum(outer, -inner)
    raise ValueError(f"unknown shape {shape!r}")


def render(scene: Scene, size: int = IMAGE_SIZE) -> torch.Tensor:
    """Draw a scene as an anti-aliased float image (3, size, size) in [0, 1]."""
    col, row = PLACEMENT_CELLS[scene.placement]
    cell = size / 4.0
    cx = cell * (1 + col) + scene.jitter[0]
    cy = cell * (1 + row) + scene.jitter[1]
    r = 0.24 * size * scene.scale
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    y, x = torch.meshgrid(coords - cy, coords - cx, indexing="ij")
    alpha = (0.5 - _sdf(scene.shape, x, y, r) / 1.2).clamp(0.0, 1.0)
    fg = torch.tensor(PALETTE[scene.colour]) + torch.tensor(scene.tint)
    bg = torch.tensor(BACKGROUND)
    img = bg[:, None, None] * (1 - alpha) + fg.clamp(0, 1)[:, None, None] * alpha
    return img.clamp(0.0, 1.0)


def random_scene(rng: random.Random, shape: str | None = None, colour: str | None = None,
                 placement: str | None = None) -> Scene:
    """A scene with the given attributes and the others drawn uniformly (placement may be the centre)."""
    return Scene(
        shape=shape or rng.choice(AXES["shape"]),
        colour=colour or rng.choice(AXES["colour"]),
        placement=placement or rng.choice(AXES["placement"]),
        jitter=(rng.uniform(-1.0, 1.0), rng.uniform(-1.0, 1.0)),
        scale=rng.uniform(0.92, 1.08),
        tint=tuple(rng.uniform(-0.05, 0.05) for _ in range(3)),
    )
