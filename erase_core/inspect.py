"""Attention inspection: where the image looks at a word while it is generated, per block and sampling step."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from PIL import Image

from . import render
from .flux.attention import AttentionPatch, CapturedMaps
from .tokens import tokenize_with_offsets, token_indices


@dataclass
class Inspection:
    """One inspected generation: the image(s), the word's tokens and their captured maps."""

    prompt: str
    word: str
    tokens: list[str]
    indices: list[int]
    images: torch.Tensor  # (B, 3, H, W)
    captured: CapturedMaps
    blocks: list[str]
    steps: list[int]

    def mass(self) -> float:
        """Attention mass on the word's tokens, averaged over the chosen blocks, steps and images."""
        return float(self.captured.mass(self.blocks, self.steps).mean())

    def mass_table(self) -> dict[str, dict[int, float]]:
        return {b: {s: float(self.captured.mass([b], [s]).mean()) for s in self.steps} for b in self.blocks}

    def word_map(self) -> torch.Tensor:
        """(B, h, w): the word's map (sum over its tokens), mean over chosen blocks and steps."""
        return self.captured.mean(self.blocks, self.steps).sum(1)

    def to_json(self) -> dict:
        return {"prompt": self.prompt, "word": self.word, "tokens": self.tokens, "token_indices": self.indices,
                "blocks": self.blocks, "steps": self.steps, "attention_mass": self.mass(),
                "attention_mass_per_block_step": self.mass_table()}


def resolve_selection(available: Sequence, wanted: Sequence | None, what: str) -> list:
    if not wanted:
        return list(available)
    missing = [w for w in wanted if w not in available]
    if missing:
        raise ValueError(f"{what} {missing[0]!r} was not captured; available: {list(available)}")
    return list(wanted)


def inspect_sandbox(world, prompt: str, word: str, blocks: Sequence[str] | None = None,
                    steps: Sequence[int] | None = None, seed: int = 0, n: int = 1, sample_steps: int | None = None,
                    cfg_scale: float | None = None, suppress: float | None = None, transformer=None) -> Inspection:
    """Generate ``n`` images of ``prompt`` on the sandbox world while capturing the maps of ``word``'s tokens
    (``sample_steps`` and ``cfg_scale`` default to the world's sampler)."""
    tokenized = tokenize_with_offsets(world.tokenizer, prompt)
    idx = token_indices(tokenized, word)
    model = transformer if transformer is not None else world.transformer
    grid = (world.cfg.latent_size // 2, world.cfg.latent_size // 2)
    with AttentionPatch(model, idx, blocks=blocks, suppress=suppress, grid=grid) as patch:
        images = world.sample([prompt] * n, seed=seed, steps=sample_steps, cfg_scale=cfg_scale,
                              transformer=model, patch=patch)
    cap = patch.result
    return Inspection(prompt, word, [tokenized.tokens[i] for i in idx], idx, images, cap, cap.blocks(),
                      resolve_selection(cap.steps(), steps, "step"))


def inspection_grid(ins: Inspection, scale: int = 4, image_index: int = 0) -> Image.Image:
    """Rows: each token of the word and the whole word; columns: the image, each chosen step, their mean."""
    img = ins.images[image_index]
    size = img.shape[-1] * scale
    big = torch.nn.functional.interpolate(img[None], size=(size, size), mode="nearest")[0]
    per_step = {s: ins.captured.mean(ins.blocks, [s])[image_index] for s in ins.steps}  # (K, h, w)
    mean = ins.captured.mean(ins.blocks, ins.steps)[image_index]
    rows = [(tok.replace("▁", "_"), k) for k, tok in enumerate(ins.tokens)] + [(f"'{ins.word}'", None)]
    tiles, labels = [], []
    vmax = float(torch.stack([m.sum(0) for m in per_step.values()]).max())
    for _, k in rows:
        tiles.append(render.to_pil(big))
        labels.append("image")
        for s, m in per_step.items():
            mk = m.sum(0) if k is None else m[k]
            tiles.append(render.to_pil(render.overlay(big, mk, vmax=vmax)))
            labels.append(f"step {s}")
        mk = mean.sum(0) if k is None else mean[k]
        tiles.append(render.to_pil(render.overlay(big, mk, vmax=vmax)))
        labels.append("mean")
    title = f"'{ins.word}' in '{ins.prompt}'  blocks {','.join(ins.blocks)}  mass {ins.mass():.3f}"
    return render.grid(tiles, cols=len(per_step) + 2, labels=labels, row_labels=[r for r, _ in rows], title=title)
