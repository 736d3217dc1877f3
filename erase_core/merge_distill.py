"""The distilled merge: one LoRA trained to act like each erase-LoRA on its own concept and like the base elsewhere.

The closed-form merge matches each LoRA module by module on its concept's token rows; what an erasure needs is the
model's output. For LoRAs i = 1..n (teacher i: the base with ΔW_i added), prompts P_i naming concept i and preserved
prompts P_0 (with the empty prompt, classifier-free guidance's other branch):

    min_θ  (1/n) Σ_i E_{p∈P_i} ‖v_θ(x_t, t, p) − v_i(x_t, t, p)‖²  +  λ E_{p∈P_0} ‖v_θ(x_t, t, p) − v_0(x_t, t, p)‖²

where v_θ is the base plus the merged LoRA θ (initialised with the closed-form merge, so training starts from the
best module-wise answer), x_t = (1 − t) x_0 + t ε, and x_0 is drawn half from the base model and half from teacher i
on P_i (the merged model must follow teacher i's trajectory, which leaves the concept) and from the base on P_0; each
x_0 is noised at ``noisings`` independent (t, ε), so the fixed rows cover more of the trajectory per image sampled
(a row costs one model pass, an image a whole sampler run). The
teachers' velocities are computed once, without gradients, by forward hooks on the one base model
(:mod:`erase_core.flux.deltas`): n LoRAs cost n short passes, then each step is one forward and backward of the
student, whatever n is.

Under classifier-free guidance the sampler follows v(∅) + g·(v(p) − v(∅)), and an erase-LoRA moves both branches:
part of its erasure is its change of the unconditional velocity. The merged LoRA keeps v(∅) at the base's (∅ is a
preserved prompt: twenty different changes of it cannot all be kept), so with ``guided_targets`` teacher i's target
on p is the conditional velocity that gives teacher i's guided velocity with the base's unconditional branch:

    v_i*(x_t, t, p) = v_i(x_t, t, p) + (1 − g)/g · (v_i(x_t, t, ∅) − v_0(x_t, t, ∅))

with g the world's guidance scale (for Flux-dev, sampled at g = 1, the correction vanishes).
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable

import torch

from .flux.backend import TextCond
from .flux.deltas import added_deltas, folded_factors
from .flux.flow import noised
from .lora_file import LoraFile, LoraModule
from .merge import merge, merge_weights
from .train import lr_at

log = logging.getLogger("erase_flux")

BALANCES = ("uniform", "relative", "adaptive")


@dataclass(frozen=True)
class DistillConfig:
    """Knobs of the distilled merge; validated on creation and stored in the merged file's metadata."""

    # sandbox (bench/results/merge_16k, 20 LoRAs): 1500 cosine-decayed steps, 64 images per LoRA, λ = 0.5 and the
    # relative balance kept 19 / 20 concepts at ≥ 90 % of their erasure (uniform: 17 / 20; 600 constant steps,
    # 32 images and λ = 1: 15 / 20). On the default world (bench/results/merge_22k_s200_64/distill_variants.md)
    # 8 noisings per image kept 20 / 20 over three distill seeds, 4 kept 19 / 20 and 1 kept 18 / 20 over two, at the
    # same step count.
    steps: int = 1500
    lr: float = 1e-3
    lr_schedule: str = "cosine"  # "cosine": lr·½(1 + cos(π·step/steps)); "constant"
    batch: int = 16  # rows per step from the LoRAs' prompts, and as many from the preserved prompts
    preserve_weight: float = 0.5  # λ
    images: int = 64  # x_0 per LoRA: half from the base model, half from the LoRA's model
    noisings: int = 8  # training rows per x_0: each image noised at this many (t, ε) pairs
    preserve_images: int = 256  # x_0 of the preserved prompts, from the base model
    t_range: tuple[float, float] = (0.05, 1.0)
    sample_steps: int | None = None  # sampler steps for the x_0 (None: the world's default)
    # how the LoRAs share the teacher term: "uniform" (each row counts alike), "relative" (each LoRA's error is
    # measured against how far its teacher moves the base, E‖v_i − v_0‖², so a LoRA with a subtle edit is fitted as
    # closely as one with a large edit), "adaptive" (relative, and LoRAs whose relative error lags get more weight)
    balance: str = "relative"
    # teacher targets that reproduce each teacher's guided velocity with the base's unconditional branch (module
    # docstring); off: the teachers' conditional velocities as they are
    guided_targets: bool = False
    seed: int = 0

    def __post_init__(self):
        for name in ("steps", "batch", "images", "preserve_images", "noisings"):
            if getattr(self, name) < 1:
                raise ValueError(f"distill {name} = {getattr(self, name)} must be ≥ 1")
        if not self.lr > 0 or not math.isfinite(self.lr):
            raise ValueError(f"distill lr = {self.lr} must be a finite number > 0")
        if self.preserve_weight < 0 or not math.isfinite(self.preserve_weight):
            raise ValueError(f"distill preserve_weight = {self.preserve_weight} must be a finite number ≥ 0")
        if self.balance not in BALANCES:
            raise ValueError(f"distill balance = {self.balance!r} is unknown; choose one of {', '.join(BALANCES)}")
        if self.lr_schedule not in ("cosine", "constant"):
            raise ValueError(f"distill lr_schedule = {self.lr_schedule!r} is unknown; choose cosine or constant")
        lo, hi = self.t_range
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"distill t_range = {self.t_range} must satisfy 0 ≤ low < high ≤ 1")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class _Pool:
    """Fixed training rows: noised latents, their times, prompt indices into ``text``, target velocities, and
    the index of the LoRA each row teaches (0 for preserved rows)."""

    x_t: torch.Tensor
    t: torch.Tensor
    prompt: torch.Tensor
    target: torch.Tensor
    text: TextCond
    owner: torch.Tensor

    def rows(self, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, TextCond, torch.Tensor]:
        return self.x_t[idx], self.t[idx], self.text.select(self.prompt[idx]), self.target[idx]


