"""The engine jobs behind the ComfyUI nodes, on ComfyUI's objects: inspection, erase training, neighbour preview.

Each takes a :class:`~erase_core.comfy.world.ComfyWorld` and returns plain results (tensors, PIL images, LoRA files);
the node classes in ``nodes/`` only convert types, report progress and save files.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image

from .. import render
from ..concepts import ConceptSet, build_concept_set
from ..flux.backend import TextCond
from ..inspect import Inspection, inspection_grid, resolve_selection
from ..lora_file import LoraFile, fingerprint, write_lora_file
from ..neighbours import NeighbourConfig, mine
from ..train import EraseConfig, Eraser, EraseResult, StepLog
from .world import ComfyWorld

log = logging.getLogger("erase_flux.comfy")

# Offline irrelevant-concept candidates for WordNet banding when the user gives none (App. C: no_relation/far/mid)
CANDIDATES = ("tree", "car", "mountain", "cup", "bicycle", "river", "book", "dog", "chair", "cloud", "guitar",
              "bridge", "apple", "clock", "ship", "flower", "house", "lamp", "bird", "road")


def split_list(text: str) -> list[str]:
    """Comma- or newline-separated items, stripped, empty ones dropped."""
    return [s.strip() for part in text.replace("\n", ",").split(",") for s in [part] if s.strip()]


# --- inspection -------------------------------------------------------------------------------------------------
def inspect(world: ComfyWorld, prompt: str, word: str, blocks: Sequence[str] | None = None,
            steps: Sequence[int] | None = None, seed: int = 0, sample_steps: int | None = None,
            suppress: float | None = None, transformer=None) -> Inspection:
    """Generate one image of ``prompt`` while capturing the maps of ``word``'s tokens (every dual block by default)."""
    idx = world.token_indices(prompt, word)
    backend = world.backend(transformer)
    h, w = world.latent_hw
    with backend.attention_patch(idx, blocks=list(blocks) if blocks else None, suppress=suppress,
                                 grid=(h // 2, w // 2)) as patch:
        latents = world.sample_latents([prompt], seed=seed, steps=sample_steps, transformer=transformer, patch=patch)
    images = world.decode(latents) if world.vae is not None else _grey(latents.shape[0], h * 8, w * 8)
    cap = patch.result
    tokens = [f"#{i}" for i in idx]
    return Inspection(prompt, word, tokens, idx, images, cap, cap.blocks(), resolve_selection(cap.steps(), steps, "step"))


def _grey(n: int, height: int, width: int) -> torch.Tensor:
    return torch.full((n, 3, height, width), 0.5)


def inspection_outputs(ins: Inspection) -> tuple[Image.Image, torch.Tensor, float]:
    """The overlay grid, the word's mask at image size in [0, 1], and the attention mass."""
    grid = inspection_grid(ins, scale=max(1, 256 // ins.images.shape[-1]))
    m = ins.word_map()[0]
    mask = render.upsample(m / m.max().clamp(min=1e-12), tuple(ins.images.shape[-2:]))
    return grid, mask, ins.mass()


def stack_vertically(images: list[Image.Image]) -> Image.Image:
    w = max(i.width for i in images)
    out = Image.new("RGB", (w, sum(i.height for i in images)), "white")
    y = 0
    for im in images:
        out.paste(im, (0, y))
        y += im.height
    return out


# --- erase training ---------------------------------------------------------------------------------------------
@dataclass
class EraseJob:
    concept: ConceptSet
    config: EraseConfig
    result: EraseResult
    lora: LoraFile


def concept_set(word: str, prompts: list[str], synonyms: str = "auto", irrelevant: str = "auto",
                preserve: list[str] | None = None, seed: int = 0) -> ConceptSet:
    """The concept set from the node's text fields; "auto" = offline WordNet (synonyms; irrelevant in three bands);
    no preserve prompts = the irrelevant concepts in the concept's own prompts."""
    word = word.strip()
    if not word:
        raise ValueError("concept is empty: type the word to erase, e.g. 'red'")
    prompts = prompts or default_prompts(word)
    syn = None if synonyms.strip().lower() == "auto" else split_list(synonyms)
    irr = None if irrelevant.strip().lower() == "auto" else split_list(irrelevant)
    return build_concept_set(word, prompts, syn, irr, preserve or None, candidates=list(CANDIDATES), seed=seed)


def comfy_geometry(model) -> dict:
    """The LoRA-relevant geometry of a ComfyUI Flux, under diffusers' config names (as the engine writes them)."""
    dm = model.model.diffusion_model
    p = dm.params
    return {"num_layers": len(dm.double_blocks), "num_single_layers": len(dm.single_blocks),
            "attention_head_dim": p.hidden_size // p.num_heads, "num_attention_heads": p.num_heads,
            "joint_attention_dim": p.context_in_dim, "pooled_projection_dim": p.vec_in_dim,
            "in_channels": p.in_channels * 4, "guidance_embeds": bool(p.guidance_embed)}


def erase(world: ComfyWorld, concept: ConceptSet, config: EraseConfig,
          progress: Callable[[StepLog], None] | None = None, should_stop: Callable[[], bool] | None = None,
          checkpoint_path: Path | None = None, resume: bool = False, method: str | None = None) -> EraseJob:
    """Make an erase-LoRA for the world's MODEL (the base stays untouched): ``method`` (default ``config.method``)
    is a trained method (EraseAnything, +neighbours, ESD, CA), ``realera`` (closed form with neighbours, then noise
    alignment) or ``uce`` (the closed form alone, no training; ``config`` then only gives the seed)."""
    from ..closed_form import ClosedFormConfig
    from ..kv_edit import closed_form_erase
    from ..neighbours import NeighbourConfig
    from ..realera import realera

    train_kw = dict(progress=progress, should_stop=should_stop, checkpoint_path=checkpoint_path,
                    resume=resume and checkpoint_path is not None and Path(checkpoint_path).exists())
    extra: dict = {}
    method = method or config.method
    if method == "uce":
        modules = closed_form_erase(world, concept, ClosedFormConfig(), seed=config.seed).modules
        result = EraseResult(world.transformer, config, concept)
        extra["closed_form"] = vars(ClosedFormConfig())
    elif method == "realera":
        result, lf = realera(world, concept, config, **train_kw)
        modules = lf.modules
        extra["closed_form"], extra["neighbours"] = vars(ClosedFormConfig()), vars(NeighbourConfig())
    else:
        eraser = Eraser(world, concept, config)
        result = eraser.train(**train_kw)
        modules = eraser.backend.trained_modules()
    dm = world.transformer.model.diffusion_model
    meta = {"concept": concept.word, "method": method, "config": config.to_dict(), **extra,
            "synonyms": list(concept.synonyms), "irrelevant": list(concept.irrelevant),
            "trained_in": "comfyui", "geometry": comfy_geometry(world.transformer),
            "fingerprint": fingerprint(dm.img_in.weight, dm.txt_in.weight)}
    return EraseJob(concept, config, result, LoraFile(modules, meta))


def default_prompts(word: str) -> list[str]:
    """The prompts used when none are given: the word alone and in two plain sentences."""
    return [f"a photo of {word}", f"{word}", f"an image of {word}"]


def closed_form_merge_inputs(world: ComfyWorld, loras: list[LoraFile], preserve: list[str]):
    """The closed-form merge's inputs on ComfyUI's MODEL: each LoRA's concept (from its metadata) and the words to
    preserve, as the rows every target module sees at those words' tokens."""
    from ..kv_edit import word_module_inputs
    from ..merge import lora_concepts

    names = lora_concepts(loras, "closed_form")
    modules = sorted(loras[0].modules)
    concept_inputs = [word_module_inputs(world, w, default_prompts(w), modules) for w in names]
    preserve_inputs = None
    if preserve:
        per = [word_module_inputs(world, w, default_prompts(w), modules) for w in preserve]
        preserve_inputs = {m: torch.cat([p[m] for p in per]) for m in modules}
    return concept_inputs, preserve_inputs


def distill_merge_prompts(loras: list[LoraFile], preserve: list[str]) -> tuple[list[list[str]], list[str]]:
    """The distilled merge's prompts on ComfyUI: per LoRA, the default prompts of its concept and of the synonyms
    in its metadata; the preserved words' default prompts and the empty prompt (the sampler's other branch)."""
    from ..merge import lora_concepts

    prompts = []
    for c, lf in zip(lora_concepts(loras, "distill"), loras):
        words = [c, *[w for w in lf.meta.get("synonyms") or [] if isinstance(w, str) and w.strip()]]
        prompts.append([p for w in words for p in default_prompts(w)])
    return prompts, [p for w in preserve for p in default_prompts(w)] + [""]


def loss_curve(history: list[StepLog]) -> Image.Image:
    series: dict[str, list[tuple[float, float]]] = {}
    for entry in history:
        for k, v in entry.losses.items():
            series.setdefault(k, []).append((entry.step, v))
    return render.line_plot(series or {"(no steps)": [(0, 0.0)]}, "erase losses per outer step", "step", "loss")


def save_lora(lora: LoraFile, path: Path, overwrite: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_lora_file(lora, path, overwrite=overwrite)


# --- neighbours -------------------------------------------------------------------------------------------------
@torch.no_grad()
def neighbour_grid(world: ComfyWorld, prompt: str, word: str, cfg: NeighbourConfig, seed: int = 0,
                   erased=None, sample_steps: int | None = None) -> Image.Image:
    """One image per mined sample (the concept itself, M neighbours, N beyond-concept), base model and, if given, the
    erased model beside it, labelled with the distance ‖η‖/‖e‖ and the cosine to the concept."""
    text = world.encode([prompt])
    idx = world.token_indices(prompt, word)
    e = text.sequence[0, idx]
    near, far = mine(e, cfg)
    variants = [("concept", e)] + [("near", s) for s in near] + [("beyond", s) for s in far]
    tiles, labels = [], []
    flat = e.flatten()
    for kind, emb in variants:
        seq = text.sequence.clone()
        seq[0, idx] = emb
        cond = TextCond(seq, text.pooled)
        for model in (None, erased) if erased is not None else (None,):
            img = world.decode(world.sample_latents([prompt], seed=seed, text=cond, transformer=model,
                                                    steps=sample_steps))
            tiles.append(render.to_pil(img[0], max(1, 128 // img.shape[-1])))
        d = ((emb.flatten() - flat).norm() / flat.norm()).item()
        cos = torch.nn.functional.cosine_similarity(emb.flatten(), flat, dim=0).item()
        labels.append(f"{kind} d{d:.2f} cos{cos:.2f}")
    cols = 2 if erased is not None else 1
    title = f"'{word}' in '{prompt}': " + ("base | erased" if erased is not None else "base") + " per row"
    return render.grid(tiles, cols=cols, row_labels=labels, title=title)
