"""Erase-LoRA files: one in-memory form, the key layouts people have, validation against a model.

In memory a LoRA is ``{module: LoraModule}`` with diffusers module paths relative to the transformer
(``transformer_blocks.0.attn.add_q_proj``) and ΔW = (alpha / rank) · up @ down.

Layouts read:

* diffusers / PEFT: ``[transformer.]<module>.lora_A.weight`` / ``lora_B.weight``; alpha from a ``.alpha`` tensor,
  from the peft config in the ``lora_adapter_metadata`` header, or rank (scale 1) as diffusers assumes;
* kohya / sd-scripts Flux: ``lora_unet_double_blocks_0_txt_attn_qkv.lora_down.weight`` / ``lora_up.weight`` / ``alpha``;
* ComfyUI native: ``diffusion_model.double_blocks.0.txt_attn.qkv.lora_up.weight`` (what ComfyUI's trainer saves).

A fused ``txt_attn.qkv`` LoRA is split exactly into ``add_q_proj``/``add_k_proj``/``add_v_proj`` (the row slices of
``up`` with the shared ``down``); slices whose rows are all zero are dropped. Written files always use the
diffusers layout, which diffusers and ComfyUI's stock loaders both read (ComfyUI maps it onto the qkv row slices).
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .io import atomic_save_safetensors

log = logging.getLogger("erase_flux")

META_KEY = "erase_flux"
PEFT_META_KEY = "lora_adapter_metadata"

#: ComfyUI-native Flux module (double block N) → diffusers modules, one per row slice of a fused weight.
_NATIVE_DOUBLE = {
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.proj": ("attn.to_add_out",),
    "img_attn.proj": ("attn.to_out.0",),
}
_NATIVE_GLOBAL = {"vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
                  "vector_in.out_layer": "time_text_embed.text_embedder.linear_2"}


@dataclass(frozen=True)
class LoraModule:
    """One low-rank update ΔW = (alpha / rank) · up @ down of a Linear weight (out, in)."""

    down: torch.Tensor  # (rank, in)   = peft lora_A
    up: torch.Tensor  # (out, rank)  = peft lora_B
    alpha: float

    def __post_init__(self):
        if self.down.ndim != 2 or self.up.ndim != 2 or self.up.shape[1] != self.down.shape[0]:
            raise ValueError(f"LoRA factors do not fit: up {tuple(self.up.shape)} @ down {tuple(self.down.shape)}")

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    @property
    def shape(self) -> tuple[int, int]:
        return self.up.shape[0], self.down.shape[1]

    def delta(self) -> torch.Tensor:
        return self.scale * (self.up.double() @ self.down.double())

    def folded(self, weight: float = 1.0) -> "LoraModule":
        """The same ΔW (times ``weight``) with the scale folded into ``up`` (alpha = rank)."""
        return LoraModule(self.down.float(), (self.up.double() * (self.scale * weight)).float(), float(self.rank))


@dataclass
class LoraFile:
    """A parsed LoRA: modules, our metadata (``{}`` for foreign files), the layout it came in."""

    modules: dict[str, LoraModule]
    meta: dict = field(default_factory=dict)
    layout: str = "diffusers"

    @property
    def targets(self) -> tuple[str, ...]:
        return tuple(sorted(self.modules))


# ---------------------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------------------
_DIFFUSERS = re.compile(r"^(?:transformer\.)?(?P<mod>.+?)\.lora_(?P<ab>[AB])(?:\.default)?\.weight$")
_DIFFUSERS_ALPHA = re.compile(r"^(?:transformer\.)?(?P<mod>.+?)\.alpha$")
_KOHYA = re.compile(r"^lora_unet_(?P<mod>[a-z0-9_]+?)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$")
_NATIVE = re.compile(r"^(?:diffusion_model\.)?(?P<mod>(?:double_blocks\.\d+\.[a-z_]+\.[a-z]+)|vector_in\.\w+)"
                     r"\.(?P<part>lora_down\.weight|lora_up\.weight|alpha)$")


def _native_name(kohya_mod: str) -> str:
    """``double_blocks_0_txt_attn_qkv`` → ``double_blocks.0.txt_attn.qkv``."""
    m = re.fullmatch(r"double_blocks_(\d+)_(txt_attn|img_attn)_(qkv|proj)", kohya_mod)
    if m:
        return f"double_blocks.{m[1]}.{m[2]}.{m[3]}"
    m = re.fullmatch(r"vector_in_(in_layer|out_layer)", kohya_mod)
    return f"vector_in.{m[1]}" if m else kohya_mod


def _split_native(name: str, down: torch.Tensor, up: torch.Tensor, alpha: float) -> dict[str, LoraModule] | None:
    if name in _NATIVE_GLOBAL:
        return {_NATIVE_GLOBAL[name]: LoraModule(down, up, alpha)}
    m = re.fullmatch(r"double_blocks\.(\d+)\.(.+)", name)
    if not m or m[2] not in _NATIVE_DOUBLE:
        return None
    parts = _NATIVE_DOUBLE[m[2]]
    if up.shape[0] % len(parts):
        raise ValueError(f"{name}: lora_up has {up.shape[0]} rows, not a multiple of {len(parts)} (fused q/k/v)")
    rows = up.shape[0] // len(parts)
    out = {}
    for i, part in enumerate(parts):
        piece = up[i * rows:(i + 1) * rows]
        if len(parts) == 1 or piece.abs().max() > 0:
            out[f"transformer_blocks.{m[1]}.{part}"] = LoraModule(down, piece.contiguous(), alpha)
    return out


def pattern_value(patterns: dict | None, module: str, default):
    """The value of the first peft ``*_pattern`` key matching ``module`` (peft's own rule), else ``default``."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _peft_alpha(module: str, rank: int, peft_meta: dict | None) -> float:
    """Alpha of ``module`` from a peft config (alpha_pattern wins, then lora_alpha); rank when absent."""
    if not peft_meta:
        return float(rank)
    cfg = {k.removeprefix("transformer."): v for k, v in peft_meta.items()}
    return float(pattern_value(cfg.get("alpha_pattern"), module, cfg.get("lora_alpha", rank)))


def parse_lora(tensors: dict[str, torch.Tensor], header: dict | None = None) -> tuple[LoraFile, list[str]]:
    """Tensors (+ parsed header) → (LoraFile, keys that belong to no module this package understands)."""
    header = header or {}
    peft_meta = header.get(PEFT_META_KEY)
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    layouts, unknown = Counter(), []
    for key, value in tensors.items():
        if m := _KOHYA.match(key):
            mod, part, layout = _native_name(m["mod"]), m["part"], "kohya"
        elif m := _NATIVE.match(key):
            mod, part, layout = m["mod"], m["part"], "comfy"
        elif m := _DIFFUSERS.match(key):
            mod, part, layout = m["mod"], "lora_down.weight" if m["ab"] == "A" else "lora_up.weight", "diffusers"
        elif m := _DIFFUSERS_ALPHA.match(key):
            mod, part, layout = m["mod"], "alpha", "diffusers"
        else:
            unknown.append(key)
            continue
        layouts[layout] += 1
        pairs.setdefault(f"{layout}:{mod}", {})[part] = value
    modules: dict[str, LoraModule] = {}
    for tagged, parts in pairs.items():
        layout, mod = tagged.split(":", 1)
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            missing = "down/A" if "lora_down.weight" not in parts else "up/B"
            raise ValueError(f"LoRA module {mod!r} has no {missing} matrix; the file is incomplete")
        down, up = parts["lora_down.weight"].float(), parts["lora_up.weight"].float()
        if "alpha" in parts:
            alpha = float(parts["alpha"].float().item())
        elif layout == "diffusers":
            alpha = _peft_alpha(mod, down.shape[0], peft_meta)
        else:
            alpha = float(down.shape[0])
        if layout == "diffusers":
            modules[mod] = LoraModule(down, up, alpha)
            continue
        split = _split_native(mod, down, up, alpha)
        if split is None:
            unknown += [f"{mod}.{p}" for p in parts]
            continue
        modules.update(split)
    layout = layouts.most_common(1)[0][0] if layouts else "diffusers"
    return LoraFile(modules, header.get(META_KEY) or {}, layout), sorted(unknown)


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
    meta = {}
    for k, v in header.items():
        try:
            meta[k] = json.loads(v) if k in (META_KEY, PEFT_META_KEY) else v
        except json.JSONDecodeError:
            raise ValueError(f"LoRA file {path}: header field {k!r} is not valid JSON") from None
    return tensors, meta


def read_lora_file(path: str | Path, allow_unknown: bool = False) -> LoraFile:
    """Read and parse a LoRA file (safetensors only); unknown keys are an error unless ``allow_unknown``."""
    tensors, header = read_lora(path)
    lf, unknown = parse_lora(tensors, header)
    if unknown and not allow_unknown:
        more = f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""
        raise ValueError(f"LoRA {path}: {len(unknown)} keys address modules this pack does not erase with: "
                         f"{', '.join(unknown[:5])}{more}; it supports the Flux attention projections and the "
                         "pooled-text path")
    if unknown:
        log.warning("LoRA %s: ignoring %d unknown keys: %s", path, len(unknown), ", ".join(unknown[:5]))
    if not lf.modules:
        raise ValueError(f"LoRA {path} contains no LoRA matrices")
    return lf


# ---------------------------------------------------------------------------------------------------------------
# Geometry, fingerprint, validation
# ---------------------------------------------------------------------------------------------------------------
GEOMETRY_KEYS = ("num_layers", "num_single_layers", "attention_head_dim", "num_attention_heads",
                 "joint_attention_dim", "pooled_projection_dim", "in_channels", "guidance_embeds")


def model_geometry(model: nn.Module) -> dict:
    """The config fields that fix every LoRA target's shape (diffusers ``FluxTransformer2DModel``)."""
    from .flux.backend import unwrap

    cfg = unwrap(model).config
    return {k: cfg[k] for k in GEOMETRY_KEYS if k in cfg}


def fingerprint(x_embedder: torch.Tensor, context_embedder: torch.Tensor) -> str:
    """A short hash of the base weights (image and text input projections), equal for both backends."""
    h = hashlib.sha256()
    for w in (x_embedder, context_embedder):
        h.update(w.detach().float().cpu().contiguous().flatten()[:65536].numpy().tobytes())
    return h.hexdigest()[:16]


def model_fingerprint(model: nn.Module) -> str:
    from .flux.backend import unwrap

    inner = unwrap(model)
    return fingerprint(inner.x_embedder.weight, inner.context_embedder.weight)


def _linear_shape(module: nn.Module) -> tuple[int, int] | None:
    base = getattr(module, "base_layer", module)  # a peft-wrapped Linear
    if isinstance(base, nn.Linear):
        return base.out_features, base.in_features
    return None


def check_against(lf: LoraFile, model: nn.Module, source: str = "LoRA") -> None:
    """Refuse a LoRA that does not fit ``model``: names the first mismatched key and what it expected."""
    from .flux.backend import unwrap

    inner = unwrap(model)
    geo = lf.meta.get("geometry")
    if geo:
        mine = model_geometry(inner)
        for k in GEOMETRY_KEYS:
            if k in geo and k in mine and geo[k] != mine[k]:
                raise ValueError(f"{source} was made for another model geometry: {k} = {geo[k]} in the LoRA, "
                                 f"{mine[k]} in this model; use a LoRA trained on this base model")
    modules = dict(inner.named_modules())
    for name in sorted(lf.modules):
        lm = lf.modules[name]
        target = modules.get(name)
        shape = _linear_shape(target) if target is not None else None
        if shape is None:
            raise ValueError(f"{source}: key {name}.lora_A.weight targets no Linear of this model (made for "
                             "another architecture?); use a LoRA trained on this base model")
        if lm.shape != shape:
            raise ValueError(f"{source}: key {name}.lora_A.weight has shape {tuple(lm.down.shape)} and lora_B "
                             f"{tuple(lm.up.shape)}, but this model's {name} is {shape[1]} → {shape[0]}: the LoRA "
                             "was made for another model geometry; use a LoRA trained on this base model")
    fp = lf.meta.get("fingerprint")
    if fp and fp != model_fingerprint(inner):
        log.warning("%s was trained on other base weights (fingerprint %s, this model %s); applying anyway",
                    source, fp, model_fingerprint(inner))


# ---------------------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------------------
def peft_metadata(modules: dict[str, LoraModule]) -> dict:
    """The peft config diffusers needs to rebuild this adapter, ``transformer.``-prefixed (per-module ranks/alphas)."""
    ranks = Counter(m.rank for m in modules.values())
    r = ranks.most_common(1)[0][0]
    alphas = Counter(m.alpha for m in modules.values() if m.rank == r)
    alpha = alphas.most_common(1)[0][0]
    cfg = {"r": r, "lora_alpha": alpha, "target_modules": sorted(modules), "lora_dropout": 0.0, "bias": "none",
           "rank_pattern": {re.escape(k): m.rank for k, m in modules.items() if m.rank != r},
           "alpha_pattern": {re.escape(k): m.alpha for k, m in modules.items() if m.rank != r or m.alpha != alpha},
           "use_dora": False, "use_rslora": False, "init_lora_weights": True}
    return {f"transformer.{k}": v for k, v in cfg.items()}


def diffusers_tensors(modules: dict[str, LoraModule]) -> dict[str, torch.Tensor]:
    out = {}
    for name, m in sorted(modules.items()):
        out[f"transformer.{name}.lora_A.weight"] = m.down.float().contiguous()
        out[f"transformer.{name}.lora_B.weight"] = m.up.float().contiguous()
    return out


def write_lora_file(lf: LoraFile, path: str | Path, overwrite: bool = False) -> Path:
    """Write ``lf`` atomically in the diffusers layout with our metadata and the peft config in the header."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"LoRA path {path} must end in .safetensors (LoRAs are never pickles)")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another name or allow overwriting")
    header = {"format": "pt", META_KEY: json.dumps(lf.meta, default=str),
              PEFT_META_KEY: json.dumps(peft_metadata(lf.modules), default=str)}
    return atomic_save_safetensors(diffusers_tensors(lf.modules), path, metadata=header)


def describe(lf: LoraFile) -> dict:
    """A JSON-able summary: metadata, layout, targets with ranks and alphas."""
    ranks = sorted({m.rank for m in lf.modules.values()})
    return {"layout": lf.layout, "modules": len(lf.modules), "ranks": ranks,
            "targets": {k: {"rank": m.rank, "alpha": m.alpha, "shape": list(m.shape)} for k, m in
                        sorted(lf.modules.items())},
            "metadata": lf.meta}
