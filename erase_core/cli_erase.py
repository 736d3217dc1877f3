"""``erase`` and ``evaluate`` commands (sandbox world by default)."""
from __future__ import annotations

import copy
import json
import logging

log = logging.getLogger("erase_flux")


def run(args) -> int:
    from .sandbox.pipeline import SandboxWorld
    from .sandbox.world import concept as lookup

    world = SandboxWorld.load(args.weights).to(args.device)
    name = lookup(args.concept).name
    if args.command == "erase":
        return _erase(args, world, name)
    return _evaluate(args, world, name)


def _erase(args, world, name: str) -> int:
    from . import __version__
    from .lora import save_lora
    from .sandbox.erase_sets import sandbox_concept_set
    from .train import EraseConfig, erase

    if args.out.suffix != ".safetensors":
        raise ValueError(f"--out {args.out} must end in .safetensors")
    if args.out.exists() and not args.overwrite:
        raise FileExistsError(f"--out {args.out} exists; pass --overwrite to replace it")
    cs = sandbox_concept_set(name, seed=args.seed)
    meta = {"concept": name, "method": args.method, "synonyms": cs.synonyms, "irrelevant": cs.irrelevant,
            "preserve_prompts": cs.preserve_prompts, "base_model": "erase_flux sandbox",
            "base_geometry": world.cfg.to_dict(), "package_version": __version__}
    if args.method in ("uce", "realera"):
        return _closed_form(args, world, cs, meta)
    kw = {"method": args.method, "seed": args.seed}
    if args.steps:
        kw["steps"] = args.steps
    cfg = EraseConfig(**kw)
    result = erase(world, cs, cfg)
    meta.update(config=cfg.to_dict(), steps_done=len(result.history))
    save_lora(result.model, args.out, meta, overwrite=args.overwrite)
    print(json.dumps({"out": str(args.out), "final_losses": result.history[-1].losses,
                      "seconds": result.history[-1].seconds}))
    return 0


def _closed_form(args, world, cs, meta: dict) -> int:
    import time

    from .closed_form import ClosedFormConfig
    from .lora_file import model_fingerprint, model_geometry, write_lora_file
    from .train import EraseConfig

    t = time.time()
    meta.update(geometry=model_geometry(world.transformer), fingerprint=model_fingerprint(world.transformer),
                closed_form=vars(ClosedFormConfig()))
    if args.method == "uce":
        from .kv_edit import closed_form_erase

        lf = closed_form_erase(world, cs, seed=args.seed)
    else:
        from .realera import realera

        cfg = EraseConfig(method="realera", seed=args.seed, **({"steps": args.steps} if args.steps else {}))
        _, lf = realera(world, cs, cfg)
        meta.update(config=cfg.to_dict())
    lf.meta = {**meta, **{k: v for k, v in lf.meta.items() if k not in meta}}
    write_lora_file(lf, args.out, overwrite=args.overwrite)
    print(json.dumps({"out": str(args.out), "seconds": time.time() - t,
                      "ranks": sorted({m.rank for m in lf.modules.values()})}))
    return 0


def _evaluate(args, world, name: str) -> int:
    from .evaluate import evaluate_erasure
    from .lora import apply_lora

    model = None
    if args.lora is not None:
        model = apply_lora(copy.deepcopy(world.transformer), args.lora)
    metrics = evaluate_erasure(world, name, transformer=model, samples=args.samples)
    if args.json:
        print(json.dumps(metrics.to_dict(), indent=2))
    else:
        print(f"{name}: Acc_e {metrics.acc_e:.1f}  Acc_ir {metrics.acc_ir:.1f}  Acc_g {metrics.acc_g:.1f}  "
              f"H_o {metrics.h_o:.1f}")
    return 0
