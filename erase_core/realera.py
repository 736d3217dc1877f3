"""RealEra on Flux: closed-form K/V edit, then LoRA noise alignment (Eq. 8–9) with mined neighbours.

Odd steps (Eq. 8):   ‖v_θ(z_t, p_c) − v̂(z_t, p_c*)‖²
Even steps (Eq. 9):  ‖v_θ(z_t, p'_c) − v̂(z_t, p_c*)‖² + ‖v_θ(z_t, p''_c) − v̂(z_t, p''_c)‖²

v̂ is the original model (no edit, no LoRA); v_θ the closed-form-edited model with the trainable LoRA; z_t comes
from base-model images of the anchor prompt p_c*; p'_c carries a neighbour of the concept's embedding (radius
≤ D1), p''_c is a preserved prompt whose content tokens carry a neighbour-sized perturbation, both resampled
every step. Beyond-concept samples enter through the closed form's preserve set. The result is one LoRA: the
closed-form delta and the trained LoRA stacked exactly.
"""
from __future__ import annotations

import torch

from . import losses
from .closed_form import ClosedFormConfig
from .concepts import ConceptSet
from .flux.backend import TextCond
from .flux.flow import noised
from .lora_file import LoraFile
from .merge import stack
from .neighbours import NeighbourConfig, perturb_rows
from .tokens import shuffle_words
from .train import EraseConfig, EraseResult, Eraser, _uniform


class RealEraEraser(Eraser):
    """Noise alignment on top of a closed-form edit; ``config.method`` must be ``realera``."""

    def __init__(self, world, concept: ConceptSet, config: EraseConfig, closed_form: LoraFile,
                 neighbours: NeighbourConfig | None = NeighbourConfig()):
        """``neighbours=None``: every step is Eq. 8 (the ablation "closed form + alignment", no mined neighbours)."""
        if config.method != "realera":
            raise ValueError(f"RealEraEraser needs method='realera', got {config.method!r}")
        self.closed_form, self.neighbour_cfg, self.calls = closed_form, neighbours, 0
        edited = world.backend().with_edit(closed_form)
        super().__init__(world, concept, config, transformer=edited, in_place=True)
        self.original = world.backend()  # v̂: the untouched base model

    @torch.no_grad()
    def _prepare(self) -> None:
        c, cfg = self.concept, self.cfg
        anchors = [c.substitute(c.prompts[i % len(c.prompts)], c.anchor) or c.anchor or " "
                   for i in range(cfg.base_samples)]
        self.anchor_x0 = self.world.sample_latents(anchors, seed=cfg.seed + 10_000)
        self.preserve, self.empty = [], self.world.encode([""])

    def _batch(self):
        cfg, c = self.cfg, self.concept
        prompts = [shuffle_words(self.rng.choice(c.prompts), self.rng, keep=c.word) for _ in range(cfg.batch)]
        anchors = [c.substitute(p, c.anchor) or " " for p in prompts]
        x0 = self.anchor_x0[torch.randint(0, len(self.anchor_x0), (cfg.batch,), generator=self.gen)]
        t = _uniform(cfg.batch, cfg.t_range, self.gen)
        t = t.to(x0.device)
        return prompts, anchors, noised(x0, self._randn(x0), t), t

    def _perturbed(self, prompts: list[str], rows: list[list[int]]) -> TextCond:
        """The prompts with the given token rows moved to a freshly mined neighbour of themselves."""
        text = self.world.encode(prompts)
        return TextCond(perturb_rows(text.sequence, rows, "near", self.neighbour_cfg, self.gen), text.pooled)

    def lower_step(self) -> dict[str, float]:
        prompts, anchors, x_t, t = self._batch()
        odd = self.calls % 2 == 0 or self.neighbour_cfg is None  # the paper's odd steps (1st, 3rd, …)
        self.calls += 1
        with torch.no_grad():
            target = self.original.velocity(x_t, t, self.world.encode(anchors))
            self.forwards["teacher"] += len(prompts)
        rows = [self.world.token_indices(p, self.concept.word) for p in prompts]
        cond = self.world.encode(prompts) if odd else self._perturbed(prompts, rows)
        loss = losses.anchor_loss(self._velocity(x_t, t, cond, "student"), target)
        out = {"align" if odd else "align_neighbour": loss.item()}
        if not odd and self.concept.preserve_prompts:
            kept = [self.rng.choice(self.concept.preserve_prompts) for _ in prompts]
            cond_p = self._perturbed(kept, self.world.content_rows(kept))
            with torch.no_grad():
                target_p = self.original.velocity(x_t, t, cond_p)
                self.forwards["teacher"] += len(prompts)
            l_keep = losses.anchor_loss(self._velocity(x_t, t, cond_p, "student"), target_p)
            loss = loss + l_keep
            out["preserve"] = l_keep.item()
        self._terms.append((loss, None))
        self._step()
        return out

    def upper_step(self) -> dict[str, float]:
        return {}


def realera_lora(trained: dict, closed_form: LoraFile) -> LoraFile:
    """The closed-form delta and the trained LoRA modules as one LoRA (stacked exactly where they share a module)."""
    out = dict(closed_form.modules)
    for name, m in trained.items():
        out[name] = stack([out[name], m], [1.0, 1.0]) if name in out else m
    return LoraFile(out, {**closed_form.meta, "method": "realera"})


def realera(world, concept: ConceptSet, config: EraseConfig, cf: ClosedFormConfig = ClosedFormConfig(),
            neighbours: NeighbourConfig | None = NeighbourConfig(), **train_kw) -> tuple[EraseResult, LoraFile]:
    """Closed form with neighbours, then noise alignment; returns the training result and the combined LoRA.

    ``neighbours=None`` mines nothing (closed form on the concept alone, Eq. 8 steps only); ``NeighbourConfig(n=0)``
    mines neighbours but no beyond-concept samples: the rows of RealEra's Table 3."""
    from .kv_edit import closed_form_erase

    edit = closed_form_erase(world, concept, cf, neighbours=neighbours, seed=config.seed)
    eraser = RealEraEraser(world, concept, config, edit, neighbours)
    result = eraser.train(**train_kw)
    return result, realera_lora(eraser.backend.trained_modules(), edit)

