"""The sandbox's small networks: text encoder (T5 and CLIP roles), autoencoder, classifier, and the Flux config."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn
import torch.nn.functional as F


@dataclass(frozen=True)
class SandboxConfig:
    """Geometry of the sandbox world's models. Serialised next to the weights."""

    image_size: int = 32
    latent_channels: int = 16  # Flux's VAE latent channels
    latent_down: int = 4  # pixels per latent cell
    max_tokens: int = 32  # T5 role: padded token sequence length
    vocab_size: int = 320
    text_dim: int = 128  # joint_attention_dim
    text_layers: int = 2
    pooled_dim: int = 64  # CLIP role: pooled_projection_dim
    hidden: int = 128  # transformer width: heads of 128 (ComfyUI detects Flux only for multiples of 128)
    double_blocks: int = 3
    single_blocks: int = 3
    ae_width: int = 48
    latent_shift: float = 0.0
    latent_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.hidden % 128:
            raise ValueError(f"hidden={self.hidden} must be a multiple of 128 (Flux head dim); use 128 or 256")
        if self.image_size % (2 * self.latent_down):
            raise ValueError(f"image_size={self.image_size} must be divisible by 2*latent_down={2 * self.latent_down}")

    @property
    def latent_size(self) -> int:
        return self.image_size // self.latent_down

    def transformer_kwargs(self) -> dict:
        """Arguments of diffusers' ``FluxTransformer2DModel`` for this geometry."""
        return dict(patch_size=1, in_channels=4 * self.latent_channels, num_layers=self.double_blocks,
                    num_single_layers=self.single_blocks, attention_head_dim=128, num_attention_heads=self.hidden // 128,
                    joint_attention_dim=self.text_dim, pooled_projection_dim=self.pooled_dim, guidance_embeds=False,
                    axes_dims_rope=(16, 56, 56))

    def to_dict(self) -> dict:
        return asdict(self)


