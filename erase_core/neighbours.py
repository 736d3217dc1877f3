"""RealEra neighbour-concept mining (Sec. 4.1) and beyond-concept samples (Sec. 4.2).

The concept's embedding e is the text encoder's output at the concept's tokens (and the tokens after it, as in the
paper), flattened to one vector: the rows the text K/V projections of Flux's dual-stream blocks consume. A sample
is e + η with

    v ~ N(0, σ²I),   v̂ = (v − e) / ‖v − e‖,   r ~ U[lo, hi],   η = r · v̂,   σ = ‖e‖ / √dim(e),

kept as a **neighbour** when r ∈ [0, D1] and S2 ≤ cos(e, e + η) ≤ S1, and as a **beyond-concept** sample when
r ∈ [D1, D2) and cos(e, e + η) < S2.

Radii are given relative to ‖e‖ (``d1 = 0.8`` means 0.8 ‖e‖) and v is drawn at e's own scale (σ = ‖e‖/√D; the
paper's N(0, I) is the case ‖e‖ = √D, e.g. LayerNorm outputs like the sandbox's), so the geometry of the samples —
the cosine at a given relative radius — is the same for any embedding scale, and the defaults carry over to T5-XXL.
Since ‖v‖ ≈ ‖e‖, v̂ leans toward −e and the cosine falls faster than 1/√(1 + (r/‖e‖)²). The defaults come from a measurement
(``bench/neighbour_radius.py``, sandbox, 8 samples per point): for ``red``/``west``/``moon`` the base model still
draws the concept in ≥ 94 % of samples up to r = 0.8 ‖e‖ (cos ≈ 0.6–0.75), 29–55 % at 1.0–1.2 ‖e‖ (cos ≈ 0.25) and
12 % / 8 % / 54 % at 1.2–1.6 ‖e‖ (cos ≈ 0). So neighbours are r ≤ D1 = 0.8 with cos ∈ [S2, S1 = 0.995] (closer
is the concept itself), and beyond-concept samples are r ∈ [0.8, D2 = 1.6) with cos < S2 = 0.2, which in practice
keeps only r ≳ 1.2 ‖e‖: preserving samples that still draw the concept would preserve the concept.
(SD's CLIP numbers do not transfer: the scales differ.)
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class NeighbourConfig:
    """Bounds of the mined samples; validated on creation."""

    d1: float = 0.8  # neighbour radius bound, × ‖e‖
    d2: float = 1.6  # beyond-concept radius bound, × ‖e‖
    s1: float = 0.995  # neighbours: cos(e, e + η) ≤ S1 (not the concept itself)
    s2: float = 0.2  # neighbours: cos ≥ S2; beyond-concept: cos < S2
    m: int = 8  # neighbours
    n: int = 8  # beyond-concept samples
    seed: int = 0
    max_draws: int = 100_000

    def __post_init__(self):
        if not 0 < self.d1 < self.d2:
            raise ValueError(f"need 0 < d1 < d2; got d1={self.d1}, d2={self.d2} (radii in units of ‖e‖)")
        if not -1 <= self.s2 < self.s1 <= 1:
            raise ValueError(f"need -1 ≤ s2 < s1 ≤ 1; got s1={self.s1}, s2={self.s2}")
        if self.m < 0 or self.n < 0 or self.m + self.n == 0:
            raise ValueError(f"m={self.m}, n={self.n}: ask for at least one sample, none negative")


def _draw(e: torch.Tensor, lo: float, hi: float, keep, count: int, gen: torch.Generator, max_draws: int,
          what: str) -> torch.Tensor:
    """Vectorised rejection sampling of ``count`` perturbations η with radius U[lo, hi]·‖e‖ that ``keep``."""
    if count == 0:
        return e.new_zeros(0, e.numel())
    flat = e.flatten().double().cpu()  # drawn on the CPU: the same samples for a seed on every device
    scale = flat.norm().item()
    found, drawn, batch = [], 0, max(64, 4 * count)
    while sum(len(f) for f in found) < count:
        if drawn >= max_draws:
            raise ValueError(f"only {sum(len(f) for f in found)} of {count} {what} samples met the bounds in "
                             f"{drawn} draws; widen the cosine bounds (s1/s2) or the radii (d1/d2)")
        v = torch.randn(batch, flat.numel(), generator=gen, dtype=torch.float64) * (scale / flat.numel() ** 0.5)
        direction = v - flat
        direction = direction / direction.norm(dim=1, keepdim=True)
        r = (lo + (hi - lo) * torch.rand(batch, 1, generator=gen, dtype=torch.float64)) * scale
        eta = r * direction
        cos = torch.nn.functional.cosine_similarity(flat[None], flat[None] + eta, dim=1)
        found.append(eta[keep(cos)])
        drawn += batch
    return torch.cat(found)[:count].to(e)


def mine(e: torch.Tensor, cfg: NeighbourConfig = NeighbourConfig()) -> tuple[torch.Tensor, torch.Tensor]:
    """(neighbours (M, *e.shape), beyond-concept samples (N, *e.shape)): perturbed copies of ``e``, seeded."""
    gen = torch.Generator().manual_seed(cfg.seed)
    near = _draw(e, 0.0, cfg.d1, lambda c: (c >= cfg.s2) & (c <= cfg.s1), cfg.m, gen, cfg.max_draws, "neighbour")
    far = _draw(e, cfg.d1, cfg.d2, lambda c: c < cfg.s2, cfg.n, gen, cfg.max_draws, "beyond-concept")
    shape = (-1, *e.shape)
    return e[None] + near.view(shape), e[None] + far.view(shape)


def nearest_labels(samples: torch.Tensor, table: torch.Tensor, words: list[str], k: int = 3) -> list[list[tuple[str, float]]]:
    """For each sample (rows of the concept's tokens, (S, T, D) or (S, D)), the ``k`` vocabulary words whose
    encoded vectors (``table`` (V, D), one row per word of ``words``) are nearest in cosine to the sample's mean
    token vector."""
    q = samples.reshape(samples.shape[0], -1, samples.shape[-1]).mean(1)
    sim = torch.nn.functional.normalize(q.float(), dim=-1) @ torch.nn.functional.normalize(table.float(), dim=-1).T
    top = sim.topk(min(k, len(words)), dim=-1)
    return [[(words[j], round(float(s), 3)) for s, j in zip(vals.tolist(), idx.tolist())]
            for vals, idx in zip(top.values, top.indices)]


def perturb_rows(seq: torch.Tensor, rows: list[list[int]], kind: str, cfg: NeighbourConfig,
                 gen: torch.Generator) -> torch.Tensor:
    """A copy of ``seq`` (B, L, D) whose ``rows[b]`` of each prompt moved to one fresh neighbour (``kind="near"``)
    or beyond-concept sample (``"far"``) of themselves; seeds drawn from ``gen``. Empty row lists are left alone."""
    if kind not in ("near", "far"):
        raise ValueError(f"kind={kind!r}: choose near or far")
    out = seq.clone()
    for b, idx in enumerate(rows):
        seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
        if not idx:
            continue
        one = NeighbourConfig(**{**vars(cfg), "m": int(kind == "near"), "n": int(kind == "far"), "seed": seed})
        near, far = mine(seq[b, idx], one)
        out[b, idx] = (near if kind == "near" else far)[0]
    return out
