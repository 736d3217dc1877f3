"""The bundled sandbox world as ComfyUI objects: MODEL (a Flux ``ModelPatcher``), CLIP and VAE.

Everything is built with ComfyUI's own machinery, so stock nodes (``CLIPTextEncode``, ``KSampler``,
``EmptySD3LatentImage``, ``VAEDecode``, ``VAEEncode``) run on the sandbox unchanged:

* MODEL: the diffusers transformer's weights, converted to the BFL layout by ComfyUI's own diffusers→Flux key map,
  loaded by ``comfy.sd.load_diffusion_model_state_dict`` (detected as ``FluxSchnell``: no guidance embedding), fp32.
  Its ``latent_format`` is replaced by one whose ``process_in``/``process_out`` are the identity, so the sampler
  feeds the transformer the sandbox's normalised latents exactly.
* CLIP: a genuine ``comfy.sd.CLIP`` whose tokenizer is ComfyUI's ``SDTokenizer`` over the sandbox's T5-style
  sub-word vocabulary (branch ``"t5xxl"``, as Flux's CLIP has) and whose text model is :class:`SandboxTextModel`.
* VAE: a genuine ``comfy.sd.VAE`` whose ``first_stage_model`` is :class:`SandboxFirstStage` (4 pixels per latent
  cell, 16 channels).

Image size: the latent format declares 4 pixels per latent cell, and KSampler rescales an *empty* latent from
``EmptySD3LatentImage``/``EmptyLatentImage`` (which make width/8 latents) to that ratio, so ``EmptySD3LatentImage``
with width = height = 32 samples the sandbox's native 8×8 latent and decodes to a 32×32 image. (A 64×64 empty
latent becomes 16×16, i.e. a 64×64 image the sandbox was never trained on.)

ComfyUI is imported only inside functions: this module imports without it.
"""
from __future__ import annotations

import copy
import functools
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from ..sandbox.models import AutoEncoder, TextEncoder
from ..tokens import METASPACE, TokenizedPrompt, token_indices, word_spans

log = logging.getLogger("erase_flux.comfy")

#: The token-dict branch of the T5 role, named as in ComfyUI's Flux tokenizer.
T5_BRANCH = "t5xxl"
PAD_ID, EOS_ID = 0, 1


# --- MODEL -----------------------------------------------------------------------------------------------------------
def sandbox_bfl_state_dict(world) -> dict[str, torch.Tensor]:
    """The sandbox transformer's weights in ComfyUI/BFL Flux key layout (``double_blocks.N.img_attn.qkv`` …).

    Uses ComfyUI's own diffusers→BFL conversion (``comfy.model_detection.convert_diffusers_mmdit``: fused q|k|v,
    single-block ``linear1 = [q; k; v; mlp_in]``, final-layer scale/shift swapped), on cloned tensors.
    """
    from comfy import model_detection

    diffusers_sd = {k: v.detach().clone().float() for k, v in world.transformer.state_dict().items()}
    bfl = model_detection.convert_diffusers_mmdit(diffusers_sd, "")
    if bfl is None:
        raise ValueError("ComfyUI did not recognise the sandbox transformer as a diffusers Flux state dict "
                         "(no 'x_embedder.weight'); is world.transformer a FluxTransformer2DModel?")
    if diffusers_sd:
        log.warning("diffusers keys not converted to the BFL layout: %s", sorted(diffusers_sd))
    return bfl


@functools.cache
def _latent_format_class() -> type:
    from comfy.latent_formats import LatentFormat

    class SandboxLatentFormat(LatentFormat):
        """The sandbox's own latent space: already normalised, so process_in/out are the identity (scale 1)."""

        scale_factor = 1.0
        latent_channels = 16
        latent_dimensions = 2
        spacial_downscale_ratio = 4

    return SandboxLatentFormat


def sandbox_latent_format(cfg) -> Any:
    """A ComfyUI ``LatentFormat`` for the sandbox config: identity scaling, ``cfg.latent_channels`` channels."""
    fmt = _latent_format_class()()
    fmt.latent_channels = cfg.latent_channels
    fmt.spacial_downscale_ratio = cfg.latent_down
    return fmt


