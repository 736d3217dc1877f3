"""The sandbox world as a text-to-image pipeline: tokenize → encode → Flux velocity → Euler → decode → classify."""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from diffusers import FluxTransformer2DModel
from safetensors.torch import load_file

from ..flux.backend import DiffusersFlux, TextCond
from ..flux.flow import euler, guided_velocity, shifted_sigmas
from ..flux.packing import pack_latents, unpack_latents
from ..tokens import word_token_indices
from .models import AutoEncoder, Classifier, SandboxConfig, TextEncoder
from .tokenizer import load_tokenizer
from .world import AXES

log = logging.getLogger("erase_flux.sandbox")

# the default world: transformer step 22,000, sampled as its sampler.json says (24 Euler steps, CFG 3.5, shift 3),
# the one that meets the quality bar; "weights" holds the step-16,000 world the session-1 to -7 benchmarks ran on
WEIGHTS_DIR = Path(__file__).resolve().parent / "weights_22k"
WEIGHTS_16K_DIR = Path(__file__).resolve().parent / "weights"
FILES = ("config.json", "tokenizer.json", "text_encoder.safetensors", "autoencoder.safetensors",
         "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors", "classifier.safetensors")


@dataclass(frozen=True)
class SamplerDefaults:
    """The sampler a weights folder is meant to be sampled with (its optional ``sampler.json``): Euler steps, CFG
    scale and Flux's time shift. Calls that name a setting override it."""

    steps: int = 12
    cfg: float = 3.0
    shift: float = 1.0

    def __post_init__(self):
        if not isinstance(self.steps, int) or self.steps < 1:
            raise ValueError(f"sampler steps = {self.steps!r} must be a whole number ≥ 1")
        for name in ("cfg", "shift"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"sampler {name} = {value!r} must be a finite number > 0")

    @classmethod
    def read(cls, path: Path) -> "SamplerDefaults":
        """From ``path`` if it exists (the defaults otherwise); errors name the file and the field."""
        if not path.exists():
            return cls()
        data = json.loads(path.read_text())
        unknown = sorted(set(data) - set(cls.__dataclass_fields__))
        if unknown:
            raise ValueError(f"{path}: unknown field {unknown[0]!r}; allowed: steps, cfg, shift")
        try:
            return cls(**data)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None

    def label(self) -> str:
        """``24 steps / CFG 3.5 / shift 3``: how tables and reports name the sampler."""
        return f"{self.steps} steps / CFG {self.cfg:g} / shift {self.shift:g}"

    def resolve(self, steps: int | None = None, cfg: float | None = None,
                shift: float | None = None) -> tuple[int, float, float]:
        """(steps, cfg, shift): the ones given, these defaults for the rest."""
        return (self.steps if steps is None else steps, self.cfg if cfg is None else cfg,
                self.shift if shift is None else shift)


def weights_name(weights_dir: str | Path | None = None) -> str:
    """The folder name of ``weights_dir`` (``weights_22k`` for the default world), for tables and reports."""
    return Path(weights_dir or WEIGHTS_DIR).name


def _load_module(module: torch.nn.Module, path: Path) -> torch.nn.Module:
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    module.load_state_dict(state)
    return module.eval().requires_grad_(False)


