"""``merge`` command: many erase-LoRAs into one, with an interference report."""
from __future__ import annotations

import json
import logging

import torch

log = logging.getLogger("erase_flux")


def closed_form_inputs(world, loras, preserve: list[str] | None):
    """Sandbox inputs of every target module: each LoRA's concept, and the preserved concepts."""
    from .sandbox.erase_sets import module_inputs
    from .sandbox.world import CONCEPTS, concept as lookup

    names = []
    for i, lf in enumerate(loras):
        c = lf.meta.get("concept")
        if not isinstance(c, str):
            raise ValueError(f"LoRA {i + 1} has no concept in its metadata; closed_form needs to know what each "
                             "LoRA erases (use another mode, or LoRAs made by `erase`)")
        names.append(lookup(c).name)
    modules = sorted(loras[0].modules)
    concept_inputs = [module_inputs(world, n, modules) for n in names]
    keep = [lookup(p).name for p in preserve] if preserve else [c for c in CONCEPTS if c not in names]
    preserve_inputs = None
    if keep:
        per = [module_inputs(world, n, modules) for n in keep]
        preserve_inputs = {m: torch.cat([p[m] for p in per]) for m in modules}
    return concept_inputs, preserve_inputs


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

    if args.out.suffix != ".safetensors":
        raise ValueError(f"--out {args.out} must end in .safetensors")
    if args.out.exists() and not args.overwrite:
        raise FileExistsError(f"--out {args.out} exists; pass --overwrite to replace it")
    cfg = MergeConfig(mode=args.mode, weights=tuple(args.weights) if args.weights else None, rank=args.rank,
                      preserve_weight=args.preserve_weight)
    loras = [read_lora_file(p) for p in args.loras]
    names = [p.stem for p in args.loras]
    concept_inputs = preserve_inputs = None
    if cfg.mode == "closed_form":
        from .sandbox.pipeline import SandboxWorld

        concept_inputs, preserve_inputs = closed_form_inputs(SandboxWorld.load(args.world), loras, args.preserve)
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