def load_sandbox_model(world, dtype: torch.dtype = torch.float32, weights_dir: str | Path | None = None) -> Any:
    """The sandbox transformer as a ComfyUI MODEL (``ModelPatcher``), loaded by ComfyUI's own loader (fp32 by
    default; bf16 or fp8 storage as ComfyUI offers for Flux)."""
    import comfy.sd

    patcher = comfy.sd.load_diffusion_model_state_dict(sandbox_bfl_state_dict(world),
                                                       model_options={"dtype": dtype})
    if patcher is None:
        raise RuntimeError("comfy.sd.load_diffusion_model_state_dict could not detect the sandbox transformer; "
                           "its hidden size must be a multiple of 128 (see erase_core.sandbox.models.SandboxConfig)")
    kind = type(patcher.model.model_config).__name__
    if kind != "FluxSchnell":
        raise RuntimeError(f"ComfyUI detected the sandbox transformer as {kind}, expected FluxSchnell "
                           "(Flux without a guidance embedding); the sandbox weights may be damaged")
    fmt = sandbox_latent_format(world.cfg)
    patcher.model.latent_format = fmt
    # the world's time shift (its sampler.json; FluxSchnell's own is 1): KSampler's schedules then step down the same
    # shifted times σ' = shift·σ / (1 + (shift − 1)·σ) as the engine's sampler
    sampling = patcher.model.model_sampling
    sampling.set_parameters(shift=world.sampler.shift, multiplier=sampling.multiplier)
    patcher.model.model_config.latent_format = fmt
    # how ComfyUI re-creates a MODEL for a deep copy (``clone(force_deepcopy=True)``, what trainers use); ``world``
    # must come from ``weights_dir`` (default: the shipped step-22,000 world)
    patcher.cached_patcher_init = (sandbox_model_patcher, (str(weights_dir) if weights_dir else None, dtype))
    log.info("sandbox MODEL loaded as %s (%d double, %d single blocks, %s)", kind,
             len(patcher.model.diffusion_model.double_blocks), len(patcher.model.diffusion_model.single_blocks), dtype)
    return patcher


