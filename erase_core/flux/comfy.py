"""ComfyUI's native Flux (``comfy/ldm/flux``) behind the engine's backend interface.

Duck-typed over a ComfyUI ``ModelPatcher`` (what ComfyUI calls MODEL): nothing here imports ComfyUI at module level.
The differences from diffusers' Flux that matter here, and how they are met:

* q, k and v of the text stream are one fused ``txt_attn.qkv`` (rows q | k | v): the LoRA on ``add_q_proj`` is a
  low-rank update of the q rows only, added by a weight wrapper (``ModelPatcher.add_weight_wrapper``), so the base
  weights stay untouched and the frozen teacher is the same model with the wrapper switched off.
* Text tokens come first in the joint sequence (``img_slice = [txt_len, L]``): the attention patch runs as ComfyUI's
  ``attn1_patch``, where q and k arrive post-norm, pre-RoPE as (B, H, L, D) and a returned ``attn_mask`` replaces the
  mask; the capture/suppression logic is the diffusers patch's own (:class:`~erase_core.flux.attention.PatchCore`).
* The blocks add residuals in place, so autograd through them needs per-block checkpointing (each block's inputs are
  cloned inside a non-reentrant checkpoint, installed through ``patches_replace["dit"]``).
"""
from __future__ import annotations

import contextlib
import math
from typing import Sequence

import torch
import torch.utils.checkpoint
from torch import nn

from .attention import PatchCore, TokenSelection
from .backend import TextCond
from .packing import pack_latents, unpack_latents

# diffusers LoRA target → (ComfyUI module name with {i} = block index, row slice as (part, parts) of the fused weight)
DUAL_SLICES = {
    "add_q_proj": ("double_blocks.{i}.txt_attn.qkv", (0, 3)),
    "add_k_proj": ("double_blocks.{i}.txt_attn.qkv", (1, 3)),
    "add_v_proj": ("double_blocks.{i}.txt_attn.qkv", (2, 3)),
    "to_q": ("double_blocks.{i}.img_attn.qkv", (0, 3)),
    "to_k": ("double_blocks.{i}.img_attn.qkv", (1, 3)),
    "to_v": ("double_blocks.{i}.img_attn.qkv", (2, 3)),
    "to_add_out": ("double_blocks.{i}.txt_attn.proj", (0, 1)),
    "to_out.0": ("double_blocks.{i}.img_attn.proj", (0, 1)),
}
POOLED_MODULES = {"time_text_embed.text_embedder.linear_1": "vector_in.in_layer",
                  "time_text_embed.text_embedder.linear_2": "vector_in.out_layer"}


def diffusion_model(patcher):
    """The ``comfy.ldm.flux.model.Flux`` inside a ModelPatcher; a clear error for anything else."""
    inner = getattr(getattr(patcher, "model", None), "diffusion_model", None)
    if inner is None or not hasattr(inner, "double_blocks") or not hasattr(inner, "single_blocks"):
        kind = type(inner).__name__ if inner is not None else type(patcher).__name__
        raise TypeError(f"MODEL is not a Flux model ({kind} has no double_blocks/single_blocks); load Flux with a stock "
                        "loader (UNETLoader / CheckpointLoaderSimple) or the sandbox loader")
    return inner


def is_comfy_model(model) -> bool:
    return hasattr(model, "model_options") and hasattr(getattr(model, "model", None), "diffusion_model")


# --- LoRA as weight wrappers ------------------------------------------------------------------------------------
class SliceLora(nn.Module):
    """ΔW of one (possibly fused) Linear weight: (alpha / rank) · up @ down on each targeted row slice, 0 elsewhere.

    Installed as a ComfyUI weight wrapper (``weight → weight + ΔW``); ``enabled = False`` gives the frozen base.
    """

    def __init__(self, shape: tuple[int, int], slices: dict[str, tuple[int, int]], rank: int, alpha: float,
                 generator: torch.Generator):
        super().__init__()
        self.shape, self.slices, self.scale = tuple(shape), dict(slices), alpha / rank
        self.rank, self.alpha = rank, alpha
        self.down = nn.ParameterDict()
        self.up = nn.ParameterDict()
        for key, (start, length) in self.slices.items():
            down = torch.empty(rank, shape[1])
            nn.init.kaiming_uniform_(down, a=math.sqrt(5), generator=generator)  # peft's default init
            self.down[_safe(key)] = nn.Parameter(down)
            self.up[_safe(key)] = nn.Parameter(torch.zeros(length, rank))  # B = 0: the model starts unchanged
        self.enabled = True

    def delta(self) -> torch.Tensor:
        rows, at = [], 0
        for key, (start, length) in sorted(self.slices.items(), key=lambda kv: kv[1][0]):
            if start > at:
                rows.append(self.up[_safe(key)].new_zeros(start - at, self.shape[1]))
            rows.append(self.scale * (self.up[_safe(key)] @ self.down[_safe(key)]))
            at = start + length
        if at < self.shape[0]:
            rows.append(self.down[next(iter(self.down))].new_zeros(self.shape[0] - at, self.shape[1]))
        return torch.cat(rows)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return weight
        return weight + self.delta().to(device=weight.device, dtype=weight.dtype)


