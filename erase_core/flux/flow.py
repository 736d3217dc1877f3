"""Rectified flow as Flux uses it: ``x_t = (1 - t)·x0 + t·ε``, velocity ``v = ε - x0``, Euler from t = 1 to 0."""
from __future__ import annotations

from typing import Callable

import torch

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def noised(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t for per-sample times ``t`` of shape (B,)."""
    t = t.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - t) * x0 + t * noise


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The flow-matching velocity target ``ε - x0``."""
    return noise - x0


def shifted_sigmas(steps: int, shift: float = 1.0) -> torch.Tensor:
    """``steps + 1`` times from 1 to 0, time-shifted like Flux: σ' = shift·σ / (1 + (shift - 1)·σ)."""
    if steps < 1:
        raise ValueError(f"steps={steps} must be ≥ 1")
    s = torch.linspace(1.0, 0.0, steps + 1)
    return shift * s / (1 + (shift - 1) * s)


def sample_timesteps(n: int, generator: torch.Generator | None = None, logit_normal: float = 0.5,
                     mean: float = 0.0) -> torch.Tensor:
    """Training times: a mix of logit-normal(``mean``, 1) (weight ``logit_normal``) and uniform draws in (0, 1).

    A positive ``mean`` favours high noise, where the coarse layout (which shape) is decided.
    """
    u = torch.rand(n, generator=generator)
    ln = torch.sigmoid(torch.randn(n, generator=generator) + mean)
    pick = torch.rand(n, generator=generator) < logit_normal
    return torch.where(pick, ln, u).clamp(1e-4, 1 - 1e-4)


def euler(velocity: Velocity, noise: torch.Tensor, sigmas: torch.Tensor,
          callback: Callable[[int, torch.Tensor], None] | None = None) -> torch.Tensor:
    """Integrate dx/dt = v(x, t) from ``sigmas[0]`` to ``sigmas[-1]``; ``callback(step, x)`` after each step."""
    x = noise
    for i in range(len(sigmas) - 1):
        t = sigmas[i].expand(x.shape[0])
        x = x + (sigmas[i + 1] - sigmas[i]) * velocity(x, t)
        if callback is not None:
            callback(i, x)
    return x


def guided_velocity(velocity: Callable, cond, uncond, scale: float, patch=None) -> Velocity:
    """v(x, t) with classifier-free guidance ``v_u + scale · (v_c − v_u)`` (just ``v_c`` when ``uncond`` is None);
    ``patch`` (an attention patch) is switched off during the unconditional pass so it only records the prompt's."""

    def guided(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        v_c = velocity(x, t, cond)
        if uncond is None:
            return v_c
        if patch is not None:
            patch.active = False
        v_u = velocity(x, t, uncond)
        if patch is not None:
            patch.active = True
        return v_u + scale * (v_c - v_u)

    return guided