# --- CLIP ------------------------------------------------------------------------------------------------------------
class PieceTokenizer:
    """The sandbox ``tokenizers.Tokenizer`` behind the interface ComfyUI's ``SDTokenizer`` expects of a
    transformers tokenizer: ``from_pretrained``, ``__call__(text)["input_ids"]`` (unpadded, ``</s>`` appended),
    ``get_vocab`` and ``decode``."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, source, **_kwargs) -> "PieceTokenizer":
        """``source``: a ``tokenizers.Tokenizer`` (copied) or the path of a ``tokenizer.json``."""
        from tokenizers import Tokenizer

        tok = Tokenizer.from_str(source.to_str()) if isinstance(source, Tokenizer) else Tokenizer.from_file(str(source))
        tok.no_padding()
        tok.no_truncation()
        return cls(tok)

    def __call__(self, text: str, **_kwargs) -> dict[str, list[int]]:
        return {"input_ids": self.tokenizer.encode(text).ids}

    def get_vocab(self) -> dict[str, int]:
        return self.tokenizer.get_vocab()

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)


def _sandbox_sd_tokenizer(source, max_tokens: int, text_dim: int, embedding_directory=None,
                          tokenizer_data: dict | None = None) -> Any:
    """ComfyUI's ``SDTokenizer`` set up like its T5-XXL tokenizer (no BOS, ``</s>``, ``<pad>`` = 0), padded to
    the sandbox's ``max_tokens`` per chunk (the text encoder's position table)."""
    from comfy.sd1_clip import SDTokenizer

    return SDTokenizer(source, max_length=max_tokens, pad_with_end=False, embedding_directory=embedding_directory,
                       embedding_size=text_dim, embedding_key=T5_BRANCH, tokenizer_class=PieceTokenizer,
                       has_start_token=False, pad_to_max_length=True, min_length=None,
                       tokenizer_data=tokenizer_data or {})


def _token_id_rows(token_lists: list[list]) -> torch.Tensor:
    rows = []
    for row in token_lists:
        bad = [t for t in row if not isinstance(t, int)]
        if bad:
            raise ValueError("the sandbox text encoder takes token ids only, got an embedding tensor in the prompt; "
                             "remove 'embedding:' references from the prompt")
        rows.append(row)
    return torch.tensor(rows, dtype=torch.long)


class SandboxTextModel(nn.Module):
    """ComfyUI's ``cond_stage_model`` role over the sandbox :class:`TextEncoder`.

    ``encode_token_weights`` is ComfyUI's own ``ClipTokenWeightEncoder`` logic (prompt weights, chunks joined along
    the sequence, the first chunk's pooled vector); weights stay fp32 whatever dtype ComfyUI proposes.
    """

    special_tokens = {"end": EOS_ID, "pad": PAD_ID}

    def __init__(self, encoder: TextEncoder, device=None, dtype=None, model_options: dict | None = None):
        super().__init__()
        self.encoder = encoder.to(device=device or "cpu", dtype=torch.float32)
        self.dtypes = {torch.float32}
        self.execution_device = None
        if dtype not in (None, torch.float32):
            log.debug("sandbox text encoder kept in fp32 (ComfyUI proposed %s)", dtype)

    def reset_clip_options(self) -> None:
        self.execution_device = None

    def set_clip_options(self, options: dict) -> None:
        self.execution_device = options.get("execution_device", self.execution_device)

    def encode(self, token_lists: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.execution_device or self.encoder.pos.device
        seq, pooled = self.encoder(_token_id_rows(token_lists).to(device))
        return seq.float(), pooled.float()

    def encode_token_weights(self, token_weight_pairs: dict):
        from comfy.sd1_clip import ClipTokenWeightEncoder

        if T5_BRANCH not in token_weight_pairs:
            raise ValueError(f"token dict has branches {sorted(token_weight_pairs)}, the sandbox needs {T5_BRANCH!r}; "
                             "tokenize with the sandbox CLIP's own tokenizer")
        return ClipTokenWeightEncoder.encode_token_weights(self, token_weight_pairs[T5_BRANCH])

    def load_sd(self, sd: dict[str, torch.Tensor]):
        sd = {k.removeprefix("encoder."): v for k, v in sd.items()}
        return self.encoder.load_state_dict(sd, strict=False)


@dataclass
class _ClipTarget:
    """What ``comfy.sd.CLIP`` builds from (as ComfyUI's ``load_text_encoder_state_dicts`` passes it)."""

    clip: Callable[..., nn.Module]
    tokenizer: Callable[..., Any]
    params: dict = field(default_factory=dict)


def sandbox_clip(world) -> Any:
    """The sandbox text encoder as a ComfyUI ``comfy.sd.CLIP`` (CLIP socket).

    ``CLIPTextEncode`` gives ``[[seq (1, 32, 128), {"pooled_output": (1, 64)}]]``, equal to ``world.encode``
    for prompts of up to 31 tokens; longer prompts get more 32-token chunks (ComfyUI's chunking) where the
    engine truncates. ``clip.tokenize(text, return_word_ids=True)["t5xxl"]`` has ComfyUI's per-token word ids.
    """
    import comfy.sd
    from comfy.sd1_clip import SD1Tokenizer

    cfg = world.cfg
    branch = functools.partial(_sandbox_sd_tokenizer, world.tokenizer, cfg.max_tokens, cfg.text_dim)
    encoder = copy.deepcopy(world.text_encoder).eval().requires_grad_(False)
    target = _ClipTarget(clip=SandboxTextModel, params={"encoder": encoder},
                         tokenizer=functools.partial(SD1Tokenizer, name=T5_BRANCH, tokenizer=branch))
    n_params = sum(p.numel() for p in encoder.parameters())
    return comfy.sd.CLIP(target, parameters=n_params)


# --- token indices ---------------------------------------------------------------------------------------------------
def _is_special(piece: str) -> bool:
    return piece.startswith("<") and piece.endswith(">")


def tokenized_from_comfy(rows: list[tuple], inv_vocab: dict[int, str]) -> TokenizedPrompt:
    """Rebuild the text ComfyUI tokenized, with character offsets, from ``(id, weight, word_id)`` rows.

    Word id 0 (padding, ``</s>``) and embedding tensors get empty spans. A piece's span includes the space its
    ``▁`` stands for, as the ``tokenizers`` offsets do, so :func:`erase_core.tokens.token_indices` applies.
    """
    text, pieces, offsets = "", [], []
    last_word = 0
    for tok, _weight, word_id in rows:
        piece = inv_vocab.get(tok, "") if isinstance(tok, int) else ""
        if word_id == 0 or not isinstance(tok, int):
            pieces.append(piece or "<embedding>")
            offsets.append((len(text), len(text)))
            continue
        chunk = "\ufffd" if _is_special(piece) else piece.replace(METASPACE, " ")
        if word_id != last_word and text and not chunk.startswith(" "):
            text += " "  # a new ComfyUI segment (weights, embeddings) is a new word
        last_word = word_id
        offsets.append((len(text), len(text) + len(chunk)))
        pieces.append(piece)
        text += chunk
    return TokenizedPrompt(text, tuple(pieces), tuple(offsets))


def comfy_token_indices(clip, prompt: str, word: str, branch: str = T5_BRANCH) -> list[int]:
    """Indices of ``word``'s tokens (every occurrence, case-insensitive, all sub-word pieces) in the T5 sequence
    that ComfyUI's ``clip`` produces for ``prompt``; works for :func:`sandbox_clip` and ComfyUI's Flux CLIP.

    Indices count across ComfyUI's chunks, i.e. they index the conditioning's sequence dimension.
    """
    tokens = clip.tokenize(prompt, return_word_ids=True)
    if branch not in tokens:
        raise ValueError(f"clip tokenizes into branches {sorted(tokens)}, not {branch!r}; "
                         "use a Flux CLIP (T5-XXL) or the sandbox CLIP")
    inv_vocab = getattr(getattr(clip.tokenizer, branch, None), "inv_vocab", None)
    if inv_vocab is None:
        raise TypeError(f"clip.tokenizer.{branch} has no inv_vocab; expected a ComfyUI SDTokenizer")
    rows = [row for chunk in tokens[branch] for row in chunk]
    tokenized = tokenized_from_comfy(rows, inv_vocab)
    if not word_spans(tokenized.prompt, word):
        raise ValueError(f"word {word!r} does not occur in prompt {prompt!r} (as ComfyUI tokenizes it: "
                         f"{tokenized.prompt.strip()!r}); check the spelling or choose a word of the prompt")
    return token_indices(tokenized, word)


# --- VAE -------------------------------------------------------------------------------------------------------------
class SandboxFirstStage(nn.Module):
    """ComfyUI's ``first_stage_model`` role over the sandbox :class:`AutoEncoder`: pixels (B, 3, H, W) in [0, 1]
    ↔ normalised latents (B, 16, H/4, W/4). The wrapping VAE's ``process_input``/``process_output`` are the
    identity, so this sees ComfyUI's [0, 1] images directly."""

    def __init__(self, autoencoder: AutoEncoder):
        super().__init__()
        self.autoencoder = autoencoder

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.encode(pixels)

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(latent)


class _DropMessage(logging.Filter):
    def __init__(self, fragment: str):
        super().__init__()
        self.fragment = fragment

    def filter(self, record: logging.LogRecord) -> bool:
        return self.fragment not in record.getMessage()


@contextmanager
def _quiet_root(fragment: str) -> Iterator[None]:
    """Drop root-logger records containing ``fragment`` (ComfyUI logs through the root logger)."""
    flt = _DropMessage(fragment)
    root = logging.getLogger()
    root.addFilter(flt)
    try:
        yield
    finally:
        root.removeFilter(flt)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def sandbox_vae(world) -> Any:
    """The sandbox autoencoder as a ComfyUI ``comfy.sd.VAE`` (VAE socket), fp32.

    ``VAEDecode`` turns (B, 16, 8, 8) latents into (B, 32, 32, 3) images in [0, 1] (= ``world.decode`` moved to
    channels-last); ``VAEEncode`` takes (B, H, W, 3) images (cropped to multiples of 4 pixels by ComfyUI).
    ``EmptySD3LatentImage(width=32, height=32)`` is the matching empty latent (see the module docstring).
    """
    import comfy.model_patcher
    import comfy.sd
    from comfy import model_management as mm

    cfg = world.cfg
    with _quiet_root("No VAE weights detected"):
        vae = comfy.sd.VAE(sd={})  # ComfyUI's defaults for every attribute; the model is set below
    stage = SandboxFirstStage(copy.deepcopy(world.autoencoder)).eval().requires_grad_(False).to(torch.float32)
    vae.first_stage_model = stage
    vae.latent_channels = cfg.latent_channels
    vae.downscale_ratio = vae.upscale_ratio = cfg.latent_down
    vae.process_input = vae.process_output = _identity
    vae.working_dtypes = [torch.float32]
    bytes_per_px = 4 * 4 * cfg.ae_width  # fp32 activations, a few feature maps of ae_width channels per pixel
    vae.memory_used_encode = lambda shape, dtype: shape[2] * shape[3] * bytes_per_px
    vae.memory_used_decode = lambda shape, dtype: shape[2] * shape[3] * cfg.latent_down ** 2 * bytes_per_px
    vae.device = mm.vae_device()
    vae.vae_dtype = torch.float32
    vae.output_device = mm.intermediate_device()
    mm.archive_model_dtypes(stage)
    vae.patcher = comfy.model_patcher.ModelPatcher(stage, load_device=vae.device,
                                                   offload_device=mm.vae_offload_device())
    vae.size = None
    vae.model_size()
    return vae


# --- all three -------------------------------------------------------------------------------------------------------
def load_sandbox_comfy(weights_dir: str | Path | None = None) -> tuple[Any, Any, Any]:
    """``(MODEL, CLIP, VAE)`` of the sandbox world in ``weights_dir`` (default: the shipped step-22,000 world)."""
    from ..sandbox.pipeline import SandboxWorld

    world = SandboxWorld.load(weights_dir)
    return load_sandbox_model(world, weights_dir=weights_dir), sandbox_clip(world), sandbox_vae(world)


def sandbox_model_patcher(weights_dir: str | None = None, dtype: torch.dtype = torch.float32,
                          disable_dynamic: bool = False) -> Any:
    """A fresh sandbox MODEL (the factory ComfyUI calls to deep-copy one)."""
    from ..sandbox.pipeline import SandboxWorld

    return load_sandbox_model(SandboxWorld.load(weights_dir), dtype, weights_dir)
