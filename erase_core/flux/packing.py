"""Flux latent packing: (B, C, H, W) latents ↔ (B, H/2·W/2, 4C) image tokens, and the RoPE position ids."""
from __future__ import annotations

import torch


def pack_latents(latent: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, H/2 · W/2, 4C), each token one 2×2 patch, channel-major (as diffusers' FluxPipeline)."""
    b, c, h, w = latent.shape
    if h % 2 or w % 2:
        raise ValueError(f"latent height/width must be even for 2×2 packing, got {h}×{w}")
    x = latent.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)  # (B, H/2, W/2, C, 2, 2)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`pack_latents` for a latent of ``height``×``width`` cells."""
    b, n, d = tokens.shape
    if n != (height // 2) * (width // 2):
        raise ValueError(f"{n} tokens do not form a {height // 2}×{width // 2} grid")
    x = tokens.view(b, height // 2, width // 2, d // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)  # (B, C, H/2, 2, W/2, 2)
    return x.reshape(b, d // 4, height, width)


def image_ids(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(H/2 · W/2, 3) ids ``[0, row, col]`` on the packed grid."""
    rows, cols = torch.meshgrid(torch.arange(height // 2), torch.arange(width // 2), indexing="ij")
    ids = torch.stack([torch.zeros_like(rows), rows, cols], dim=-1).reshape(-1, 3)
    return ids.to(device=device, dtype=dtype)


def text_ids(n_tokens: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(N_txt, 3) zeros: RoPE is the identity on text tokens."""
    return torch.zeros(n_tokens, 3, device=device, dtype=dtype)
