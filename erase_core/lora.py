"""Erase-LoRAs on Flux through peft: attach, toggle for the frozen teacher, export in diffusers/PEFT key layout."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict
from torch import nn

from .flux.backend import unwrap
from .io import atomic_save_safetensors

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
    for p in params:
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


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """LoRA tensors with diffusers pipeline keys: ``transformer.transformer_blocks.N.attn.add_q_proj.lora_A.weight``."""
    sd = get_peft_model_state_dict(unwrap(model), adapter_name=ADAPTER)
    return {f"transformer.{k}": v.detach().float().cpu().contiguous() for k, v in sd.items()}


def save_lora(model: nn.Module, path: str | Path, metadata: dict, overwrite: bool = False) -> Path:
    """Write the LoRA atomically as safetensors with ``alpha``/``rank`` and every given field in the header."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA path {path} must end in .safetensors (LoRAs are never pickles)")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another name or pass overwrite=True")
    inner = unwrap(model)
    peft_cfg = inner.peft_config[ADAPTER]
    cfg = {k: sorted(v) if isinstance(v, set) else v for k, v in peft_cfg.to_dict().items()}
    # diffusers' pipeline layout: the peft config under "transformer."-prefixed keys, so alpha survives a reload
    header = {"format": "pt", "erase_flux": json.dumps(metadata, default=str),
              "lora_adapter_metadata": json.dumps({f"transformer.{k}": v for k, v in cfg.items()}, default=str)}
    return atomic_save_safetensors(lora_state_dict(model), path, metadata=header)


def read_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Tensors and parsed header of a LoRA file (safetensors only; nothing is unpickled)."""
    from safetensors import safe_open

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA file {path} is not .safetensors; pickled LoRAs are refused")
    if not path.exists():
        raise FileNotFoundError(f"LoRA file {path} does not exist")
    with safe_open(str(path), framework="pt") as f:
        header = dict(f.metadata() or {})
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta = {k: json.loads(v) if k in ("erase_flux", "lora_adapter_metadata") else v for k, v in header.items()}
    return tensors, meta


def apply_lora(model: nn.Module, path: str | Path, adapter_name: str = ADAPTER, scale: float = 1.0) -> nn.Module:
    """Load a diffusers-layout LoRA file onto ``model`` in place (diffusers' own loader), at weight ``scale``."""
    tensors, meta = read_lora(path)
    inner = unwrap(model)
    modules = dict(inner.named_modules())
    stripped = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    for key in stripped:
        module = key.split(".lora_")[0]
        if module not in modules:
            raise ValueError(f"LoRA key {key!r} of {path} targets no module of this model (made for another "
                             "geometry?)")
    peft_meta = meta.get("lora_adapter_metadata")
    inner.load_lora_adapter(tensors, prefix="transformer", adapter_name=adapter_name, metadata=peft_meta)
    if scale != 1.0:
        inner.set_adapters([adapter_name], weights=[scale])
    return model