class SandboxWorld:
    """Everything of the sandbox world, loaded from a weights folder (default: the shipped step-22,000 world)."""

    def __init__(self, cfg: SandboxConfig, tokenizer, text_encoder: TextEncoder, autoencoder: AutoEncoder,
                 transformer: FluxTransformer2DModel, classifier: Classifier | None = None,
                 sampler: SamplerDefaults = SamplerDefaults()):
        self.cfg = cfg
        self.sampler = sampler
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.autoencoder = autoencoder
        self.transformer = transformer
        self.classifier = classifier

    @classmethod
    def load(cls, weights_dir: str | Path | None = None) -> "SandboxWorld":
        d = Path(weights_dir) if weights_dir else WEIGHTS_DIR
        missing = [f for f in FILES if not (d / f).exists()]
        if missing:
            raise FileNotFoundError(f"sandbox weights folder {d} lacks {', '.join(missing)}; "
                                    "build it with `python -m erase_core sandbox train`")
        cfg = SandboxConfig(**json.loads((d / "config.json").read_text()))
        tok = load_tokenizer(d / "tokenizer.json", cfg.max_tokens)
        te = _load_module(TextEncoder(cfg), d / "text_encoder.safetensors")
        ae = _load_module(AutoEncoder(cfg), d / "autoencoder.safetensors")
        tr = FluxTransformer2DModel.from_pretrained(str(d / "transformer"), torch_dtype=torch.float32)
        tr.eval().requires_grad_(False)
        clf = _load_module(Classifier({a: len(v) for a, v in AXES.items()}), d / "classifier.safetensors")
        return cls(cfg, tok, te, ae, tr, clf, SamplerDefaults.read(d / "sampler.json"))

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def cfg_scale(self) -> float:
        """The sampler's classifier-free guidance (as :class:`~erase_core.comfy.world.ComfyWorld` names it)."""
        return self.sampler.cfg

    def to(self, device: str | torch.device) -> "SandboxWorld":
        """Move every model to ``device`` (e.g. ``cuda``); noise is still drawn on the CPU, so seeds keep their images."""
        for m in (self.text_encoder, self.autoencoder, self.transformer, self.classifier):
            if m is not None:
                m.to(device)
        return self

    # --- text -------------------------------------------------------------------------------------------------
    def tokenize(self, prompts: list[str]) -> torch.Tensor:
        ids = [e.ids for e in self.tokenizer.encode_batch(list(prompts))]
        return torch.tensor(ids, dtype=torch.long, device=self.device)

    def encode(self, prompts: list[str]) -> TextCond:
        ids = self.tokenize(prompts)
        seq, pooled = self.text_encoder(ids)
        return TextCond(seq, pooled)

    # --- denoiser ---------------------------------------------------------------------------------------------
    @property
    def latent_hw(self) -> tuple[int, int]:
        return (self.cfg.latent_size, self.cfg.latent_size)

    def backend(self, transformer=None) -> DiffusersFlux:
        return DiffusersFlux(transformer if transformer is not None else self.transformer, self.latent_hw)

    def noise(self, n: int, seed: int) -> torch.Tensor:
        """Packed initial noise, one generator per sample so that a seed means the same image in any batch."""
        c, s = self.cfg.latent_channels, self.cfg.latent_size
        lat = torch.stack([torch.randn(c, s, s, generator=torch.Generator().manual_seed(seed + i)) for i in range(n)])
        return pack_latents(lat).to(self.device)

    @torch.no_grad()
    def sample_latents(self, prompts: list[str], seed: int = 0, steps: int | None = None,
                       cfg_scale: float | None = None, transformer=None,
                       callback: Callable[[int, torch.Tensor], None] | None = None, text: TextCond | None = None,
                       patch=None, shift: float | None = None) -> torch.Tensor:
        """Packed latents (B, N, 4C) from the Euler sampler with classifier-free guidance; ``steps``, ``cfg_scale``
        and ``shift`` default to the weights' :class:`SamplerDefaults`.

        ``patch`` (an active :class:`~erase_core.flux.attention.AttentionPatch`) sees only the conditional passes.
        """
        steps, cfg_scale, shift = self.sampler.resolve(steps, cfg_scale, shift)
        backend = self.backend(transformer)
        cond = text if text is not None else self.encode(prompts)
        uncond = self.encode([""] * len(cond)) if cfg_scale != 1.0 else None

        velocity = guided_velocity(backend.velocity, cond, uncond, cfg_scale, patch)
        return euler(velocity, self.noise(len(cond), seed), shifted_sigmas(steps, shift), callback)

    def sample(self, prompts: list[str], seed: int = 0, **kw) -> torch.Tensor:
        """Generate one image per prompt (B, 3, H, W); keywords as :meth:`sample_latents`."""
        return self.decode(self.sample_latents(prompts, seed, **kw))

    def token_indices(self, prompt: str, word: str) -> list[int]:
        """Token indices of ``word`` in ``prompt`` for the sandbox's T5-style tokenizer."""
        return word_token_indices(self.tokenizer, prompt, word)

    def end_index(self, prompt: str) -> int:
        """Row of the end-of-sequence token ``</s>`` (the empty anchor's row in the closed form)."""
        return self.tokenize([prompt])[0].tolist().index(self.tokenizer.token_to_id("</s>"))

    def content_rows(self, prompts: list[str]) -> list[list[int]]:
        """Per prompt, the token rows of its words (no padding, no end-of-sequence token)."""
        return [[i for i, tok in enumerate(ids.tolist()) if tok > 1] for ids in self.tokenize(prompts)]

    def decode(self, packed: torch.Tensor) -> torch.Tensor:
        h, w = self.latent_hw
        return self.autoencoder.decode(unpack_latents(packed, h, w))

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return pack_latents(self.autoencoder.encode(images))

    # --- judge ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def classify(self, images: torch.Tensor) -> dict[str, list[str]]:
        """Per axis, the classifier's verdict for each image (names from ``world.AXES``)."""
        if self.classifier is None:
            raise RuntimeError("this sandbox world has no classifier loaded")
        logits = self.classifier(images)
        return {axis: [AXES[axis][i] for i in logits[axis].argmax(-1).tolist()] for axis in logits}
