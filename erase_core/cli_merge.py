"""``merge`` command: many erase-LoRAs into one, with an interference report."""
from __future__ import annotations

import json
import logging

import torch

log = logging.getLogger("erase_flux")


def lora_concepts(loras) -> list[str]:
    """The sandbox concept each LoRA erases, from its metadata."""
    from .merge import lora_concepts as words
    from .sandbox.world import concept as lookup

    return [lookup(w).name for w in words(loras, "closed_form/distill")]


def kept_concepts(names: list[str], preserve: list[str] | None) -> list[str]:
    """The concepts a merge keeps: ``preserve``, or every sandbox concept not being merged."""
    from .sandbox.world import CONCEPTS, concept as lookup

    return [lookup(p).name for p in preserve] if preserve else [c for c in CONCEPTS if c not in names]


def closed_form_inputs(world, loras, preserve: list[str] | None):
    """Sandbox inputs of every target module: each LoRA's concept, and the preserved concepts."""
    from .sandbox.erase_sets import module_inputs

    names = lora_concepts(loras)
    modules = sorted(loras[0].modules)
    concept_inputs = [module_inputs(world, n, modules) for n in names]
    keep = kept_concepts(names, preserve)
    preserve_inputs = None
    if keep:
        per = [module_inputs(world, n, modules) for n in keep]
        preserve_inputs = {m: torch.cat([p[m] for p in per]) for m in modules}
    return concept_inputs, preserve_inputs


def distill_prompts(loras, preserve: list[str] | None) -> tuple[list[list[str]], list[str]]:
    """Sandbox prompts of the distilled merge: per LoRA, the plain prompt of its concept under every alias; the
    same for every kept concept, and the empty prompt (the sampler's unconditional branch). Kept concepts are kept
    under every name because erased and kept names share tokens (``topright`` is ``top`` + ``right``): trained on
    ``a shape in the north`` alone, the merge learnt to erase ``top`` with ``topright`` (bench/merge_table.py)."""
    from .sandbox.prompts import concept_prompt
    from .sandbox.world import CONCEPTS

    names = lora_concepts(loras)
    prompts = [[concept_prompt(a, CONCEPTS[n].axis) for a in CONCEPTS[n].aliases] for n in names]
    keep = [concept_prompt(a, CONCEPTS[c].axis) for c in kept_concepts(names, preserve) for a in CONCEPTS[c].aliases]
    return prompts, [*keep, ""]


def survival(loras, merged, samples: int, world_dir=None) -> dict:
    """Sandbox only: per LoRA's concept, the share of its single-LoRA erasure that survives the merge,
    (base − merged) / (base − single), from the classifier on ``samples`` images of the concept's plain prompt."""
    import copy

    from .evaluate import found_rate
    from .lora import apply_lora
    from .sandbox.pipeline import SandboxWorld
    from .sandbox.prompts import concept_prompt
    from .sandbox.world import CONCEPTS, concept as lookup

    world = SandboxWorld.load(world_dir)
    merged_model = apply_lora(copy.deepcopy(world.transformer), merged)
    out = {}
    for lf in loras:
        name = lookup(str(lf.meta.get("concept"))).name
        prompt = concept_prompt(name, CONCEPTS[name].axis)
        base = found_rate(world, prompt, name, samples, seed=4242)
        single = found_rate(world, prompt, name, samples, seed=4242,
                            transformer=apply_lora(copy.deepcopy(world.transformer), lf))
        after = found_rate(world, prompt, name, samples, seed=4242, transformer=merged_model)
        out[name] = {"base": base, "single": single, "merged": after,
                     "share_kept": (base - after) / (base - single) if base > single else None}
    return out


def run(args) -> int:
    from . import render
    from .io import atomic_write_text
    from .lora_file import read_lora_file, write_lora_file
    from .merge import MergeConfig, interference, interference_summary, merge
    from .merge_distill import DistillConfig, distill_merge

    if args.out.suffix != ".safetensors":
        raise ValueError(f"--out {args.out} must end in .safetensors")
    if args.out.exists() and not args.overwrite:
        raise FileExistsError(f"--out {args.out} exists; pass --overwrite to replace it")
    cfg = MergeConfig(mode=args.mode, weights=tuple(args.weights) if args.weights else None, rank=args.rank,
                      preserve_weight=args.preserve_weight)
    loras = [read_lora_file(p) for p in args.loras]
    names = [p.stem for p in args.loras]
    given = {"steps": args.distill_steps, "batch": args.distill_batch, "images": args.distill_images,
             "preserve_images": 4 * args.distill_images if args.distill_images else None,
             "balance": args.distill_balance, "guided_targets": args.distill_guided, "noisings": args.distill_noisings}
    dcfg = DistillConfig(**{k: v for k, v in given.items() if v is not None})
    concept_inputs = preserve_inputs = None
    if cfg.mode in ("closed_form", "distill"):
        from .sandbox.pipeline import SandboxWorld

        world = SandboxWorld.load(args.world)
        concept_inputs, preserve_inputs = closed_form_inputs(world, loras, args.preserve)
    if cfg.mode == "distill":
        prompts, keep = distill_prompts(loras, args.preserve)
        every = max(1, dcfg.steps // 10)
        merged, _ = distill_merge(world, loras, cfg, prompts, keep, concept_inputs, preserve_inputs, dcfg, names,
                                  progress=lambda step, losses: step % every or log.info(
                                      "distill step %d/%d: %s", step, dcfg.steps,
                                      ", ".join(f"{k} {v:.4f}" for k, v in losses.items() if k != "step")))
    else:
        merged = merge(loras, cfg, concept_inputs, preserve_inputs, names=names)
    write_lora_file(merged, args.out, overwrite=args.overwrite)
    cos = interference(loras)
    report = {"out": str(args.out), "mode": cfg.mode, "weights": merged.meta["merge"]["weights"],
              "ranks": sorted({m.rank for m in merged.modules.values()}), "interference": interference_summary(cos)}
    if args.evaluate:
        report["survival"] = survival(loras, merged, args.evaluate, args.world)
    if args.report:
        mean = torch.stack([c.abs() for c in cos.values()]).mean(0)
        report["pairwise_mean_abs_cos"] = {"names": names, "matrix": mean.tolist()}
        atomic_write_text(args.report.with_suffix(".json"), json.dumps(report, indent=2))
        render.matrix_image(mean, names, "mean |cos| of the LoRA deltas").save(args.report.with_suffix(".png"))
    print(json.dumps(report, indent=2))
    return 0