def _safe(key: str) -> str:
    return key.replace(".", "__")  # parameter names cannot hold dots


def lora_layout(dm, targets: Sequence[str]) -> dict[str, dict[str, tuple[int, int]]]:
    """ComfyUI module → {diffusers target name: (row start, row count)} for ``targets`` on every dual block."""
    layout: dict[str, dict[str, tuple[int, int]]] = {}
    for t in targets:
        if t == "pooled":
            if getattr(dm, "vector_in", None) is None:
                raise ValueError("LoRA target 'pooled' needs the model's vector_in (CLIP pooled) path; this Flux has none")
            for dname, cname in POOLED_MODULES.items():
                out = _module(dm, cname).weight.shape[0]
                layout.setdefault(cname, {})[dname] = (0, out)
            continue
        if t not in DUAL_SLICES:
            raise ValueError(f"LoRA target {t!r} is not supported; choose from {', '.join(DUAL_SLICES)} or 'pooled'")
        pattern, (part, parts) = DUAL_SLICES[t]
        for i in range(len(dm.double_blocks)):
            cname = pattern.format(i=i)
            out = _module(dm, cname).weight.shape[0]
            length = out // parts
            layout.setdefault(cname, {})[f"transformer_blocks.{i}.attn.{t}"] = (part * length, length)
    return layout


def _module(root: nn.Module, name: str) -> nn.Module:
    mod = root
    for part in name.split("."):
        mod = getattr(mod, part)
    return mod


# --- attention --------------------------------------------------------------------------------------------------
class ComfyAttentionPatch(PatchCore):
    """The capture/suppress patch on ComfyUI's Flux; active while entered, for passes through ``backend``."""

    def __init__(self, backend: "ComfyFlux", tokens: TokenSelection, blocks: Sequence[str] | None = None, **kw):
        dm = backend.diffusion_model
        n_double, n_single = len(dm.double_blocks), len(dm.single_blocks)
        known = [f"double.{i}" for i in range(n_double)] + [f"single.{i}" for i in range(n_single)]
        super().__init__(known, n_double, tokens, blocks, **kw)
        self.backend = backend

    def __enter__(self) -> "ComfyAttentionPatch":
        self.backend.patches.append(self)
        return self

    def __exit__(self, *exc) -> None:
        if self in self.backend.patches:
            self.backend.patches.remove(self)


def attn1_patch(patches: list[PatchCore]):
    """A ComfyUI ``attn1_patch``: sees q, k (post-norm, pre-RoPE, (B, H, L, D)) of every block before attention, with
    ``img_slice`` = [txt_len, L]; every patch in ``patches`` records maps and may add its suppression to the mask."""

    def patch(q, k, v, pe=None, attn_mask=None, extra_options=None):
        opts = extra_options or {}
        if "img_slice" not in opts or "block_type" not in opts:
            return {}
        name = f"{opts['block_type']}.{opts['block_index']}"
        n_txt = opts["img_slice"][0]
        n_img = q.shape[2] - n_txt
        mask = attn_mask
        for p in list(patches):
            if name in p.installed_blocks():
                mask = p.attend(name, q.shape[0], n_txt, n_img, q.device, q.dtype, mask,
                                lambda: _roped_qk(q, k, pe, n_txt))
        return {"attn_mask": mask} if mask is not attn_mask else {}

    return patch


