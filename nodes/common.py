"""Shared glue: ComfyUI ↔ engine type conversions, the pack's LoRA folder, progress reporting. ComfyUI imports stay
inside functions, so this module imports anywhere (the node-glue unit tests run without ComfyUI)."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from PIL import Image

PACK = "erase_flux"  # sub-folder of models/loras that holds this pack's LoRAs
CATEGORY = "Erase Flux"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,95}$")


def pil_to_image(img: Image.Image) -> torch.Tensor:
    """A PIL image → ComfyUI IMAGE (1, H, W, 3) float in [0, 1]."""
    return torch.from_numpy(np.asarray(img.convert("RGB"), dtype=np.float32) / 255.0)[None]


def chw_to_image(x: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) in [0, 1] → ComfyUI IMAGE (B, H, W, 3)."""
    return x.detach().float().cpu().clamp(0, 1).movedim(1, -1).contiguous()


def check_name(name: str, field: str = "lora_name") -> str:
    """A safe file stem (no folders, no odd characters); the error names the field, the value and the fix."""
    stem = name.strip()
    if stem.endswith(".safetensors"):
        stem = stem[: -len(".safetensors")]
    if not NAME_RE.match(stem):
        raise ValueError(f"{field}={name!r} is not a usable file name: use letters, digits, '_', '-', '.' "
                         "(no folders), e.g. 'erase_red'")
    return stem


def latent_hw(width: int, height: int, vae=None, model=None) -> tuple[int, int]:
    """Latent size of a width×height image: the VAE's downscale ratio, else the MODEL's latent format's (Flux's ae:
    8; the sandbox: 4), else 8."""
    ratio = getattr(vae, "downscale_ratio", None)
    if not isinstance(ratio, int) and model is not None:
        ratio = getattr(getattr(model.model, "latent_format", None), "spacial_downscale_ratio", None)
    ratio = ratio if isinstance(ratio, int) and ratio > 0 else 8
    h, w = height // ratio, width // ratio
    if h < 2 or w < 2 or h % 2 or w % 2:
        raise ValueError(f"width×height = {width}×{height} gives a {w}×{h} latent with this VAE (÷{ratio}); choose "
                         f"sizes that are multiples of {2 * ratio}")
    return h, w


def loras_dir() -> Path:
    """models/loras/erase_flux (created on demand): saved LoRAs appear in every stock LoRA loader's list."""
    import folder_paths

    return Path(folder_paths.get_folder_paths("loras")[0]) / PACK


def checkpoints_dir() -> Path:
    """output/erase_flux/checkpoints: where a cancelled training keeps its resumable state (not in models/loras,
    whose loaders would list the .pt files as LoRAs)."""
    import folder_paths

    return Path(folder_paths.get_output_directory()) / PACK / "checkpoints"


def lora_choices() -> list[str]:
    import folder_paths

    return [n for n in folder_paths.get_filename_list("loras") if n.endswith(".safetensors")]


def lora_path(name: str) -> Path:
    import folder_paths

    path = folder_paths.get_full_path("loras", name)
    if path is None:
        raise ValueError(f"LoRA {name!r} is not in models/loras; pick one from the list (refresh after saving)")
    return Path(path)


def apply_lora(model, path: Path, strength: float = 1.0):
    """Apply a LoRA file to a MODEL exactly as the stock LoraLoaderModelOnly does."""
    import comfy.sd
    import comfy.utils

    sd = comfy.utils.load_torch_file(str(path), safe_load=True)
    patched, _ = comfy.sd.load_lora_for_models(model, None, sd, strength, 0.0)
    return patched


class Progress:
    """ComfyUI's progress bar with an optional preview image, and its Cancel button as ``should_stop``."""

    def __init__(self, total: int):
        import comfy.utils

        self.total = total
        self.bar = comfy.utils.ProgressBar(total)

    def update(self, value: int, preview: Image.Image | None = None) -> None:
        self.bar.update_absolute(value, self.total, ("PNG", preview, 512) if preview is not None else None)

    @staticmethod
    def should_stop() -> bool:
        import comfy.model_management

        return comfy.model_management.processing_interrupted()
