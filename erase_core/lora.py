"""Erase-LoRAs on Flux through peft: attach, toggle for the frozen teacher, export in diffusers/PEFT key layout."""
from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from torch import nn

from .flux.backend import unwrap
from .lora_file import (LoraFile, LoraModule, check_against, diffusers_tensors,
                        model_fingerprint, model_geometry, pattern_value, peft_metadata, read_lora,  # noqa: F401 (re-export)
                        read_lora_file, write_lora_file)

ADAPTER = "erase"
DUAL_TARGETS = ("add_q_proj", "add_k_proj", "add_v_proj", "to_q", "to_k", "to_v", "to_add_out", "to_out.0")
POOLED_TARGETS = ("time_text_embed.text_embedder.linear_1", "time_text_embed.text_embedder.linear_2")


def target_module_names(model: nn.Module, targets: tuple[str, ...], blocks: tuple[int, ...] | None = None) -> list[str]:
    """Full module names for ``targets``: dual-block attention projections (e.g. ``add_q_proj``) or ``pooled``."""
    inner = unwrap(model)
    names: list[str] = []
    n = len(inner.transformer_blocks)
    chosen = range(n) if blocks is None else blocks
    for t in targets:
        if t == "pooled":
            names += list(POOLED_TARGETS)
        elif t in DUAL_TARGETS:
            names += [f"transformer_blocks.{i}.attn.{t}" for i in chosen]
        else:
            raise ValueError(f"LoRA target {t!r} is not supported; choose from {', '.join(DUAL_TARGETS)} or 'pooled'")
    bad = [b for b in chosen if not 0 <= b < n]
    if bad:
        raise ValueError(f"block {bad[0]} does not exist; the model has dual-stream blocks 0..{n - 1}")
    return names


def attach_lora(model: nn.Module, targets: tuple[str, ...], rank: int, alpha: float, seed: int = 0,
                blocks: tuple[int, ...] | None = None) -> list[nn.Parameter]:
    """Add a fresh LoRA adapter (B = 0, so the model starts unchanged); returns its trainable parameters."""
    inner = unwrap(model)
    inner.requires_grad_(False)
    torch.manual_seed(seed)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=target_module_names(inner, targets, blocks),
                     init_lora_weights=True, lora_dropout=0.0)
    inner.add_adapter(cfg, adapter_name=ADAPTER)
    params = [p for n, p in inner.named_parameters() if "lora_" in n]
    for p in params:  # LoRA in fp32 on any base dtype (bf16/fp8 bases lose small updates otherwise)
        p.data = p.data.float()
        p.requires_grad_(True)
    return params


class teacher_mode:
    """Context manager: LoRA off (the frozen base model); on exit LoRA on and its parameters trainable again."""

    def __init__(self, model: nn.Module, params: list[nn.Parameter]):
        self.inner, self.params = unwrap(model), params

    def __enter__(self):
        self.inner.disable_adapters()
        return self

    def __exit__(self, *exc):
        self.inner.enable_adapters()
        for p in self.params:  # peft's disable_adapters() turns requires_grad off
            p.requires_grad_(True)


def trained_lora(model: nn.Module, metadata: dict | None = None) -> LoraFile:
    """The attached adapter as a :class:`LoraFile` (alpha per module from its peft config)."""
    inner = unwrap(model)
    sd = get_peft_model_state_dict(inner, adapter_name=ADAPTER)
    cfg = inner.peft_config[ADAPTER]
    modules = {}
    for key, down in sd.items():
        if ".lora_A." not in key:
            continue
        name = key.split(".lora_A.")[0]
        up = sd[key.replace(".lora_A.", ".lora_B.")]
        alpha = pattern_value(cfg.alpha_pattern, name, cfg.lora_alpha)
        modules[name] = LoraModule(down.detach().float().cpu(), up.detach().float().cpu(), float(alpha))
    return LoraFile(modules, dict(metadata or {}))


def save_lora(model: nn.Module, path: str | Path, metadata: dict, overwrite: bool = False) -> Path:
    """Write the attached LoRA atomically (diffusers layout) with the metadata, geometry and base fingerprint."""
    meta = {**metadata, "geometry": model_geometry(model), "fingerprint": model_fingerprint(model)}
    return write_lora_file(trained_lora(model, meta), path, overwrite=overwrite)


def apply_lora(model: nn.Module, lora: str | Path | LoraFile, adapter_name: str = ADAPTER,
               scale: float = 1.0) -> nn.Module:
    """Load a LoRA (file in any supported layout, or a :class:`LoraFile`) onto ``model`` in place at ``scale``.

    Keys and shapes are checked against the model first; the adapter is then built by diffusers' own loader.
    """
    lf = read_lora_file(lora) if isinstance(lora, (str, Path)) else lora
    check_against(lf, model, source=f"LoRA {lora}" if isinstance(lora, (str, Path)) else "LoRA")
    folded = {k: m.folded(scale) for k, m in lf.modules.items()}
    inner = unwrap(model)
    inner.load_lora_adapter(diffusers_tensors(folded), prefix="transformer", adapter_name=adapter_name,
                            metadata=peft_metadata(folded))
    return model