def _roped_qk(q: torch.Tensor, k: torch.Tensor, pe, n_txt: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Image queries (B, N_img, H, D) and keys (B, S, H, D) as the attention sees them (RoPE applied)."""
    if pe is not None:
        from comfy.ldm.flux.math import apply_rope

        q, k = apply_rope(q, k, pe)
    return q[:, :, n_txt:].transpose(1, 2), k.transpose(1, 2)


def suppressed_model(patcher, tokens: TokenSelection, scale: float = 0.0, blocks: Sequence[str] | None = None,
                     rows: str = "all"):
    """A clone of ``patcher`` whose sampling (any sampler, stock KSampler included) deletes (``scale = 0``) or scales
    the chosen text columns in ``blocks`` (default: every block): the deterministic attention erasure."""
    dm = diffusion_model(patcher)
    every = [f"double.{i}" for i in range(len(dm.double_blocks))] + [f"single.{i}" for i in range(len(dm.single_blocks))]
    core = PatchCore(every, len(dm.double_blocks), tokens, blocks=[], capture=False, suppress=scale,
                     suppress_blocks=list(blocks) if blocks else every, suppress_rows=rows)
    m = patcher.clone()
    m.set_model_attn1_patch(attn1_patch([core]))  # appended after any earlier attn1 patches (chain-safe)
    return m


# --- the backend ------------------------------------------------------------------------------------------------
class ComfyFlux:
    """Backend over a ComfyUI MODEL for packed latents of a fixed latent size (the interface of
    :class:`~erase_core.flux.backend.DiffusersFlux`, plus the LoRA and attention hooks the trainer uses)."""

    def __init__(self, patcher, latent_hw: tuple[int, int], guidance: float | None = None,
                 dtype: torch.dtype | None = None):
        self.patcher = patcher
        self.model = patcher
        self.diffusion_model = diffusion_model(patcher)
        self.latent_hw = latent_hw
        self.guidance = guidance
        self.dtype = dtype
        self.loras: dict[str, SliceLora] = {}
        self.layout: dict[str, dict[str, tuple[int, int]]] = {}
        if getattr(self.diffusion_model.params, "guidance_embed", False) and guidance is None:
            raise ValueError("this Flux model has a guidance embedding (dev): pass guidance, e.g. 3.5")

    @property
    def patches(self) -> list[PatchCore]:
        """Attention patches entered on this MODEL (shared by every backend object over the same patcher)."""
        return self.patcher.__dict__.setdefault("_erase_flux_patches", [])

    @property
    def device(self) -> torch.device:
        return next(self.diffusion_model.parameters()).device

    def dual_blocks(self) -> list[nn.Module]:
        return list(self.diffusion_model.double_blocks)

    def _options(self) -> dict:
        """The MODEL's transformer options, plus our attn1 patch while attention patches are entered."""
        opts = dict(self.patcher.model_options.get("transformer_options", {}))
        if self.patches:
            patches = {k: list(v) for k, v in opts.get("patches", {}).items()}
            patches.setdefault("attn1_patch", []).append(attn1_patch(self.patches))
            opts["patches"] = patches
        return opts

    def velocity(self, x: torch.Tensor, t: torch.Tensor, text: TextCond) -> torch.Tensor:
        """v(x_t, t, c) for packed latents (B, N_img, 4C) and times t in [0, 1] (ComfyUI's Flux takes σ itself)."""
        h, w = self.latent_hw
        dm = self.diffusion_model
        dtype = self.dtype or next(dm.parameters()).dtype
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            dtype = torch.bfloat16  # fp8-stored weights compute in bf16
        dev = self.device
        guidance = None
        if getattr(dm.params, "guidance_embed", False):
            guidance = torch.full((x.shape[0],), float(self.guidance), device=dev, dtype=dtype)
        import comfy.model_management as mm

        mm.load_models_gpu([self.patcher])  # no-op when loaded; re-applies weight wrappers if ComfyUI unloaded it
        was = mm.in_training
        mm.in_training = was or torch.is_grad_enabled()  # pure-torch RoPE, differentiable
        try:
            out = dm(unpack_latents(x, h, w).to(dev, dtype), t.to(dev, dtype), text.sequence.to(dev, dtype),
                     y=text.pooled.to(dev, dtype), guidance=guidance, transformer_options=self._options())
        finally:
            mm.in_training = was
        return pack_latents(out.float()).to(x.device)

    # --- LoRA -----------------------------------------------------------------------------------------------
    def attach_lora(self, targets: Sequence[str], rank: int, alpha: float, seed: int = 0) -> list[nn.Parameter]:
        """Fresh trainable LoRA wrappers (fp32, B = 0) on the targets' weights; returns the parameters."""
        if self.loras:
            raise RuntimeError("this backend already has a LoRA attached")
        dm = self.diffusion_model
        self.layout = lora_layout(dm, targets)
        gen = torch.Generator().manual_seed(seed)
        dev = self.device
        for cname, slices in self.layout.items():
            shape = tuple(_module(dm, cname).weight.shape)
            lora = SliceLora(shape, slices, rank, alpha, gen).to(dev)
            self.patcher.add_weight_wrapper(f"diffusion_model.{cname}.weight", lora)
            self.loras[cname] = lora
        self._load()
        params = [p for lora in self.loras.values() for p in lora.parameters()]
        for p in params:
            p.requires_grad_(True)
        return params

    def enable_training(self) -> None:
        """Make the MODEL's forward differentiable for trainers that bring their own parameters (the distilled
        merge's hooked LoRA): every block checkpointed on cloned inputs (ComfyUI's blocks add residuals in place)."""
        self._checkpoint_blocks()

    def _load(self) -> None:
        """(Re)load the patcher so its weight wrappers are live, and checkpoint each block for autograd."""
        import comfy.model_management as mm

        self._checkpoint_blocks()
        mm.load_models_gpu([self.patcher], memory_required=1e20, force_full_load=True)

    def _checkpoint_blocks(self) -> None:
        dm = self.diffusion_model
        for kind, blocks in (("double_block", dm.double_blocks), ("single_block", dm.single_blocks)):
            for i in range(len(blocks)):
                self.patcher.set_model_patch_replace(checkpointed_block(dm, kind, i), "dit", kind, i)

    def lora_parameters(self) -> dict[str, nn.Parameter]:
        return {f"{c}.{n}": p for c, lora in self.loras.items() for n, p in lora.named_parameters()}

    @contextlib.contextmanager
    def teacher(self):
        """The frozen base: every LoRA wrapper off; on exit on again (and trainable)."""
        for lora in self.loras.values():
            lora.enabled = False
        try:
            yield self
        finally:
            for lora in self.loras.values():
                lora.enabled = True

    def linear(self, name: str) -> tuple[nn.Module, tuple[int, int] | None]:
        """The Linear behind a diffusers module name (``transformer_blocks.N.attn.add_k_proj``) and its rows in the
        fused weight (the k third of ``double_blocks.N.txt_attn.qkv``)."""
        dm = self.diffusion_model
        if name in POOLED_MODULES:
            return _module(dm, POOLED_MODULES[name]), None
        parts = name.split(".")
        if len(parts) < 4 or parts[0] != "transformer_blocks" or ".".join(parts[3:]) not in DUAL_SLICES:
            raise ValueError(f"module {name!r} has no counterpart in ComfyUI's Flux (supported: "
                             f"transformer_blocks.N.attn.{{{', '.join(DUAL_SLICES)}}} and the pooled path)")
        pattern, (part, parts_n) = DUAL_SLICES[".".join(parts[3:])]
        module = _module(dm, pattern.format(i=int(parts[1])))
        length = module.weight.shape[0] // parts_n
        return module, (part * length, length)

    def with_edit(self, lora):
        """A clone of the MODEL with a LoRA file object applied by ComfyUI's own LoRA loading (weight patches)."""
        import comfy.sd

        from ..lora_file import diffusers_tensors

        folded = {k: m.folded() for k, m in lora.modules.items()}  # the scale lives in up: ComfyUI's alpha=None is 1
        patched, _ = comfy.sd.load_lora_for_models(self.patcher, None, diffusers_tensors(folded), 1.0, 0.0)
        return patched.clone(force_deepcopy=True)  # a trainable copy, as the trainer needs (see train._copy)

    def attention_patch(self, tokens: TokenSelection, **kw) -> ComfyAttentionPatch:
        return ComfyAttentionPatch(self, tokens, **kw)

    def trained_modules(self):
        """The attached LoRA in diffusers naming (what stock LoRA loaders map onto the fused slices)."""
        from ..lora_file import LoraModule

        modules = {}
        for cname, lora in self.loras.items():
            for key in lora.slices:
                modules[key] = LoraModule(lora.down[_safe(key)].detach().float().cpu(),
                                          lora.up[_safe(key)].detach().float().cpu(), float(lora.alpha))
        return modules


def checkpointed_block(dm, kind: str, index: int):
    """A ``patches_replace["dit"]`` block wrapper: when autograd is on, the block runs under a non-reentrant
    checkpoint on cloned inputs (the blocks add residuals in place). The block module and a copy of the transformer
    options are bound at call time: ComfyUI's own ``original_block`` closes over its loop variable, which has moved
    on by the time backward recomputes the block."""
    block = (dm.double_blocks if kind == "double_block" else dm.single_blocks)[index]

    def replace(args: dict, extra: dict) -> dict:
        if not torch.is_grad_enabled():
            return extra["original_block"](args)
        opts = dict(args.get("transformer_options") or {})
        common = dict(vec=args["vec"], pe=args["pe"], attn_mask=args.get("attn_mask"), transformer_options=opts)

        def run(*tensors):
            import comfy.model_management as mm

            was = mm.in_training
            mm.in_training = True  # pure-torch RoPE: differentiable
            try:
                if kind == "double_block":
                    return block(img=tensors[0].clone(), txt=tensors[1].clone(), **common)
                return (block(tensors[0].clone(), **common),)
            finally:
                mm.in_training = was

        if kind == "double_block":
            img, txt = torch.utils.checkpoint.checkpoint(run, args["img"], args["txt"], use_reentrant=False)
            return {"img": img, "txt": txt}
        (img,) = torch.utils.checkpoint.checkpoint(run, args["img"], use_reentrant=False)
        return {"img": img}

    return replace
