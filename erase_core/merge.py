"""Merging many erase-LoRAs into one.

For LoRAs i = 1..n with deltas ΔW_i = s_i · B_i A_i on the same modules:

* ``normalized`` — EraseAnything Eq. 12: ΔW = Σ_i (w_i / Σ_j w_j) ΔW_i (weights rescaled to sum to 1), stored exactly.
  Each erasure is diluted by its share of the weight, which is the paper's stated limitation.
* ``sum``        — ΔW = Σ_i w_i ΔW_i with the weights as given, stored at the largest input rank (truncated SVD):
  the fixed-size merge most tools produce.
* ``concat``     — ΔW = Σ_i w_i ΔW_i stored exactly by stacking the ranks (A = [A_1; …; A_n], B = [w_1 s_1 B_1, …]);
  no dilution, no truncation (weights default to 1).
* ``distill``    — the closed form, then trained through the model to act like each LoRA on its own concept's
  prompts and like the base on preserved ones (:mod:`erase_core.merge_distill`; needs the base model).
* ``closed_form`` — per module, the ΔW that reproduces every LoRA's effect on its own concept's inputs while
  staying near zero on preserved inputs (in the spirit of MACE's multi-LoRA fusion):

      min_ΔW  Σ_i w_i ‖(ΔW − ΔW_i) C_i^½‖² + λ ‖ΔW C_p^½‖² + μ ‖ΔW‖²
      ⇒  ΔW = (Σ_i w_i ΔW_i C_i) (Σ_i w_i C_i + λ C_p + μ I)⁻¹,

  with C = XᵀX / n the second moments of the module's inputs X (rows: token inputs collected from the base model,
  see :mod:`erase_core.flux.collect`), then factored to a LoRA of the chosen rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .lora_file import GEOMETRY_KEYS, LoraFile, LoraModule

MODES = ("normalized", "sum", "concat", "closed_form", "distill")
WEIGHT_MODES = MODES[:4]  # computed from the files (closed_form: plus collected inputs); distill trains


@dataclass(frozen=True)
class MergeConfig:
    """How to merge; validated on creation."""

    mode: str = "concat"
    weights: tuple[float, ...] | None = None  # one per LoRA; default 1 each
    rank: int | None = None  # refactor the result to this rank (SVD); default per mode
    preserve_weight: float = 1000.0  # λ of the closed form (the node's default; 1 erases more, keeps less: README)
    ridge: float = 1e-4  # μ of the closed form, relative to the mean input energy

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"merge mode {self.mode!r} is unknown; choose one of {', '.join(MODES)}")
        if self.rank is not None and self.rank < 1:
            raise ValueError(f"rank = {self.rank} must be ≥ 1 (or None for the mode's default)")
        if self.preserve_weight < 0 or not math.isfinite(self.preserve_weight):
            raise ValueError(f"preserve_weight = {self.preserve_weight} must be a finite number ≥ 0")
        if self.ridge <= 0:
            raise ValueError(f"ridge = {self.ridge} must be > 0 (it keeps the closed form well-posed)")


def merge_weights(n: int, weights, mode: str) -> list[float]:
    """The per-LoRA weights a mode uses, validated (count, finiteness, sign, not all zero)."""
    if n < 1:
        raise ValueError("merge needs at least one LoRA")
    w = [1.0] * n if weights is None else [float(x) for x in weights]
    if len(w) != n:
        raise ValueError(f"weights: {len(w)} given for {n} LoRAs; give one weight per LoRA, in the same order")
    if not all(math.isfinite(x) for x in w):
        raise ValueError(f"weights {w} contain a non-finite value")
    if all(x == 0 for x in w):
        raise ValueError("weights are all zero: the merge would be an empty LoRA; give at least one non-zero weight")
    if mode in ("normalized", "closed_form", "distill") and any(x < 0 for x in w):
        raise ValueError(f"weights {w}: mode {mode!r} needs weights ≥ 0 (they are shares of the merge); "
                         "use 'sum' or 'concat' for signed weights")
    if mode == "normalized":
        total = sum(w)
        w = [x / total for x in w]
    return w


def lora_concepts(loras: list[LoraFile], mode: str) -> list[str]:
    """The word each LoRA erases, from its metadata (the modes that work on the model need it)."""
    names = []
    for i, lf in enumerate(loras):
        c = lf.meta.get("concept")
        if not isinstance(c, str) or not c.strip():
            raise ValueError(f"LoRA #{i + 1} has no single concept in its metadata; the {mode} merge needs to know "
                             "what each LoRA erases (use LoRAs made by the erase command or the Erase Concept node, "
                             "or another mode)")
        names.append(c.strip())
    return names


def check_compatible(loras: list[LoraFile], names: list[str] | None = None) -> None:
    """All LoRAs must target the same modules with the same shapes, made for the same geometry."""
    names = names or [f"LoRA {i + 1}" for i in range(len(loras))]
    first, ref = loras[0], names[0]
    for lf, name in zip(loras[1:], names[1:]):
        ga, gb = first.meta.get("geometry") or {}, lf.meta.get("geometry") or {}
        for k in GEOMETRY_KEYS:
            if k in ga and k in gb and ga[k] != gb[k]:
                raise ValueError(f"{name} was made for another geometry than {ref}: {k} = {gb[k]} vs {ga[k]}; "
                                 "merge only LoRAs of the same base model")
        if set(lf.modules) != set(first.modules):
            extra = sorted(set(lf.modules) ^ set(first.modules))
            raise ValueError(f"{name} targets other modules than {ref} (e.g. {extra[0]}); merge LoRAs trained on "
                             "the same targets")
        for key, m in lf.modules.items():
            if m.shape != first.modules[key].shape:
                raise ValueError(f"{name}: {key} is {m.shape[1]} → {m.shape[0]} but {ref} has "
                                 f"{first.modules[key].shape[1]} → {first.modules[key].shape[0]}; different geometry")


def stack(modules: list[LoraModule], weights: list[float]) -> LoraModule:
    """Exact Σ_i w_i ΔW_i as one LoRA of rank Σ_i r_i (scales folded, alpha = rank)."""
    down = torch.cat([m.down.float() for m in modules])
    up = torch.cat([(m.up.double() * (w * m.scale)).float() for m, w in zip(modules, weights)], dim=1)
    return LoraModule(down, up, float(down.shape[0]))


def low_rank(delta: torch.Tensor, rank: int) -> LoraModule:
    """Best rank-``rank`` LoRA of ``delta`` (truncated SVD, singular values split evenly between the factors)."""
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    r = min(rank, s.numel())
    root = s[:r].sqrt()
    return LoraModule((root[:, None] * vh[:r]).float(), (u[:, :r] * root).float(), float(r))


def refactor(m: LoraModule, rank: int) -> LoraModule:
    """The same ΔW at a lower rank, through the thin QR of the factors (cheap for wide layers)."""
    if rank >= m.rank:
        return m
    qu, ru = torch.linalg.qr(m.up.double())
    qd, rd = torch.linalg.qr(m.down.double().T)
    core = low_rank(m.scale * ru @ rd.T, rank)
    return LoraModule((core.down.double() @ qd.T).float(), (qu @ core.up.double()).float(), core.alpha)


def closed_form_lora(modules: list[LoraModule], weights: list[float], concept_inputs: list[torch.Tensor],
                     preserve_inputs: torch.Tensor | None, preserve_weight: float, ridge: float) -> LoraModule:
    """ΔW = (Σ_i w_i ΔW_i C_i) M⁻¹ with M = Σ_i w_i C_i + λ C_p + μ I and C = XᵀX / n (module docstring).

    Since ΔW_i = s_i B_i A_i, ΔW = [w_1 s_1 B_1, …] · [A_1 C_1; …] M⁻¹ exactly: rank ≤ Σ r_i, no dense SVD needed.
    """
    d_in = modules[0].shape[1]
    m = torch.zeros(d_in, d_in, dtype=torch.float64)
    downs, ups = [], []
    for mod, w, x in zip(modules, weights, concept_inputs):
        if x.shape[-1] != d_in:
            raise ValueError(f"concept inputs have width {x.shape[-1]}, the module takes {d_in}")
        c = x.double().T @ x.double() / max(1, x.shape[0])
        m += w * c
        downs.append(mod.down.double() @ c)
        ups.append(mod.up.double() * (w * mod.scale))
    if preserve_inputs is not None and preserve_inputs.numel() and preserve_weight > 0:
        xp = preserve_inputs.double()
        m += preserve_weight * xp.T @ xp / xp.shape[0]
    m += ridge * max(m.diagonal().mean().item(), 1e-12) * torch.eye(d_in, dtype=torch.float64)
    down = torch.linalg.solve(m, torch.cat(downs).T).T  # M symmetric: (A C) M⁻¹ = (M⁻¹ (A C)ᵀ)ᵀ
    up = torch.cat(ups, dim=1)
    return LoraModule(down.float(), up.float(), float(down.shape[0]))


def merge(loras: list[LoraFile], config: MergeConfig, concept_inputs: list[dict[str, torch.Tensor]] | None = None,
          preserve_inputs: dict[str, torch.Tensor] | None = None, names: list[str] | None = None) -> LoraFile:
    """Merge ``loras`` into one LoRA file object; ``closed_form`` needs per-LoRA module inputs (see collect)."""
    if config.mode == "distill":
        raise ValueError("mode distill trains through the base model: call erase_core.merge_distill.distill_merge")
    check_compatible(loras, names)
    w = merge_weights(len(loras), config.weights, config.mode)
    out: dict[str, LoraModule] = {}
    max_rank = max(m.rank for lf in loras for m in lf.modules.values())
    for key in sorted(loras[0].modules):
        mods = [lf.modules[key] for lf in loras]
        if config.mode == "closed_form":
            if concept_inputs is None:
                raise ValueError("closed_form merge needs the concepts' module inputs (collected from the base model)")
            missing = [i for i, ci in enumerate(concept_inputs) if key not in ci]
            if missing:
                raise ValueError(f"closed_form merge: no inputs collected for {key} of LoRA {missing[0] + 1}")
            solved = closed_form_lora(mods, w, [ci[key] for ci in concept_inputs], (preserve_inputs or {}).get(key),
                                      config.preserve_weight, config.ridge)
            out[key] = refactor(solved, config.rank or min(solved.shape))  # the cap loses nothing
            continue
        merged = stack(mods, w)
        rank = config.rank or (max_rank if config.mode == "sum" else min(merged.shape))
        out[key] = refactor(merged, rank)
    meta = {"method": f"merge:{config.mode}", "merge": {
        "mode": config.mode, "weights": w, "rank": config.rank, "preserve_weight": config.preserve_weight,
        "sources": [{"name": (names or [None] * len(loras))[i], "concept": lf.meta.get("concept"),
                     "method": lf.meta.get("method")} for i, lf in enumerate(loras)]},
            "concept": [lf.meta.get("concept") for lf in loras]}
    for k in ("geometry", "fingerprint", "base_model"):
        if k in loras[0].meta:
            meta[k] = loras[0].meta[k]
    return LoraFile(out, meta)


# ---------------------------------------------------------------------------------------------------------------
# Interference
# ---------------------------------------------------------------------------------------------------------------
def _inner(a: LoraModule, b: LoraModule) -> float:
    """⟨ΔW_a, ΔW_b⟩_F from the factors: s_a s_b Σ (B_aᵀ B_b) ⊙ (A_a A_bᵀ)."""
    return a.scale * b.scale * ((a.up.double().T @ b.up.double()) * (a.down.double() @ b.down.double().T)).sum().item()


def block_of(module: str) -> str:
    parts = module.split(".")
    return ".".join(parts[:2]) if parts[0].endswith("blocks") else parts[0]


def interference(loras: list[LoraFile]) -> dict[str, torch.Tensor]:
    """Per block: the n×n cosine matrix between the LoRAs' deltas on that block's modules (flattened together)."""
    check_compatible(loras)
    blocks: dict[str, list[str]] = {}
    for key in sorted(loras[0].modules):
        blocks.setdefault(block_of(key), []).append(key)
    out = {}
    n = len(loras)
    for block, keys in blocks.items():
        gram = torch.zeros(n, n, dtype=torch.float64)
        for i in range(n):
            for j in range(i, n):
                gram[i, j] = gram[j, i] = sum(_inner(loras[i].modules[k], loras[j].modules[k]) for k in keys)
        norm = gram.diagonal().clamp(min=1e-30).sqrt()
        out[block] = (gram / norm[:, None] / norm[None, :]).float()
    return out


def interference_summary(cos: dict[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """Per block: mean and max |cos| over distinct LoRA pairs (0 = independent edits, 1 = the same edit)."""
    out = {}
    for block, c in cos.items():
        n = c.shape[0]
        if n < 2:
            out[block] = {"mean_abs_cos": 0.0, "max_abs_cos": 0.0}
            continue
        off = c.abs()[~torch.eye(n, dtype=torch.bool)]
        out[block] = {"mean_abs_cos": off.mean().item(), "max_abs_cos": off.max().item()}
    return out
