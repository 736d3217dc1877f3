"""Closed-form edit of Flux's text K/V projections (UCE; RealEra Eq. 7), output as a LoRA.

For one projection W_org (diffusers ``add_k_proj`` / ``add_v_proj`` of a dual-stream block; the k/v row slices of
``txt_attn.qkv`` in ComfyUI) and the rows it sees —

    E   concept rows e_i (the concept's tokens, and mined neighbours), each with an anchor row e*_i,
    P   preserved rows e_j (preserved concepts' tokens, beyond-concept samples),

    min_W  Σ_i ‖W e_i − W_org e*_i‖² + λ Σ_j ‖W e_j − W_org e_j‖² + μ ‖W − W_org‖²          (Eq. 7 + UCE's ridge)
    ⇒  ΔW = W − W_org = W_org (E* − E)ᵀ E M⁻¹,   M = EᵀE + λ PᵀP + μ I,

with rows stacked in E, E*, P. ΔW has rank ≤ |E|, so it is built in factored form and truncated to the rank that
keeps a stated share of its energy (Σ σ²). The rows depend on block and timestep (the projections see the block's
normalised, time-modulated text stream), so they come from forward passes of the base model (``flux.collect``).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .lora_file import LoraModule
from .merge import refactor


@dataclass(frozen=True)
class ClosedFormConfig:
    """Knobs of the closed-form edit; validated on creation."""

    targets: tuple[str, ...] = ("add_k_proj", "add_v_proj")
    lam: float = 0.1  # λ of Eq. 7 (paper 0.1)
    ridge: float = 1e-3  # μ, relative to the mean energy of the rows: keeps W near W_org where no row speaks
    energy: float = 0.99  # share of ΔW's energy the LoRA keeps
    max_rank: int = 64
    times: tuple[float, ...] = (0.3, 0.6, 0.9)  # timesteps of the forward passes that provide the rows

    def __post_init__(self):
        if not self.targets or any(t not in ("add_k_proj", "add_v_proj") for t in self.targets):
            raise ValueError(f"targets={self.targets}: the closed form edits the text K/V projections; "
                             "choose from add_k_proj, add_v_proj")
        if self.lam < 0 or self.ridge <= 0:
            raise ValueError(f"lam={self.lam} must be ≥ 0 and ridge={self.ridge} > 0")
        if not 0 < self.energy <= 1:
            raise ValueError(f"energy={self.energy} must be in (0, 1]")
        if self.max_rank < 1:
            raise ValueError(f"max_rank={self.max_rank} must be ≥ 1")
        if not self.times or any(not 0 < t <= 1 for t in self.times):
            raise ValueError(f"times={self.times} must be non-empty values in (0, 1]")


def solve_edit(w_org: torch.Tensor, e: torch.Tensor, e_star: torch.Tensor, p: torch.Tensor | None, lam: float,
               ridge: float) -> LoraModule:
    """ΔW = W_org (E* − E)ᵀ E M⁻¹ as an exact LoRA of rank |E| (see the module docstring)."""
    if e.shape != e_star.shape:
        raise ValueError(f"concept rows {tuple(e.shape)} and anchor rows {tuple(e_star.shape)} must pair up")
    e, e_star, w = e.double(), e_star.double(), w_org.double()
    m = e.T @ e
    if p is not None and p.numel() and lam > 0:
        m += lam * p.double().T @ p.double()
    m += ridge * max(m.diagonal().mean().item(), 1e-12) * torch.eye(m.shape[0], dtype=torch.float64)
    down = torch.linalg.solve(m, e.T).T  # E M⁻¹ (M symmetric)
    up = w @ (e_star - e).T
    return LoraModule(down.float(), up.float(), float(down.shape[0]))


def truncate_energy(m: LoraModule, energy: float, max_rank: int) -> LoraModule:
    """The smallest-rank LoRA (≤ ``max_rank``) keeping ``energy`` of ΔW's Σσ² (truncated SVD via :func:`refactor`)."""
    s = torch.linalg.svdvals(m.scale * torch.linalg.qr(m.up.double())[1] @ torch.linalg.qr(m.down.double().T)[1].T)
    share = torch.cumsum(s ** 2, 0) / (s ** 2).sum().clamp(min=1e-30)
    r = int(min(max_rank, int((share < energy - 1e-12).sum().item()) + 1, s.numel()))
    return refactor(m, r)
