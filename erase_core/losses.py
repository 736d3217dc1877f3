"""The erase and preserve losses, in the papers' notation. Small pure functions; shapes in the docstrings.

EraseAnything (Gao et al., 2025):
    L_esd  = ‖ v_{θ+Δθ}(x_t, c, t) − [ v_θ(x_t, ∅, t) − η (v_θ(x_t, c, t) − v_θ(x_t, ∅, t)) ] ‖²      (Eq. 2)
    L_attn = Σ_{j ∈ idx(c)} mean_pixels P[image, j]                                                 (Eq. 3)
    L_lora = ‖ v_{θ+Δθ}(x_t, c_p, t) − (ε − x_0) ‖²  on base-model images of preserved prompts       (Eq. 4)
    L_rsc  = −log Σ_k e^{s(f_c, f_k)/τ} / ( e^{s(f_c, f_syn)/τ} + Σ_k e^{s(f_c, f_k)/τ} )             (Eq. 5, App. D)
Concept Ablation (Kumari et al., 2023), flow form: ‖ v_{θ+Δθ}(x_t, c, t) − v_θ(x_t, c_anchor, t) ‖².
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def esd_target(v_uncond: torch.Tensor, v_cond: torch.Tensor, eta: float) -> torch.Tensor:
    """Negatively guided velocity ``v_∅ − η (v_c − v_∅)`` from the frozen base model (no gradient)."""
    return (v_uncond - eta * (v_cond - v_uncond)).detach()


def esd_loss(v_pred: torch.Tensor, v_uncond: torch.Tensor, v_cond: torch.Tensor, eta: float) -> torch.Tensor:
    """L_esd: the LoRA model's concept velocity regressed onto the negatively guided base velocity (Eq. 2)."""
    return F.mse_loss(v_pred, esd_target(v_uncond, v_cond, eta))


def attention_loss(maps: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """L_attn: attention mass on the erased word's tokens, Σ_tokens mean_pixels, averaged over prompts (Eq. 3).

    Args:
        maps: (B, K, h, w) image→text probabilities of the word's K tokens (or (N, B, K, h, w) over blocks/steps).
        valid: (B, K) which of the K columns are real tokens of each prompt.
    """
    per_token = maps.flatten(-2).mean(-1)  # (..., B, K)
    if valid is not None:
        per_token = per_token * valid.to(per_token)
    return per_token.sum(-1).mean()


def flow_loss(v_pred: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """L_lora: plain rectified-flow loss toward ``ε − x0`` (Eq. 4)."""
    return F.mse_loss(v_pred, noise - x0)


def anchor_loss(v_pred: torch.Tensor, v_anchor: torch.Tensor) -> torch.Tensor:
    """Concept Ablation: the concept's velocity mapped onto the frozen model's anchor-prompt velocity."""
    return F.mse_loss(v_pred, v_anchor.detach())


def reverse_self_contrastive(f_c: torch.Tensor, f_syn: torch.Tensor, f_irr: torch.Tensor,
                             tau: float = 0.07) -> torch.Tensor:
    """L_rsc (Eq. 5): pull the concept's attention feature toward irrelevant concepts, away from its synonym.

    InfoNCE with numerator and denominator swapped: the irrelevant concepts are the positives and the synonym the
    negative, so the model stops treating the concept (and its close synonyms) as special.

    Args:
        f_c: (B, D) attention feature of the concept word.
        f_syn: (B, D) feature of one synonym, read at its own token indices in its own prompt.
        f_irr: (B, K, D) features of K irrelevant concepts.
        tau: temperature (paper: 0.07).
    """
    if tau <= 0:
        raise ValueError(f"tau={tau} must be > 0 (paper: 0.07)")
    c = F.normalize(f_c.flatten(1).float(), dim=-1)
    syn = F.normalize(f_syn.flatten(1).float(), dim=-1)
    irr = F.normalize(f_irr.flatten(2).float(), dim=-1)
    s_irr = torch.einsum("bd,bkd->bk", c, irr) / tau  # (B, K)
    s_syn = (c * syn).sum(-1, keepdim=True) / tau  # (B, 1)
    log_num = torch.logsumexp(s_irr, dim=-1)
    log_den = torch.logsumexp(torch.cat([s_syn, s_irr], dim=-1), dim=-1)
    return (log_den - log_num).mean()