def _joined(conds: list[TextCond]) -> TextCond:
    """Several encodings in one, shorter token sequences right-padded with zeros (as ComfyUI's encodings of
    prompts of different lengths are)."""
    n = max(c.sequence.shape[1] for c in conds)
    seqs = [torch.nn.functional.pad(c.sequence, (0, 0, 0, n - c.sequence.shape[1])) for c in conds]
    return TextCond(torch.cat(seqs), torch.cat([c.pooled for c in conds]))


def _cycle(prompts: list[str], n: int) -> list[str]:
    return [prompts[k % len(prompts)] for k in range(n)]


@torch.no_grad()
def _pool(world, backend, prompts: list[str], x0: torch.Tensor, factors, gen: torch.Generator,
          cfg: DistillConfig, owner: int = 0) -> _Pool:
    """Noise ``x0`` (one row per prompt) to random times and record the velocity of the base + ``factors``."""
    unique = sorted(set(prompts))
    index = torch.tensor([unique.index(p) for p in prompts])
    text = world.encode(unique)
    lo, hi = cfg.t_range
    t = (lo + (hi - lo) * torch.rand(len(x0), generator=gen)).to(x0.device)
    noise = torch.randn(x0.shape, generator=gen).to(x0)
    x_t = noised(x0, noise, t)
    with added_deltas(backend, factors):
        v = _velocities(backend, x_t, t, text, index, cfg.batch)
    g = float(world.cfg_scale) if cfg.guided_targets and factors else 1.0
    if g != 1.0:
        empty, rows = world.encode([""]), torch.zeros(len(x_t), dtype=torch.long)
        with added_deltas(backend, factors):
            u_i = _velocities(backend, x_t, t, empty, rows, cfg.batch)
        v = v + (1 - g) / g * (u_i - _velocities(backend, x_t, t, empty, rows, cfg.batch))
    return _Pool(x_t, t, index, v, text, torch.full((len(x_t),), owner, dtype=torch.long))


def _velocities(backend, x_t: torch.Tensor, t: torch.Tensor, text: TextCond, index: torch.Tensor,
                batch: int) -> torch.Tensor:
    """v(x_t, t, text[index]) for every row, ``batch`` rows per model pass."""
    return torch.cat([backend.velocity(x_t[i:i + batch], t[i:i + batch], text.select(index[i:i + batch]))
                      for i in range(0, len(x_t), batch)])


def _sample(world, prompts: list[str], seed: int, cfg: DistillConfig) -> torch.Tensor:
    """Samples of ``prompts``, ``cfg.batch`` at a time (sample k has noise seed ``seed + k`` in any chunking)."""
    kw = {} if cfg.sample_steps is None else {"steps": cfg.sample_steps}
    return torch.cat([world.sample_latents(prompts[i:i + cfg.batch], seed=seed + i, **kw)
                      for i in range(0, len(prompts), cfg.batch)])