class TextEncoder(nn.Module):
    """Token sequence (T5 role, ``(B, L, text_dim)``) and a pooled vector (CLIP role, ``(B, pooled_dim)``).

    Self-attention is restricted to the pieces of one word (a piece starting with ``▁`` or a special token starts a
    word), so sub-word pieces and misspellings merge into a word's meaning while a word's meaning stays in its own
    tokens, as the erasure methods assume of T5 (deleting a word's columns deletes the word). Context between
    words is left to the denoiser's joint attention, and the pooled vector summarises the whole prompt.
    """

    def __init__(self, cfg: SandboxConfig):
        super().__init__()
        self.register_buffer("word_start", torch.ones(cfg.vocab_size, dtype=torch.bool))
        self.embed = nn.Embedding(cfg.vocab_size, cfg.text_dim)
        self.pos = nn.Parameter(torch.zeros(cfg.max_tokens, cfg.text_dim))
        layer = nn.TransformerEncoderLayer(cfg.text_dim, nhead=4, dim_feedforward=2 * cfg.text_dim, dropout=0.0,
                                           batch_first=True, norm_first=True)
        self.layers = nn.TransformerEncoder(layer, cfg.text_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(cfg.text_dim)
        self.pool_embed = nn.Embedding(cfg.vocab_size, cfg.text_dim)
        self.pool_mlp = nn.Sequential(nn.Linear(cfg.text_dim, cfg.text_dim), nn.GELU(), nn.Linear(cfg.text_dim, cfg.pooled_dim))

    def set_vocabulary(self, pieces: list[str]) -> None:
        """Mark which vocabulary pieces start a word (``▁``-prefixed pieces and special tokens)."""
        starts = [p.startswith("▁") or (p.startswith("<") and p.endswith(">")) for p in pieces]
        self.word_start.copy_(torch.tensor(starts, dtype=torch.bool))

    def word_mask(self, ids: torch.Tensor) -> torch.Tensor:
        """(B·heads, L, L) additive mask: 0 within a word, -inf across words."""
        word = torch.cumsum(self.word_start[ids].long(), dim=1)  # (B, L) word index of each token
        same = word[:, :, None] == word[:, None, :]
        mask = torch.zeros(same.shape, dtype=self.pos.dtype, device=ids.device).masked_fill(~same, float("-inf"))
        return mask.repeat_interleave(self.layers.layers[0].self_attn.num_heads, dim=0)

    def sequence(self, ids: torch.Tensor) -> torch.Tensor:
        return self.norm(self.layers(self.embed(ids) + self.pos[: ids.shape[1]], mask=self.word_mask(ids)))

    def pooled(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids > 1).float().unsqueeze(-1)  # bag of real tokens (no pad/eos)
        bag = (self.pool_embed(ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        return self.pool_mlp(bag)

    def forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.sequence(ids), self.pooled(ids)


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU(),
                         nn.Conv2d(cout, cout, 3, padding=1), nn.GroupNorm(8, cout), nn.SiLU())


class AutoEncoder(nn.Module):
    """Pixels (B, 3, 32, 32) in [0, 1] ↔ a smooth latent (B, 16, 8, 8), normalised like Flux's VAE (shift, scale)."""

    def __init__(self, cfg: SandboxConfig):
        super().__init__()
        w, c = cfg.ae_width, cfg.latent_channels
        self.enc = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.SiLU(), nn.Conv2d(32, w, 4, stride=2, padding=1),
                                 _block(w, w), nn.Conv2d(w, w, 4, stride=2, padding=1), _block(w, w), nn.Conv2d(w, c, 1))
        self.dec = nn.Sequential(nn.Conv2d(c, w, 1), _block(w, w), nn.Upsample(scale_factor=2), _block(w, w),
                                 nn.Upsample(scale_factor=2), nn.Conv2d(w, 32, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(32, 3, 3, padding=1))
        self.shift, self.scale = cfg.latent_shift, cfg.latent_scale

    def encode_raw(self, img: torch.Tensor) -> torch.Tensor:
        return self.enc(img * 2 - 1)

    def decode_raw(self, z: torch.Tensor) -> torch.Tensor:
        return (self.dec(z) + 1) / 2

    def encode(self, img: torch.Tensor) -> torch.Tensor:
        """Normalised latent: ``(z - shift) * scale``, as diffusers' Flux pipelines use ``shift_factor``/``scaling_factor``."""
        return (self.encode_raw(img) - self.shift) * self.scale

    def decode(self, latent: torch.Tensor) -> torch.Tensor:
        return self.decode_raw(latent / self.scale + self.shift).clamp(0.0, 1.0)


class Classifier(nn.Module):
    """One head per world axis (shape, colour, placement) over a 32×32 image."""

    def __init__(self, n_classes: dict[str, int], width: int = 32):
        super().__init__()
        self.body = nn.Sequential(_block(3, width), nn.MaxPool2d(2), _block(width, 2 * width), nn.MaxPool2d(2),
                                  _block(2 * width, 2 * width))
        self.heads = nn.ModuleDict({axis: nn.Linear(2 * width * 8 * 8 // 16, n) for axis, n in n_classes.items()})
        self.pool = nn.AdaptiveAvgPool2d(2)

    def forward(self, img: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.pool(self.body(img * 2 - 1)).flatten(1)
        return {axis: head(h) for axis, head in self.heads.items()}


def blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    """Gaussian blur of (B, C, H, W) images (augmentation so the classifier judges generated images fairly)."""
    if sigma <= 0:
        return img
    radius = max(1, int(2 * sigma + 0.5))
    x = torch.arange(-radius, radius + 1, dtype=img.dtype)
    k = torch.exp(-(x * x) / (2 * sigma * sigma))
    k = k / k.sum()
    c = img.shape[1]
    img = F.conv2d(F.pad(img, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(F.pad(img, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)
