"""What the mined neighbours of a concept mean: for each sample, its nearest vocabulary words and what the base model
(and optionally an erased model) draws from it, judged by the sandbox classifier.

The concept's embedding is replaced in place inside its plain prompt's token sequence, so a sample is "the prompt,
with the concept word moved to e + η" — exactly what the RealEra trainer feeds the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import render
from .flux.backend import TextCond
from .neighbours import NeighbourConfig, mine, nearest_labels


@dataclass
class NeighbourRow:
    kind: str  # "concept" | "neighbour" | "beyond"
    distance: float  # ‖η‖ / ‖e‖
    cosine: float
    labels: list[tuple[str, float]]
    base_rate: float
    erased_rate: float | None = None
    images: list[torch.Tensor] = field(default_factory=list, repr=False)


def vocabulary_table(world) -> tuple[torch.Tensor, list[str]]:
    """Every whole word of the sandbox vocabulary encoded alone: (V, D) mean token vectors and the words."""
    from .sandbox.world import ALIAS_TO_CONCEPT, FILLERS

    words = sorted(set(ALIAS_TO_CONCEPT) | set(FILLERS))
    rows = []
    for w in words:
        prompt = f"a {w}"
        seq = world.encode([prompt]).sequence[0]
        rows.append(seq[world.token_indices(prompt, w)].mean(0))
    return torch.stack(rows), words


@torch.no_grad()
def preview(world, concept: str, cfg: NeighbourConfig = NeighbourConfig(), erased=None, samples: int = 8,
            seed: int = 0) -> list[NeighbourRow]:
    """Mine neighbours/beyond-concept samples of ``concept`` in its plain prompt and generate from each."""
    from .sandbox.prompts import concept_prompt
    from .sandbox.world import CONCEPTS

    c = CONCEPTS[concept]
    prompt = concept_prompt(c.name, c.axis)
    text = world.encode([prompt])
    idx = world.token_indices(prompt, c.name)
    e = text.sequence[0, idx]
    near, far = mine(e, cfg)
    table, words = vocabulary_table(world)
    variants = [("concept", e)] + [("neighbour", s) for s in near] + [("beyond", s) for s in far]
    rows = []
    flat = e.flatten()
    for kind, emb in variants:
        seq = text.sequence.clone()
        seq[0, idx] = emb
        cond = TextCond(seq.expand(samples, -1, -1), text.pooled.expand(samples, -1))
        rates = []
        imgs = None
        for model in (None, erased) if erased is not None else (None,):
            out = world.sample([prompt] * samples, seed=seed, text=cond, transformer=model)
            rates.append(100.0 * sum(v == c.name for v in world.classify(out)[c.axis]) / samples)
            imgs = out if imgs is None else torch.cat([imgs, out])
        d = ((emb.flatten() - flat).norm() / flat.norm()).item()
        cos = torch.nn.functional.cosine_similarity(emb.flatten(), flat, dim=0).item()
        rows.append(NeighbourRow(kind, d, cos, nearest_labels(emb[None], table, words)[0], rates[0],
                                 rates[1] if len(rates) > 1 else None, list(imgs)))
    return rows


def preview_grid(rows: list[NeighbourRow], concept: str, per_row: int = 4) -> "render.Image.Image":
    """One row per sample: base images (and erased images), labelled with distance, nearest words and rates."""
    tiles, labels = [], []
    erased = rows[0].erased_rate is not None
    cols = per_row * (2 if erased else 1)
    for r in rows:
        n = len(r.images) // (2 if erased else 1)
        pick = r.images[:per_row] + (r.images[n:n + per_row] if erased else [])
        tiles += [render.to_pil(im, 2) for im in pick]
        rate = f"{r.base_rate:.0f}%" + (f"→{r.erased_rate:.0f}%" if erased else "")
        labels.append(f"{r.kind[:5]} d{r.distance:.2f} {r.labels[0][0]} {rate}")
    title = f"'{concept}': {per_row} base" + (f" | {per_row} erased" if erased else "") + \
            " samples per row; row: kind, d = |eta|/|e|, nearest word, rate"
    return render.grid(tiles, cols=cols, row_labels=labels, title=title)
