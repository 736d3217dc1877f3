"""A *world* over ComfyUI's own objects (MODEL, CLIP, optional VAE): what the trainer, inspection and neighbour
preview need, so that the engine runs unchanged on a Flux loaded by ComfyUI's stock loaders (or the sandbox loader).

ComfyUI is only touched through the objects handed in; nothing here imports it at module level.
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Callable

import torch

from ..flux.backend import TextCond
from ..flux.comfy import ComfyFlux
from ..flux.flow import euler, guided_velocity, shifted_sigmas
from ..flux.packing import pack_latents, unpack_latents

log = logging.getLogger("erase_flux.comfy")
CACHE_PROMPTS = 64


class ComfyWorld:
    """Text encoding with a ComfyUI CLIP, token indices from ComfyUI's own tokenization, Euler sampling on the MODEL.

    Args:
        model: a ComfyUI MODEL (``ModelPatcher``) holding a Flux.
        clip: the matching ComfyUI CLIP (for Flux: T5-XXL + CLIP-L from DualCLIPLoader; or the sandbox CLIP).
        latent_hw: latent height and width (unpacked; an image of H×W pixels has H/8 × W/8 with Flux's VAE).
        vae: optional ComfyUI VAE, for decoding previews and images.
        guidance: Flux-dev's distilled guidance (ignored by models without a guidance embedding).
        cfg_scale: classifier-free guidance of the sampler (1 = off, as Flux-dev is used; the sandbox uses 3).
    """

    def __init__(self, model, clip, latent_hw: tuple[int, int], vae=None, guidance: float = 3.5,
                 cfg_scale: float = 1.0, sample_steps: int = 20):
        if clip is None:
            raise ValueError("clip is missing: connect the CLIP that goes with this MODEL (DualCLIPLoader for Flux)")
        h, w = latent_hw
        if h % 2 or w % 2 or h < 2 or w < 2:
            raise ValueError(f"latent size {h}×{w} must be even and ≥ 2 (Flux packs 2×2 latent cells per token)")
        self.transformer, self.clip, self.vae = model, clip, vae
        self.latent_hw = (h, w)
        self.guidance, self.cfg_scale, self.sample_steps = guidance, cfg_scale, sample_steps
        # recent prompts' encodings (the trainer re-encodes its fixed prompts every step; shuffled ones rarely repeat,
        # and one Flux T5 encoding is ~4 MB, so the cache is bounded)
        self._cache: OrderedDict[str, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        dm = model.model.diffusion_model
        self.latent_channels = dm.img_in.weight.shape[1] // 4

    # --- text -------------------------------------------------------------------------------------------------
    def _encode_one(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        if prompt in self._cache:
            self._cache.move_to_end(prompt)
            return self._cache[prompt]
        tokens = self.clip.tokenize(prompt)
        cond, pooled = self.clip.encode_from_tokens(tokens, return_pooled=True)
        # CLIPTextEncode runs under inference mode; clone into normal tensors so autograd may use them
        self._cache[prompt] = (cond[0].detach().clone().float().cpu(), pooled[0].detach().clone().float().cpu())
        if len(self._cache) > CACHE_PROMPTS:
            self._cache.popitem(last=False)
        return self._cache[prompt]

    def encode(self, prompts: list[str]) -> TextCond:
        rows = [self._encode_one(p) for p in prompts]
        n = max(r[0].shape[0] for r in rows)
        seq = torch.zeros(len(rows), n, rows[0][0].shape[-1])
        for i, (s, _) in enumerate(rows):  # T5 in ComfyUI pads to a fixed minimum; longer prompts are right-padded
            seq[i, : s.shape[0]] = s
        return TextCond(seq, torch.stack([p for _, p in rows]))

    def token_indices(self, prompt: str, word: str) -> list[int]:
        from .sandbox import comfy_token_indices

        return comfy_token_indices(self.clip, prompt, word)

    def end_index(self, prompt: str) -> int:
        """Row of T5's end-of-sequence token (id 1) in ComfyUI's tokenization of ``prompt``."""
        from .sandbox import T5_BRANCH

        tok = self.clip.tokenize(prompt)
        rows = tok.get(T5_BRANCH) or next(iter(tok.values()))
        ids = [t[0] for chunk in rows for t in chunk]
        if 1 not in ids:
            raise ValueError(f"no end-of-sequence token in the tokenization of {prompt!r}")
        return ids.index(1)

    def content_rows(self, prompts: list[str]) -> list[list[int]]:
        """Per prompt, the token rows of its words (from ComfyUI's word ids: word id > 0 and not padding)."""
        from .sandbox import T5_BRANCH

        out = []
        for p in prompts:
            tok = self.clip.tokenize(p, return_word_ids=True)
            rows = tok.get(T5_BRANCH) or next(iter(tok.values()))
            out.append([i for i, t in enumerate(r for chunk in rows for r in chunk) if len(t) > 2 and t[2] > 0])
        return out

    # --- denoiser ---------------------------------------------------------------------------------------------
    def backend(self, transformer=None) -> ComfyFlux:
        return ComfyFlux(transformer if transformer is not None else self.transformer, self.latent_hw,
                         guidance=self.guidance)

    def noise(self, n: int, seed: int) -> torch.Tensor:
        """Packed initial noise, one generator per sample so that a seed means the same image in any batch."""
        h, w = self.latent_hw
        lat = torch.stack([torch.randn(self.latent_channels, h, w, generator=torch.Generator().manual_seed(seed + i))
                           for i in range(n)])
        return pack_latents(lat)

    def sigmas(self, steps: int, transformer=None) -> torch.Tensor:
        """The model's own schedule (ComfyUI's ``simple`` scheduler on its model sampling), as KSampler uses it."""
        model = transformer if transformer is not None else self.transformer
        try:
            import comfy.samplers

            return comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps).float().cpu()
        except ImportError:  # outside ComfyUI (tests with a duck-typed model)
            return shifted_sigmas(steps)

    @torch.no_grad()
    def sample_latents(self, prompts: list[str], seed: int = 0, steps: int | None = None,
                       cfg_scale: float | None = None, transformer=None,
                       callback: Callable[[int, torch.Tensor], None] | None = None, text: TextCond | None = None,
                       patch=None, shift: float | None = None) -> torch.Tensor:
        """Packed latents from Euler on the model's schedule; ``patch`` sees only the conditional passes."""
        backend = self.backend(transformer)
        steps = steps or self.sample_steps
        cfg_scale = self.cfg_scale if cfg_scale is None else cfg_scale
        cond = text if text is not None else self.encode(prompts)
        uncond = self.encode([""] * len(cond)) if cfg_scale != 1.0 else None
        sigmas = shifted_sigmas(steps, shift) if shift else self.sigmas(steps, transformer)

        velocity = guided_velocity(backend.velocity, cond, uncond, cfg_scale, patch)
        return euler(velocity, self.noise(len(cond), seed), sigmas, callback)

    def decode(self, packed: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) images in [0, 1] through the VAE."""
        if self.vae is None:
            raise ValueError("vae is missing: connect a VAE to see images (Flux: the 'ae' VAE; sandbox: its loader's VAE)")
        h, w = self.latent_hw
        img = self.vae.decode(unpack_latents(packed, h, w))  # (B, H, W, 3)
        if img.dim() == 5:
            img = img.reshape(-1, *img.shape[-3:])
        return img.movedim(-1, 1).float().cpu().clamp(0, 1)

    def sample(self, prompts: list[str], seed: int = 0, **kw) -> torch.Tensor:
        return self.decode(self.sample_latents(prompts, seed, **kw))
