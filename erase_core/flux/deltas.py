"""Low-rank weight deltas added to a model's Linear outputs by forward hooks, without touching its weights.

A hook on module ``name`` adds ``x Aᵀ Bᵀ`` to the output (ΔW = B A), on a fused projection only to the rows that name
owns (ComfyUI's ``txt_attn.qkv``: the backend's ``linear(name)`` gives them as (offset, length)). One base model then serves as the frozen
base, as any one of several LoRAs, or as a LoRA being trained, with no copy of a 12 B model and no adapter swap.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch

from ..lora_file import LoraFile


def folded_factors(lora: LoraFile) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module, (A, B) with the LoRA's scale folded into B, so that ΔW = B A."""
    out = {}
    for name, m in lora.modules.items():
        f = m.folded()
        out[name] = (f.down, f.up)
    return out


def _added(down: torch.Tensor, up: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """x Aᵀ Bᵀ in fp32 (a bf16 or fp8 base loses small deltas otherwise), in x's dtype."""
    return ((x.float() @ down.to(x.device).T) @ up.to(x.device).T).to(x.dtype)


@contextmanager
def added_deltas(backend, factors: dict[str, tuple[torch.Tensor, torch.Tensor]]):
    """Within the block, every module ``name`` of ``factors`` computes W x + B A x (gradients flow into A and B)."""
    handles = []
    for name, (down, up) in factors.items():
        linear, rows = backend.linear(name)
        if down.shape[1] != linear.in_features or up.shape[0] != (rows[1] if rows else linear.out_features):
            raise ValueError(f"delta for {name} is {down.shape[1]} → {up.shape[0]}, which does not fit the model's "
                             f"module; the LoRA was made for another geometry")

        def hook(_module, args, out, down=down, up=up, rows=rows):
            delta = _added(down, up, args[0])
            if rows is None:
                return out + delta
            lo, hi = rows[0], rows[0] + rows[1]
            return torch.cat([out[..., :lo], out[..., lo:hi] + delta, out[..., hi:]], dim=-1)

        handles.append(linear.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