def distill_pools(world, loras: list[LoraFile], prompts: list[list[str]], preserve_prompts: list[str],
                  cfg: DistillConfig) -> tuple[_Pool, _Pool]:
    """The teachers' rows (every LoRA's, concatenated) and the preserved rows."""
    if len(prompts) != len(loras) or any(not p for p in prompts):
        raise ValueError(f"prompts: give a non-empty prompt list for each of the {len(loras)} LoRAs")
    if not preserve_prompts:
        raise ValueError("preserve_prompts is empty; give at least the empty prompt ''")
    backend = world.backend()
    gen = torch.Generator().manual_seed(cfg.seed)
    half = max(1, cfg.images // 2)
    teach: list[_Pool] = []
    for i, (lf, ps) in enumerate(zip(loras, prompts)):
        factors = folded_factors(lf)
        rows = _cycle(ps, half)
        x_base = _sample(world, rows, cfg.seed + 1000 * i, cfg)
        with added_deltas(backend, factors):
            x_lora = _sample(world, rows, cfg.seed + 1000 * i + 500, cfg)
        x0 = _repeated(torch.cat([x_base, x_lora]), cfg.noisings)
        teach.append(_pool(world, backend, (rows + rows) * cfg.noisings, x0, factors, gen, cfg, owner=i))
    rows = _cycle(preserve_prompts, cfg.preserve_images)
    x0 = _repeated(_sample(world, rows, cfg.seed + 999_000, cfg), cfg.noisings)
    kept = _pool(world, backend, rows * cfg.noisings, x0, {}, gen, cfg)
    return _concat(teach), kept


def _repeated(x: torch.Tensor, k: int) -> torch.Tensor:
    """``x`` stacked ``k`` times along the batch (row j of copy c is row j of ``x``)."""
    return x.repeat(k, *([1] * (x.dim() - 1)))


def _concat(pools: list[_Pool]) -> _Pool:
    """One pool from several, prompt indices shifted into the joint text table."""
    offsets, total = [], 0
    for p in pools:
        offsets.append(total)
        total += len(p.text)
    return _Pool(torch.cat([p.x_t for p in pools]), torch.cat([p.t for p in pools]),
                 torch.cat([p.prompt + o for p, o in zip(pools, offsets)]), torch.cat([p.target for p in pools]),
                 _joined([p.text for p in pools]), torch.cat([p.owner for p in pools]))


@torch.no_grad()
def teacher_gaps(backend, pool: _Pool, n: int, batch: int) -> torch.Tensor:
    """Per LoRA, E‖v_i − v_0‖² over its rows: how far its teacher moves the base's velocity."""
    v_0 = _velocities(backend, pool.x_t, pool.t, pool.text, pool.prompt, batch)
    err = ((pool.target.float() - v_0.float()) ** 2).flatten(1).mean(1)
    return torch.stack([err[pool.owner == i].mean() for i in range(n)]).clamp_min(1e-12)


def distill(world, loras: list[LoraFile], init: LoraFile, prompts: list[list[str]], preserve_prompts: list[str],
            cfg: DistillConfig = DistillConfig(), weights: list[float] | None = None,
            progress: Callable[[int, dict[str, float]], None] | None = None,
            transformer=None) -> tuple[LoraFile, list[dict]]:
    """Train ``init`` (a merge of ``loras``, same modules) to the objective of the module docstring.

    ``prompts[i]`` name LoRA i's concept; ``preserve_prompts`` are kept as the base draws them; ``weights[i]`` (≥ 0,
    default 1 each) is LoRA i's share of the teacher term (the teachers themselves are the LoRAs at full strength).
    Returns the merged LoRA (rank of ``init``, metadata of ``init`` plus the distillation's) and the loss history.
    The student trains through ``transformer`` (default: the world's model), which must hold the same weights: pass a
    :func:`~erase_core.train.trainable_copy` of a ComfyUI MODEL, whose weights were loaded under inference mode and
    cannot join autograd; the teachers' passes need no gradient and run on the world's own model.
    """
    shares = merge_weights(len(loras), weights, "distill")
    w = torch.tensor(shares, dtype=torch.float32)
    w = w * len(w) / w.sum()  # mean 1: equal weights give the plain mean over rows
    missing = sorted(set(loras[0].modules) ^ set(init.modules))
    if missing:
        raise ValueError(f"init must target the LoRAs' modules; {missing[0]} differs")
    t0 = time.time()
    teach, kept = distill_pools(world, loras, prompts, preserve_prompts, cfg)
    log.info("distill: %d teacher rows, %d preserved rows in %.0f s", len(teach.x_t), len(kept.x_t), time.time() - t0)
    params = {name: (torch.nn.Parameter(a.clone()), torch.nn.Parameter(b.clone()))
              for name, (a, b) in folded_factors(init).items()}
    opt = torch.optim.AdamW([p for pair in params.values() for p in pair], lr=cfg.lr, weight_decay=0.0)
    backend = world.backend(transformer)
    gap = teacher_gaps(world.backend(), teach, len(loras), cfg.batch) if cfg.balance != "uniform" else None
    if gap is not None:
        w = w * gap.mean() / gap  # relative error: ‖v_θ − v_i‖² / E‖v_i − v_0‖², in the uniform loss's units
        log.info("distill: teacher gaps %s", [round(g, 5) for g in gap.tolist()])
    lag = torch.ones(len(loras))  # running relative error per LoRA (adaptive balance)
    backend.enable_training()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    history = []
    with added_deltas(backend, params):  # through backward too: checkpointed blocks recompute with the delta
        for step in range(cfg.steps):
            pick = torch.randint(0, len(teach.x_t), (cfg.batch,), generator=gen)
            x_c, t_c, text_c, v_c = teach.rows(pick)
            x_p, t_p, text_p, v_p = kept.rows(torch.randint(0, len(kept.x_t), (cfg.batch,), generator=gen))
            v = backend.velocity(torch.cat([x_c, x_p]), torch.cat([t_c, t_p]), _joined([text_c, text_p]))
            err = ((v.float() - torch.cat([v_c, v_p]).float()) ** 2).flatten(1).mean(1)
            owner = teach.owner[pick]
            w_step = w * lag / lag.mean() if cfg.balance == "adaptive" else w
            l_teach, l_keep = (w_step[owner].to(err) * err[:cfg.batch]).mean(), err[cfg.batch:].mean()
            if cfg.balance == "adaptive":
                _track(lag, owner, err[:cfg.batch].detach().cpu() / gap[owner])
            loss = l_teach + cfg.preserve_weight * l_keep
            if not torch.isfinite(loss):
                raise FloatingPointError(f"distill step {step}: loss is {loss.item()}; lower lr (now {cfg.lr})")
            for group in opt.param_groups:
                group["lr"] = lr_at(cfg.lr, cfg.lr_schedule, step, cfg.steps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            history.append({"step": step, "teachers": l_teach.item(), "preserve": l_keep.item()})
            if progress is not None:
                progress(step, history[-1])
    modules = {name: LoraModule(a.detach().float().cpu(), b.detach().float().cpu(), float(a.shape[0]))
               for name, (a, b) in params.items()}
    meta = {**init.meta, "method": "merge:distill"}
    meta["merge"] = {**init.meta.get("merge", {}), "mode": "distill", "init": init.meta.get("merge", {}).get("mode"),
                     "weights": shares, "distill": cfg.to_dict(), "final_loss": history[-1] if history else None}
    return LoraFile(modules, meta), history


def _track(lag: torch.Tensor, owner: torch.Tensor, rel: torch.Tensor, decay: float = 0.9) -> None:
    """Running mean (per LoRA) of the relative error of the rows just seen."""
    for i in owner.unique().tolist():
        lag[i] = decay * lag[i] + (1 - decay) * rel[owner == i].mean()


def distill_merge(world, loras: list[LoraFile], config, prompts: list[list[str]], preserve_prompts: list[str],
                  concept_inputs, preserve_inputs, distill_cfg: DistillConfig = DistillConfig(),
                  names: list[str] | None = None,
                  progress: Callable[[int, dict[str, float]], None] | None = None,
                  transformer=None) -> tuple[LoraFile, list[dict]]:
    """Mode ``distill``: the closed-form merge (``config``'s λ, ridge, rank and weights; inputs as for
    ``closed_form``), then :func:`distill` through ``world``'s model (or ``transformer``)."""
    init = merge(loras, replace(config, mode="closed_form"), concept_inputs, preserve_inputs, names=names)
    return distill(world, loras, init, prompts, preserve_prompts, distill_cfg, weights=config.weights,
                   progress=progress, transformer=transformer)
