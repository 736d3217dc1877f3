"""Erase training: EraseAnything's bi-level LoRA optimisation (and the ESD / CA baselines) on any Flux world.

A *world* gives the trainer text conditioning, token indices and base-model samples:
``encode(prompts) -> TextCond``, ``token_indices(prompt, word) -> list[int]``, ``noise(n, seed)``,
``sample_latents(prompts, seed, transformer=...)``, ``backend(transformer) -> DiffusersFlux``.
The sandbox world (``erase_core.sandbox.pipeline.SandboxWorld``) is one.

One outer step (EraseAnything Alg. 1) = ``inner_steps`` lower-level steps
    min  L_esd + λ_attn L_attn                 on freshly shuffled concept prompts (indices recomputed)
then ``upper_steps`` upper-level steps
    min  λ_pres L_lora + λ_rsc L_rsc           on base-model images of preserved prompts; attention features of
                                               the concept, one synonym and K irrelevant concepts
with one LoRA and one AdamW. The teacher is the same model with the LoRA disabled.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Literal

import torch

from . import losses
from .concepts import ConceptSet
from .flux.attention import AttentionPatch
from .flux.backend import TextCond
from .flux.flow import noised
from .neighbours import NeighbourConfig, perturb_rows
from .tokens import replace_word, shuffle_words

log = logging.getLogger("erase_flux.train")

Method = Literal["eraseanything", "eraseanything+neighbors", "esd", "ca", "realera"]
EA_METHODS = ("eraseanything", "eraseanything+neighbors")
RESUMABLE_CHANGES = ("steps", "preview_every")  # a resumed run may train longer (or shorter) and preview differently


@dataclass(frozen=True)
class EraseConfig:
    """Every knob of one erase; validated on creation and stored in the LoRA's metadata."""

    method: Method = "eraseanything"
    # outer steps. 200 since the step-22,000 world became the default: at 100 it left `square` 53 % and `orange` 75 %
    # found, at 200 38 % and 16 % with the other shapes/colours kept (bench/results/erase_22k/time_shift_probe.txt)
    steps: int = 200
    inner_steps: int = 1  # lower-level (erase) steps per outer step
    upper_steps: int = 1  # upper-level (preserve) steps per outer step
    batch: int = 8
    # 3e-3 and lambda_preserve 4 were chosen on the step-16,000 sandbox across seeds (README, erase benchmark): at 1e-2
    # Adam's steps drift the LoRA off the ESD target (on a fixed batch the ESD loss ended above where it started) and
    # whether a concept got erased depended on the seed (`moon`: Acc_e 19 % or 88 %)
    lr: float = 3e-3
    # "constant": lr throughout (the paper); "cosine": lr·½(1 + cos(π·step/steps)) per outer step. Cosine (with or
    # without warm-up, lr 1e-2 or 2e-2) erased less and no more reliably across seeds on the sandbox (README)
    lr_schedule: str = "constant"
    warmup_steps: int = 0  # linear warm-up over the first outer steps
    rank: int = 8
    alpha: float = 8.0
    # the paper trains add_q/add_k only; on the sandbox that cannot erase without wrecking neighbours, because the
    # pooled (CLIP-role) vector and the text values still carry the concept (measured: README, erase benchmark)
    targets: tuple[str, ...] = ("add_q_proj", "add_k_proj", "add_v_proj", "pooled")
    eta: float = 2.0  # ESD negative guidance (paper 1.0)
    # ESD's reference velocity: "empty" (the paper: v(x_t, ∅)) or "without_concept" (the same prompt with the word
    # removed, so that other words of a composite prompt are not erased along with the concept)
    esd_negative: str = "without_concept"
    # upper-level target on preserved prompts: "flow" (the paper's L_lora toward ε − x0) or "teacher" (the frozen
    # base's velocity on the same x_t: the same minimiser in expectation, far less variance)
    preserve_target: str = "teacher"
    # also erase under the concept's synonyms (half of the lower-level prompts name it by one): what a user erasing
    # "red" expects of "crimson"; the paper relies on the text encoder to generalise instead
    erase_synonyms: bool = True
    lambda_attn: float = 1.0
    lambda_preserve: float = 4.0  # paper 1.0 with the flow target; see the ablation
    lambda_rsc: float = 0.1
    # eraseanything+neighbors: weight of the beyond-concept term (None = lambda_preserve). On the sandbox the "far"
    # samples are still partly the concept to the base model (bench/neighbour_radius.py), so keeping their velocity
    # also keeps the concept's associations (README, residue test); 0 drops the term
    lambda_beyond: float | None = None
    tau: float = 0.07
    t_range: tuple[float, float] = (0.05, 1.0)  # x_t times for the erase and preserve losses
    rsc_t_range: tuple[float, float] = (0.6, 1.0)  # attention features are read at high noise (paper Fig. 2)
    # prompts per L_rsc backward pass; 0 = all 2 + K in one batch. Smaller chunks give the same gradient (features from
    # one no-grad pass, then each chunk's forward + backward against ∂L_rsc/∂feature) at the cost of one more forward:
    # the upper step's peak memory is then one chunk's (on Flux-dev at 1024² L_rsc's batch of five sets the peak)
    rsc_chunk: int = 0
    base_samples: int = 64  # base-model images of the concept prompts that x_t is drawn from
    preserve_images: int = 8  # per preserved prompt (paper: 6-10 images, fixed seeds)
    attn_blocks: tuple[str, ...] | None = None  # default: every dual-stream block
    preview_every: int = 0  # attach a sample of the concept prompt (fixed seed) to every N-th step's log; 0 = off
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in (*EA_METHODS, "esd", "ca", "realera"):
            raise ValueError(f"method={self.method!r} is unknown; choose eraseanything, eraseanything+neighbors, "
                             "esd, ca or realera "
                             "(uce is the closed form alone: erase_core.kv_edit)")
        if self.esd_negative not in ("empty", "without_concept"):
            raise ValueError(f"esd_negative={self.esd_negative!r} is unknown; choose empty or without_concept")
        if self.preserve_target not in ("flow", "teacher"):
            raise ValueError(f"preserve_target={self.preserve_target!r} is unknown; choose flow or teacher")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"lr_schedule={self.lr_schedule!r} is unknown; choose cosine or constant")
        if self.preview_every < 0:
            raise ValueError(f"preview_every={self.preview_every} must be ≥ 0 (0 turns previews off)")
        for name in ("steps", "inner_steps", "batch", "rank", "base_samples", "preserve_images"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be ≥ 1")
        for name in ("upper_steps", "warmup_steps", "rsc_chunk"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be ≥ 0")
        for name in ("lr", "alpha", "tau"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0")
        if self.lambda_beyond is not None and (self.lambda_beyond < 0 or not math.isfinite(self.lambda_beyond)):
            raise ValueError(f"lambda_beyond={self.lambda_beyond} must be a finite number ≥ 0 (or None: lambda_preserve)")
        for name in ("lambda_attn", "lambda_preserve", "lambda_rsc", "eta"):
            if getattr(self, name) < 0 or not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name}={getattr(self, name)} must be a finite number ≥ 0")
        for name in ("t_range", "rsc_t_range"):
            lo, hi = getattr(self, name)
            if not 0.0 <= lo < hi <= 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must satisfy 0 ≤ low < high ≤ 1")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class StepLog:
    step: int
    losses: dict[str, float]
    seconds: float
    preview: torch.Tensor | None = None  # (3, H, W) sample of the concept prompt, every ``preview_every`` steps
    lr: float | None = None  # the step's learning rate (``EraseConfig.lr_schedule``)


@dataclass
class EraseResult:
    model: torch.nn.Module
    config: EraseConfig
    concept: ConceptSet
    history: list[StepLog] = field(default_factory=list)
    forwards: dict[str, int] = field(default_factory=dict)
    interrupted: bool = False


class NonFiniteLoss(RuntimeError):
    pass


def locatable(world, concept: ConceptSet) -> ConceptSet:
    """``concept`` without the synonyms / irrelevant concepts whose tokens the world's tokenizer cannot find in a
    prompt (e.g. WordNet's "blood-red" where the tokenizer has no "-"), each dropped one logged; the concept word
    itself must be found."""
    probe = concept.prompts[0]
    world.token_indices(probe, concept.word)  # raises, naming the word and the prompt

    def found(word: str) -> bool:
        try:
            return bool(world.token_indices(concept.substitute(probe, word), word))
        except ValueError:
            log.warning("dropping %r: its tokens cannot be found in %r", word, concept.substitute(probe, word))
            return False

    synonyms = tuple(w for w in concept.synonyms if found(w))
    irrelevant = tuple(w for w in concept.irrelevant if found(w))
    if (synonyms, irrelevant) == (concept.synonyms, concept.irrelevant):
        return concept
    return dataclasses.replace(concept, synonyms=synonyms, irrelevant=irrelevant)


def trainable_copy(model):
    """A trainable copy of a ComfyUI MODEL or a torch module."""
    if hasattr(model, "model_options") and hasattr(model, "clone"):
        # a deep copy, as ComfyUI's own trainer does: weights loaded under inference mode cannot join autograd
        return model.clone(force_deepcopy=True)
    return copy.deepcopy(model)


def lr_at(lr: float, schedule: str, step: int, steps: int, warmup_steps: int = 0) -> float:
    """Learning rate of step ``step`` (0-based) of ``steps``: linear warm-up, then constant or cosine-decayed."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    if schedule == "constant":
        return lr * warm
    return lr * warm * 0.5 * (1 + math.cos(math.pi * step / steps))


def scheduled_lr(config: EraseConfig, step: int) -> float:
    """Learning rate of outer step ``step`` (0-based) under ``config.lr_schedule``."""
    return lr_at(config.lr, config.lr_schedule, step, config.steps, config.warmup_steps)


@dataclass
class _PreserveBatch:
    """One upper-step batch: base-model images of preserved prompts, noised; ``v_base`` is the teacher's velocity
    on it, filled in by the lower step that computes it in its own teacher forward (None until then)."""

    x0: torch.Tensor
    noise: torch.Tensor
    x_t: torch.Tensor
    t: torch.Tensor
    text: TextCond
    v_base: torch.Tensor | None = None


class _Deferred:
    """A loss term whose forward and backward run inside the optimiser step (one chunk's graph alive at a time);
    ``value`` is its share of the step's loss, for the finiteness check."""

    def __init__(self, value: torch.Tensor, run: Callable[[], None]):
        self.value, self.run = value, run


def _uniform(n: int, lo_hi: tuple[float, float], gen: torch.Generator) -> torch.Tensor:
    lo, hi = lo_hi
    return lo + (hi - lo) * torch.rand(n, generator=gen)


class Eraser:
    """Trains one erase-LoRA on a copy of the world's transformer."""

    def __init__(self, world, concept: ConceptSet, config: EraseConfig, transformer=None, in_place: bool = False):
        """``in_place=True`` attaches the LoRA to ``transformer`` itself instead of a copy (a 12 B Flux has no room
        for a second copy); the teacher is that model with the LoRA disabled either way."""
        self.world, self.cfg = world, config
        self.concept = locatable(world, concept)
        base = transformer if transformer is not None else world.transformer
        self.model = base if in_place else trainable_copy(base)
        self.backend = world.backend(self.model)
        self.params = self.backend.attach_lora(config.targets, config.rank, config.alpha, seed=config.seed)
        self.opt = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=0.0)
        self.rng = random.Random(config.seed)
        self.gen = torch.Generator().manual_seed(config.seed)
        self.forwards = {"teacher": 0, "student": 0}
        self._terms: list[tuple[torch.Tensor, AttentionPatch | None]] = []  # this step's weighted loss terms
        self._preserve_batch: _PreserveBatch | None = None  # the next upper step's data, drawn by the lower step
        self._prepare()

    # --- data made by the base model itself ---------------------------------------------------------------------
    @torch.no_grad()
    def _prepare(self) -> None:
        c, cfg = self.concept, self.cfg
        with self.backend.teacher():
            prompts = [c.prompts[i % len(c.prompts)] for i in range(cfg.base_samples)]
            self.concept_x0 = self.world.sample_latents(prompts, seed=cfg.seed + 10_000, transformer=self.model)
            self.preserve = []
            for j, p in enumerate(c.preserve_prompts):
                x0 = self.world.sample_latents([p] * cfg.preserve_images, seed=cfg.seed + 20_000 + 100 * j,
                                               transformer=self.model)
                self.preserve += [(p, x) for x in x0]
        self.empty = self.world.encode([""])

    def _velocity(self, x, t, text: TextCond, kind: str) -> torch.Tensor:
        self.forwards[kind] += x.shape[0]
        return self.backend.velocity(x, t, text)

    @torch.no_grad()
    def _teacher(self, jobs: list[tuple[torch.Tensor, torch.Tensor, TextCond]]) -> list[torch.Tensor]:
        """Frozen-base velocities of several (x_t, t, text) batches, in one forward when their text lengths agree
        (one call of 3B rows costs less than three of B; the outputs are the same rows)."""
        with self.backend.teacher():
            if len(jobs) > 1 and len({j[2].sequence.shape[1:] for j in jobs}) == 1:
                v = self._velocity(torch.cat([j[0] for j in jobs]), torch.cat([j[1] for j in jobs]),
                                   TextCond(torch.cat([j[2].sequence for j in jobs]),
                                            torch.cat([j[2].pooled for j in jobs])), "teacher")
                return list(v.split([len(j[0]) for j in jobs]))
            return [self._velocity(x, t, text, "teacher") for x, t, text in jobs]

    def _preserves(self) -> bool:
        """Whether upper steps have a preservation term (L_lora)."""
        return bool(self.preserve) and self.cfg.lambda_preserve > 0

    def _upper_pending(self) -> bool:
        """Whether an upper step with a preservation term follows this lower step (its data can be drawn now)."""
        return self.cfg.method in EA_METHODS and self._preserves()

    def _draw_preserve(self) -> _PreserveBatch:
        """One upper-step batch of base-model images of preserved prompts, noised (teacher velocity not yet known)."""
        cfg = self.cfg
        rows = [self.preserve[self.rng.randrange(len(self.preserve))] for _ in range(cfg.batch)]
        x0 = torch.stack([x for _, x in rows])
        noise = self._randn(x0)
        t = _uniform(cfg.batch, cfg.t_range, self.gen).to(x0.device)
        return _PreserveBatch(x0, noise, noised(x0, noise, t), t, self.world.encode([p for p, _ in rows]))

    # --- lower level: erase ---------------------------------------------------------------------------------------
    def lower_step(self) -> dict[str, float]:
        cfg, c = self.cfg, self.concept
        prompts = [shuffle_words(self.rng.choice(c.prompts), self.rng, keep=c.word) for _ in range(cfg.batch)]
        words = [c.word] * cfg.batch
        if cfg.erase_synonyms and c.synonyms:  # half the prompts name the concept by a synonym instead
            words = [self.rng.choice(c.synonyms) if self.rng.random() < 0.5 else c.word for _ in prompts]
            prompts = [c.substitute(p, w) for p, w in zip(prompts, words)]
        pick = torch.randint(0, len(self.concept_x0), (cfg.batch,), generator=self.gen)
        x0 = self.concept_x0[pick]
        noise = self._randn(x0)
        t = _uniform(cfg.batch, cfg.t_range, self.gen).to(x0.device)
        x_t = noised(x0, noise, t)
        text = self.world.encode(prompts)
        if cfg.method == "eraseanything+neighbors":  # RealEra's mined neighbours join the erase set (half the rows)
            rows = [self.world.token_indices(p, w) if self.rng.random() < 0.5 else [] for p, w in zip(prompts, words)]
            text = TextCond(perturb_rows(text.sequence, rows, "near", NeighbourConfig(), self.gen), text.pooled)
        if cfg.method == "ca":
            conds = [self.world.encode([c.substitute(p, c.anchor) for p in prompts])]
        elif cfg.esd_negative == "without_concept":
            conds = [self.world.encode([replace_word(p, w, "") for p, w in zip(prompts, words)]), text]
        else:
            conds = [TextCond(self.empty.sequence.expand(cfg.batch, -1, -1), self.empty.pooled.expand(cfg.batch, -1)),
                     text]
        jobs = [(x_t, t, cond) for cond in conds]
        if self._upper_pending() and self._preserve_batch is None:  # the upper step's draws come next either way
            self._preserve_batch = self._draw_preserve()
            if cfg.preserve_target == "teacher":
                pb = self._preserve_batch
                jobs.append((pb.x_t, pb.t, pb.text))
        v_teacher = self._teacher(jobs)
        if len(v_teacher) > len(conds):
            self._preserve_batch.v_base = v_teacher.pop()
        if cfg.method == "ca":
            (v_anchor,) = v_teacher
        else:
            v_u, v_c = v_teacher
        out: dict[str, float] = {}
        use_attn = cfg.method in EA_METHODS and cfg.lambda_attn > 0
        idx = [self.world.token_indices(p, w) for p, w in zip(prompts, words)]
        patch = self.backend.attention_patch(idx, blocks=self._attn_blocks(), keep_grad=True, capture=use_attn)
        with patch:
            v_pred = self._velocity(x_t, t, text, "student")
        if cfg.method == "ca":
            loss = losses.anchor_loss(v_pred, v_anchor)
            out["ca"] = loss.item()
        else:
            loss = losses.esd_loss(v_pred, v_u, v_c, cfg.eta)
            out["esd"] = loss.item()
        if use_attn:
            maps = torch.stack(list(patch.result.maps.values()))  # (blocks, B, K, h, w)
            l_attn = losses.attention_loss(maps, patch.result.valid)
            loss = loss + cfg.lambda_attn * l_attn
            out["attn"] = l_attn.item()
        self._terms.append((loss, patch))
        self._step()
        return out

    # --- upper level: preserve ------------------------------------------------------------------------------------
    def upper_step(self) -> dict[str, float]:
        cfg, c = self.cfg, self.concept
        out: dict[str, float] = {}
        if self._preserves():
            pb, self._preserve_batch = self._preserve_batch or self._draw_preserve(), None
            v = self._velocity(pb.x_t, pb.t, pb.text, "student")
            if cfg.preserve_target == "teacher":
                if pb.v_base is None:
                    (pb.v_base,) = self._teacher([(pb.x_t, pb.t, pb.text)])
                l_pres = losses.anchor_loss(v, pb.v_base)
            else:
                l_pres = losses.flow_loss(v, pb.x0, pb.noise)
            self._terms.append((cfg.lambda_preserve * l_pres, None))
            out["preserve"] = l_pres.item()
        beyond = cfg.lambda_preserve if cfg.lambda_beyond is None else cfg.lambda_beyond
        if cfg.method == "eraseanything+neighbors" and beyond > 0:
            l_far = self._beyond_concept_loss()
            self._terms.append((beyond * l_far, None))
            out["beyond"] = l_far.item()
        if cfg.method in EA_METHODS and cfg.lambda_rsc > 0 and c.synonyms and c.irrelevant:
            if cfg.rsc_chunk:
                l_rsc = self._rsc_chunked()
            else:
                l_rsc, patch = self._rsc_loss()
                self._terms.append((cfg.lambda_rsc * l_rsc, patch))
            out["rsc"] = l_rsc.item()
        if out:
            self._step()
        return out

    def _beyond_concept_loss(self) -> torch.Tensor:
        """RealEra's beyond-concept regularisation: the concept's rows moved beyond its neighbourhood keep the frozen
        base's velocity. Flux reads the prompt twice, so the pooled vector is the prompt's without the word: with the
        concept's own pooled vector the "far" prompt would still ask for the concept, and keeping its velocity would
        keep the concept on the pooled path."""
        cfg, c = self.cfg, self.concept
        prompts = [shuffle_words(self.rng.choice(c.prompts), self.rng, keep=c.word) for _ in range(cfg.batch)]
        text = self.world.encode(prompts)
        rows = [self.world.token_indices(p, c.word) for p in prompts]
        pooled = self.world.encode([replace_word(p, c.word, "") for p in prompts]).pooled
        far = TextCond(perturb_rows(text.sequence, rows, "far", NeighbourConfig(), self.gen), pooled)
        x0 = self.concept_x0[torch.randint(0, len(self.concept_x0), (cfg.batch,), generator=self.gen)]
        t = _uniform(cfg.batch, cfg.t_range, self.gen).to(x0.device)
        x_t = noised(x0, self._randn(x0), t)
        with torch.no_grad(), self.backend.teacher():
            v_base = self._velocity(x_t, t, far, "teacher")
        return losses.anchor_loss(self._velocity(x_t, t, far, "student"), v_base)

    def _rsc_batch(self):
        """The concept, a synonym and K irrelevant concepts in one shuffled prompt each, their token indices, and one
        shared x_t (the paper fixes the starting latent)."""
        c = self.concept
        base = shuffle_words(self.rng.choice(c.prompts), self.rng, keep=c.word)
        words = [c.word, self.rng.choice(c.synonyms), *c.irrelevant]
        prompts = [c.substitute(base, w) for w in words]
        idx = [self.world.token_indices(p, w) for p, w in zip(prompts, words)]
        x0 = self.concept_x0[torch.randint(0, len(self.concept_x0), (1,), generator=self.gen)]
        t = _uniform(1, self.cfg.rsc_t_range, self.gen).to(x0.device)
        return prompts, idx, noised(x0, self._randn(x0), t), t

    def _rsc_features(self, prompts, idx, x_t, t) -> tuple[torch.Tensor, AttentionPatch]:
        """Attention features (P, h·w): each prompt's map over its own token indices, summed, mean over blocks."""
        patch = self.backend.attention_patch(idx, blocks=self._attn_blocks(), keep_grad=True)
        with patch:
            self._velocity(x_t.expand(len(prompts), -1, -1), t.expand(len(prompts)), self.world.encode(prompts),
                           "student")
        maps = torch.stack(list(patch.result.maps.values())).mean(0)  # (P, K, h, w)
        return (maps * patch.result.valid[..., None, None].to(maps)).sum(1).flatten(1), patch

    def _rsc(self, feats: torch.Tensor) -> torch.Tensor:
        return losses.reverse_self_contrastive(feats[:1], feats[1:2], feats[2:][None], self.cfg.tau)

    def _rsc_loss(self) -> tuple[torch.Tensor, AttentionPatch]:
        """L_rsc over the attention features of the concept, a synonym and K irrelevant concepts, each read at its own
        token indices, from one shared x_t."""
        feats, patch = self._rsc_features(*self._rsc_batch())
        return self._rsc(feats), patch

    def _rsc_chunked(self) -> torch.Tensor:
        """L_rsc with the memory of ``rsc_chunk`` prompts: the features from one no-grad pass give g = ∂L/∂feature;
        each chunk's backward of ⟨feature_chunk, g_chunk⟩ then adds exactly its share of ∂L/∂θ (run by :meth:`_step`,
        so that only one chunk's graph is alive at a time)."""
        prompts, idx, x_t, t = self._rsc_batch()
        with torch.no_grad():
            feats, _ = self._rsc_features(prompts, idx, x_t, t)
        feats = feats.detach().requires_grad_(True)
        with torch.enable_grad():
            loss = self._rsc(feats)
            (grad,) = torch.autograd.grad(loss, feats)
        weight = self.cfg.lambda_rsc

        def chunk_backward(lo: int, hi: int) -> None:
            part, patch = self._rsc_features(prompts[lo:hi], idx[lo:hi], x_t, t)
            with patch:  # gradient checkpointing re-runs the forward inside backward
                (part * (weight * grad[lo:hi])).sum().backward()

        step = self.cfg.rsc_chunk
        for lo in range(0, len(prompts), step):
            self._terms.append((_Deferred(weight * loss.detach() if lo == 0 else loss.new_zeros(()),
                                          lambda lo=lo: chunk_backward(lo, lo + step)), None))
        return loss.detach()

    # --- loop -----------------------------------------------------------------------------------------------------
    def _attn_blocks(self) -> list[str]:
        if self.cfg.attn_blocks is not None:
            return list(self.cfg.attn_blocks)
        return [f"double.{i}" for i in range(len(self.backend.dual_blocks()))]

    def _randn(self, like: torch.Tensor) -> torch.Tensor:
        """Noise from the trainer's CPU generator (the same on every device), moved to ``like``'s device."""
        return torch.randn(like.shape, generator=self.gen).to(like)

    def _step(self) -> None:
        """One optimiser step on the sum of this step's terms, back-propagated term by term (the same gradient):
        with gradient checkpointing, backward re-runs each forward, so a term's attention patch must be in place again
        while (and only while) its own forward is recomputed."""
        terms, self._terms = self._terms, []
        total = sum(loss.value if isinstance(loss, _Deferred) else loss.detach() for loss, _ in terms)
        if not torch.isfinite(total):
            raise NonFiniteLoss(f"loss became {total.item()} at this step; lower lr (now {self.cfg.lr}) or the "
                                "loss weights, and resume from the last checkpoint")
        self.opt.zero_grad(set_to_none=True)
        for loss, patch in terms:
            if isinstance(loss, _Deferred):  # a term that runs its own forward and backward now
                loss.run()
                continue
            with patch if patch is not None else contextlib.nullcontext():
                loss.backward()
        self.opt.step()

    @torch.no_grad()
    def preview(self, step: int) -> torch.Tensor | None:
        """The current model's sample of the concept's first prompt (same noise every time), when due."""
        every = self.cfg.preview_every
        if not every or (step + 1) % every and step + 1 != self.cfg.steps:
            return None
        return self.world.sample([self.concept.prompts[0]], seed=self.cfg.seed + 30_000, transformer=self.model)[0]

    # --- checkpoints ----------------------------------------------------------------------------------------------
    def checkpoint(self, step: int) -> dict:
        """Everything needed to resume: LoRA and optimiser tensors, step, RNG states, the config."""
        return {"lora": {n: p.detach().clone() for n, p in self.backend.lora_parameters().items()},
                "opt": copy.deepcopy(self.opt.state_dict()), "step": step, "config": self.cfg.to_dict(),
                "rng": [list(x) if isinstance(x, tuple) else x for x in self.rng.getstate()],
                "gen": self.gen.get_state(), "forwards": dict(self.forwards)}

    def save_checkpoint(self, path, step: int) -> None:
        """Atomic write of :meth:`checkpoint` (torch format, read back with ``weights_only=True``)."""
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        torch.save(self.checkpoint(step), tmp)
        tmp.replace(path)

    def load_checkpoint(self, path) -> int:
        """Restore a checkpoint written by :meth:`save_checkpoint`; returns the step to continue from."""
        state = torch.load(path, weights_only=True)
        mine = self.cfg.to_dict()
        diff = [k for k in state["config"] if k not in RESUMABLE_CHANGES and state["config"][k] != mine.get(k)]
        if diff:
            raise ValueError(f"checkpoint {path} was made with another config (differs in {diff}); resume with the "
                             f"same settings (only {', '.join(RESUMABLE_CHANGES)} may change)")
        params = self.backend.lora_parameters()
        with torch.no_grad():
            for n, v in state["lora"].items():
                params[n].copy_(v)
        self.opt.load_state_dict(state["opt"])
        self.rng.setstate(tuple(tuple(x) if isinstance(x, list) else x for x in state["rng"]))
        self.gen.set_state(state["gen"])
        self.forwards = dict(state["forwards"])
        self._preserve_batch = None
        return int(state["step"])

    def train(self, progress: Callable[[StepLog], None] | None = None,
              should_stop: Callable[[], bool] | None = None, checkpoint_path=None,
              resume: bool = False) -> EraseResult:
        """Run the outer loop. ``should_stop()`` is polled every step; when it fires, when anything raises during a
        step or from ``progress`` (ComfyUI cancels by raising from its ops and its progress hook), or when the loss is
        not finite, the last good state is written to ``checkpoint_path`` (if given) and the exception propagates, so
        a later call with ``resume=True`` continues exactly."""
        history: list[StepLog] = []
        t0 = time.time()
        interrupted = False
        if checkpoint_path is not None:
            checkpoint_path = Path(checkpoint_path)
        start = self.load_checkpoint(checkpoint_path) if resume and checkpoint_path else 0
        for step in range(start, self.cfg.steps):
            if should_stop is not None and should_stop():
                interrupted = True
                if checkpoint_path:
                    self.save_checkpoint(checkpoint_path, step)
                break
            if checkpoint_path:
                good = self.checkpoint(step)
            logs: dict[str, float] = {}
            lr = scheduled_lr(self.cfg, step)
            for group in self.opt.param_groups:
                group["lr"] = lr
            try:
                for _ in range(self.cfg.inner_steps):
                    logs.update(self.lower_step())
                if self.cfg.method in EA_METHODS:
                    for _ in range(self.cfg.upper_steps):
                        logs.update(self.upper_step())
            except BaseException:  # a non-finite loss, or a host cancelling mid-step (ComfyUI raises from its ops)
                if checkpoint_path:
                    tmp = checkpoint_path.with_name(checkpoint_path.name + ".tmp")
                    torch.save(good, tmp)
                    tmp.replace(checkpoint_path)
                raise
            entry = StepLog(step, logs, time.time() - t0, self.preview(step), lr)
            history.append(entry)
            if progress:
                try:
                    progress(entry)
                except BaseException:  # a host that cancels by raising from its progress hook (ComfyUI does)
                    if checkpoint_path:
                        self.save_checkpoint(checkpoint_path, step + 1)
                    raise
            if step % 10 == 0:
                log.info("erase step %d %s", step, " ".join(f"{k}={v:.4g}" for k, v in logs.items()))
        return EraseResult(self.model, self.cfg, self.concept, history, dict(self.forwards), interrupted)


def erase(world, concept: ConceptSet, config: EraseConfig, **kw) -> EraseResult:
    """Train one erase-LoRA; see :class:`Eraser`."""
    return Eraser(world, concept, config).train(**kw)
