"""One interface over Flux implementations. This module holds the diffusers adapter; ComfyUI's comes later."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .packing import image_ids, text_ids


@dataclass
class TextCond:
    """Flux text conditioning: the T5 token sequence (B, L, D_txt) and the CLIP pooled vector (B, D_pool)."""

    sequence: torch.Tensor
    pooled: torch.Tensor

    def __post_init__(self) -> None:
        if self.sequence.dim() != 3 or self.pooled.dim() != 2 or self.sequence.shape[0] != self.pooled.shape[0]:
            raise ValueError(f"TextCond wants sequence (B, L, D) and pooled (B, D); got {tuple(self.sequence.shape)} "
                             f"and {tuple(self.pooled.shape)}")

    def __len__(self) -> int:
        return self.sequence.shape[0]

    def select(self, rows) -> "TextCond":
        return TextCond(self.sequence[rows], self.pooled[rows])

    @staticmethod
    def cat(conds: list["TextCond"]) -> "TextCond":
        return TextCond(torch.cat([c.sequence for c in conds]), torch.cat([c.pooled for c in conds]))


def unwrap(model: nn.Module) -> nn.Module:
    """The ``FluxTransformer2DModel`` inside a peft wrapper (or the model itself)."""
    inner = model
    while not hasattr(inner, "transformer_blocks") and hasattr(inner, "base_model"):
        inner = inner.base_model
        inner = getattr(inner, "model", inner)
    if not hasattr(inner, "transformer_blocks"):
        raise TypeError(f"{type(model).__name__} is not a diffusers FluxTransformer2DModel (no transformer_blocks)")
    return inner


class DiffusersFlux:
    """Adapter over diffusers' ``FluxTransformer2DModel`` for packed latents of a fixed latent size."""

    def __init__(self, model: nn.Module, latent_hw: tuple[int, int], guidance: float | None = None,
                 dtype: torch.dtype | None = None):
        """``dtype``: the compute dtype when the stored weights differ from it (e.g. fp8 storage, bf16 compute)."""
        self.model = model
        self.inner = unwrap(model)
        self.latent_hw = latent_hw
        self.guidance = guidance
        self.dtype = dtype
        if self.inner.config.guidance_embeds and guidance is None:
            raise ValueError("this Flux model has guidance_embeds=True (dev): pass guidance, e.g. 3.5")

    def dual_blocks(self) -> list[nn.Module]:
        return list(self.inner.transformer_blocks)

    def velocity(self, x: torch.Tensor, t: torch.Tensor, text: TextCond, **attention_kwargs) -> torch.Tensor:
        """v(x_t, t, c) for packed latents x (B, N_img, 4C) and times t in [0, 1] (the model multiplies by 1000)."""
        h, w = self.latent_hw
        dtype = self.dtype or self.inner.dtype
        guidance = None
        if self.inner.config.guidance_embeds:
            guidance = torch.full((x.shape[0],), float(self.guidance), device=x.device, dtype=dtype)
        out = self.model(hidden_states=x.to(dtype), encoder_hidden_states=text.sequence.to(dtype),
                         pooled_projections=text.pooled.to(dtype), timestep=t.to(x.device, dtype),
                         img_ids=image_ids(h, w, x.device, dtype), txt_ids=text_ids(text.sequence.shape[1], x.device, dtype),
                         guidance=guidance, joint_attention_kwargs=attention_kwargs or None, return_dict=False)[0]
        return out.to(x.dtype)

    # --- the trainer's hooks (same names on the ComfyUI backend) ------------------------------------------------
    def attach_lora(self, targets, rank: int, alpha: float, seed: int = 0) -> list[nn.Parameter]:
        """A fresh peft LoRA (B = 0) on ``targets``; returns its trainable parameters."""
        from ..lora import attach_lora

        self._lora_params = attach_lora(self.model, tuple(targets), rank, alpha, seed=seed)
        return self._lora_params

    def lora_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.model.named_parameters() if "lora_" in n}

    def enable_training(self) -> None:
        """Nothing to do: diffusers' Flux is differentiable as it is (the ComfyUI backend checkpoints its blocks)."""

    def teacher(self):
        """Context manager: the frozen base (LoRA off)."""
        from ..lora import teacher_mode

        return teacher_mode(self.model, getattr(self, "_lora_params", []))

    def attention_patch(self, tokens, **kw):
        from .attention import AttentionPatch

        return AttentionPatch(self.model, tokens, **kw)

    def trained_modules(self):
        from ..lora import trained_lora

        return trained_lora(self.model).modules

    def linear(self, name: str) -> tuple[nn.Module, tuple[int, int] | None]:
        """The Linear behind a diffusers module name, and the rows of its weight that name owns (None: all)."""
        module = dict(self.inner.named_modules()).get(name)
        if module is None:
            raise ValueError(f"module {name!r} does not exist in this model")
        return getattr(module, "base_layer", module), None

    def with_edit(self, lora) -> nn.Module:
        """A copy of the model with a LoRA file object's ΔW added to the weights (W ← W + ΔW, no adapter)."""
        import copy

        edited = copy.deepcopy(self.model)
        named = dict(unwrap(edited).named_modules())
        with torch.no_grad():
            for name, m in lora.modules.items():
                target = getattr(named[name], "base_layer", named[name])
                target.weight += m.delta().to(target.weight)
        return edited
