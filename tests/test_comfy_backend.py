"""The engine on ComfyUI's native Flux: attention maps, suppression and erase-LoRA training agree with the diffusers
backend (the same sandbox weights loaded both ways), and the trained LoRA is what the stock loader applies.

Skipped unless ``ERASE_FLUX_COMFYUI`` names a ComfyUI checkout; run with ComfyUI's venv python::

    ERASE_FLUX_COMFYUI=/work/comfy/ComfyUI /work/comfy/venv/bin/python -m pytest -q tests/test_comfy_backend.py

As in test_comfy_sandbox.py, ComfyUI runs in a child process (this file as a script) that writes its measurements.
"""
from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = "ERASE_FLUX_COMFYUI"
SKIP_EXIT = 3

MAP_ATOL = 1e-5  # captured probabilities, ComfyUI vs diffusers, same inputs, fp32
VELOCITY_ATOL = 1e-4  # velocities (magnitude ~10) of the same model through both backends
PROMPTS = ["a red circle in the west", "a crimson disc", "a blue square", "red red circle"]


def _child(comfy_dir: str, out_path: str) -> int:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_comfy_sandbox import _import_comfy

    try:
        _import_comfy(comfy_dir)
    except ImportError as err:
        print(f"cannot import ComfyUI from {comfy_dir} with {sys.executable}: {err}", file=sys.stderr)
        return SKIP_EXIT
    import torch

    torch.set_num_threads(1)
    import comfy.sd
    import comfy.utils

    from erase_core.comfy.sandbox import load_sandbox_comfy
    from erase_core.comfy.world import ComfyWorld
    from erase_core.flux.attention import AttentionPatch
    from erase_core.flux.backend import DiffusersFlux
    from erase_core.flux.comfy import ComfyFlux, suppressed_model
    from erase_core.lora import apply_lora
    from erase_core.lora_file import write_lora_file
    from erase_core.sandbox.erase_sets import sandbox_concept_set
    from erase_core.sandbox.pipeline import SandboxWorld
    from erase_core.train import EraseConfig, Eraser

    sw = SandboxWorld.load()
    model, clip, vae = load_sandbox_comfy()
    world = ComfyWorld(model, clip, (8, 8), vae=vae, cfg_scale=3.0)
    x, t = sw.noise(len(PROMPTS), 3), torch.tensor([0.9, 0.6, 0.3, 0.1])
    text = sw.encode(PROMPTS)
    idx = [sw.token_indices(p, w) for p, w in zip(PROMPTS, ["red", "crimson", "square", "red"])]
    blocks = ["double.0", "double.2", "single.1"]
    out: dict = {}
    with torch.no_grad():
        with AttentionPatch(sw.transformer, idx, blocks=blocks) as dp:
            DiffusersFlux(sw.transformer, (8, 8)).velocity(x, t, text)
        backend = ComfyFlux(model, (8, 8))
        with backend.attention_patch(idx, blocks=blocks) as cp:
            backend.velocity(x, t, text)
        out["maps"] = {b: (dp.result.maps[(b, 0)] - cp.result.maps[(b, 0)]).abs().max().item() for b in blocks}
        out["map_scale"] = max(m.max().item() for m in dp.result.maps.values())
        out["tokens_equal"] = [world.token_indices(p, w) == i for p, w, i in
                               zip(PROMPTS, ["red", "crimson", "square", "red"], idx)]
        with AttentionPatch(sw.transformer, idx, capture=False, suppress=0.0, blocks=[],
                            suppress_blocks=["double.0", "double.1", "double.2"]):
            v_sup_d = DiffusersFlux(sw.transformer, (8, 8)).velocity(x, t, text)
        v_sup_c = ComfyFlux(suppressed_model(model, idx[0], 0.0, ["double.0", "double.1", "double.2"]),
                            (8, 8)).velocity(x[:1], t[:1], text.select([0]))
        v_base_c = backend.velocity(x[:1], t[:1], text.select([0]))
        out["suppression_diff"] = (v_sup_d[:1] - v_sup_c).abs().max().item()
        out["suppression_effect"] = (v_sup_c - v_base_c).abs().max().item()

    cfg = EraseConfig(steps=2, batch=4, base_samples=4, preserve_images=1)
    base_state = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    with torch.enable_grad():
        er = Eraser(world, sandbox_concept_set("red"), cfg)
        er.train()
    clone_dm = er.model.model.diffusion_model
    with torch.no_grad():
        out["base_untouched"] = all(torch.equal(v, model.model.diffusion_model.state_dict()[k])
                                    for k, v in base_state.items())
        out["clone_base_weights_unchanged"] = all(torch.equal(v, clone_dm.state_dict()[k])
                                                  for k, v in base_state.items())
        out["lora_changed"] = max(p.abs().max().item() for n, p in er.backend.lora_parameters().items()
                                  if ".up." in n)
        v_student = er.backend.velocity(x, t, text)
        with er.backend.teacher():
            v_teacher = er.backend.velocity(x, t, text)
        v_base = ComfyFlux(model, (8, 8)).velocity(x, t, text)
        out["teacher_is_base"] = (v_teacher - v_base).abs().max().item()
        out["lora_effect"] = (v_student - v_base).abs().max().item()
        path = Path(out_path).with_name("lora.safetensors")
        from erase_core.lora_file import LoraFile

        write_lora_file(LoraFile(er.backend.trained_modules(), {"concept": "red"}), path, overwrite=True)
        tr = copy.deepcopy(sw.transformer)
        apply_lora(tr, path)
        out["export_vs_diffusers"] = (DiffusersFlux(tr, (8, 8)).velocity(x, t, text) - v_student).abs().max().item()
        stock, _ = comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(str(path), safe_load=True),
                                                 1.0, 0.0)
        out["export_vs_stock_loader"] = (ComfyFlux(stock, (8, 8)).velocity(x, t, text) - v_student).abs().max().item()
        from erase_core.flux.deltas import added_deltas, folded_factors
        from erase_core.lora_file import read_lora_file

        exported = read_lora_file(path)
        with added_deltas(ComfyFlux(model, (8, 8)), folded_factors(exported)):  # the distilled merge's teachers
            v_hooked = ComfyFlux(model, (8, 8)).velocity(x, t, text)
        out["hooked_vs_stock_loader"] = (v_hooked - v_student).abs().max().item()
        out["hooks_removed"] = (ComfyFlux(model, (8, 8)).velocity(x, t, text) - v_base).abs().max().item()
    out["distill"] = _distill(world, model, exported)
    out["dev"] = _tiny_dev(comfy_dir, Path(out_path).with_name("dev_lora.safetensors"))
    out["dtypes"] = _low_precision(sw, clip)
    Path(out_path).write_text(json.dumps(out, indent=1))
    return 0


def _distill(world, model, lora) -> dict:
    """A few distilled-merge steps on ComfyUI's MODEL, loaded under inference mode as a server loads it: the student
    trains through a trainable copy, the teachers run on the MODEL itself, which stays untouched."""
    import torch

    from erase_core.lora_file import LoraFile, LoraModule
    from erase_core.merge_distill import DistillConfig, distill
    from erase_core.train import trainable_copy

    base_state = {k: v.clone() for k, v in model.model.diffusion_model.state_dict().items()}
    init = LoraFile({k: LoraModule(m.down, 0.5 * m.up, m.alpha) for k, m in lora.modules.items()})  # half of it
    cfg = DistillConfig(steps=30, lr=1e-2, batch=2, images=2, preserve_images=2, sample_steps=2)
    with torch.inference_mode(False), torch.enable_grad():
        merged, history = distill(world, [lora], init, [["a red circle"]], ["a blue square", ""], cfg,
                                  transformer=trainable_copy(model))
    return {"first": sum(h["teachers"] for h in history[:5]) / 5, "last": sum(h["teachers"] for h in history[-5:]) / 5,
            "moved": max((merged.modules[k].delta() - init.modules[k].delta()).abs().max().item() for k in init.modules),
            "base_untouched": all(torch.equal(v, model.model.diffusion_model.state_dict()[k])
                                  for k, v in base_state.items())}


def _low_precision(sw, clip) -> dict:
    """Base weights stored in bf16 / fp8 (as ComfyUI loads big Flux checkpoints), LoRA in fp32: a few EraseAnything
    steps train, and the velocity stays close to the fp32 model's."""
    import torch

    from erase_core.comfy.sandbox import load_sandbox_model
    from erase_core.comfy.world import ComfyWorld
    from erase_core.flux.comfy import ComfyFlux
    from erase_core.sandbox.erase_sets import sandbox_concept_set
    from erase_core.train import EraseConfig, Eraser

    x, t, text = sw.noise(2, 5), torch.tensor([0.8, 0.4]), sw.encode(["a red circle", "a blue square"])
    with torch.no_grad():
        ref = ComfyFlux(load_sandbox_model(sw), (8, 8)).velocity(x, t, text)
    out = {}
    for name, dtype in (("bf16", torch.bfloat16), ("fp8_e4m3fn", torch.float8_e4m3fn)):
        model = load_sandbox_model(sw, dtype)
        world = ComfyWorld(model, clip, (8, 8), cfg_scale=3.0, sample_steps=4)
        with torch.no_grad():
            v = ComfyFlux(model, (8, 8)).velocity(x, t, text)
        with torch.inference_mode(False), torch.enable_grad():
            er = Eraser(world, sandbox_concept_set("red"), EraseConfig(steps=2, batch=2, base_samples=2,
                                                                         preserve_images=1))
            res = er.train()
        out[name] = {"weight_dtype": str(next(model.model.diffusion_model.parameters()).dtype),
                     "lora_dtypes": sorted({str(p.dtype) for p in er.params}),
                     "rel_velocity_error": ((v - ref).norm() / ref.norm()).item(),
                     "finite": all(all(map(lambda z: z == z, e.losses.values())) for e in res.history),
                     "lora_moved": max(p.abs().max().item() for n, p in er.backend.lora_parameters().items()
                                       if ".up." in n)}
    return out


def _tiny_dev(comfy_dir: str, lora_path: Path) -> dict:
    """Flux-dev geometry in miniature (guidance embedding, T5 width 4096, CLIP pooled 768; random weights, made by the
    kit's make_tiny_models.py): the backend's guidance path, capture, LoRA training step and export."""
    import torch
    import comfy.sd
    import comfy.utils

    from erase_core.flux.backend import TextCond
    from erase_core.flux.comfy import ComfyFlux
    from erase_core.lora_file import LoraFile, write_lora_file

    path = Path(comfy_dir) / "models" / "diffusion_models" / "tiny_flux.safetensors"
    if not path.exists():
        return {"skipped": f"{path} is missing (the ComfyUI kit's make_tiny_models.py writes it)"}
    model = comfy.sd.load_diffusion_model(str(path))
    out: dict = {"detected": type(model.model.model_config).__name__}
    gen = torch.Generator().manual_seed(0)
    text = TextCond(torch.randn(2, 12, 4096, generator=gen), torch.randn(2, 768, generator=gen))
    x, t = torch.randn(2, 16, 64, generator=gen), torch.tensor([0.7, 0.3])
    try:
        ComfyFlux(model, (8, 8))
    except ValueError as err:
        out["needs_guidance"] = "guidance" in str(err)
    with torch.inference_mode(False), torch.enable_grad():
        backend = ComfyFlux(model.clone(force_deepcopy=True), (8, 8), guidance=3.5)
        params = backend.attach_lora(("add_q_proj", "add_k_proj", "pooled"), rank=4, alpha=4.0)
        with torch.no_grad():
            for p in params:  # a non-zero LoRA, so that the export check means something
                p.add_(0.05 * torch.randn(p.shape, generator=gen))
        with backend.attention_patch([[1, 2], [3]], keep_grad=True) as patch:
            v = backend.velocity(x, t, text)
        loss = v.pow(2).mean() + torch.stack(list(patch.result.maps.values())).mean()
        out["maps"] = len(patch.result.maps)  # before backward: its recomputation records the blocks again
        with patch:
            loss.backward()
        out["grads"] = sum(int(p.grad is not None and p.grad.abs().sum() > 0) for p in params)
        out["params"] = len(params)
        with torch.no_grad():
            v = backend.velocity(x, t, text)
            write_lora_file(LoraFile(backend.trained_modules(), {}), lora_path, overwrite=True)
            stock, _ = comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(str(lora_path)), 1.0, 0.0)
            v_stock = ComfyFlux(stock, (8, 8), guidance=3.5).velocity(x, t, text)
            v_base = ComfyFlux(model, (8, 8), guidance=3.5).velocity(x, t, text)
    out["export_vs_stock_loader"] = (v - v_stock).abs().max().item()
    out["lora_effect"] = (v - v_base).abs().max().item()
    return out


if __name__ != "__main__":
    import pytest

    COMFY_DIR = os.environ.get(ENV)
    if not COMFY_DIR:
        pytest.skip(f"{ENV} is not set: point it to a ComfyUI checkout and run with ComfyUI's venv python",
                    allow_module_level=True)

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_comfy_sandbox import child_measurements

    @pytest.fixture(scope="module")
    def measured(tmp_path_factory) -> dict:
        return child_measurements(__file__, COMFY_DIR, tmp_path_factory.mktemp("comfy_backend") / "measured.json")

    def test_attention_maps_match_diffusers(measured):
        assert measured["map_scale"] > 0.01 and all(measured["tokens_equal"])
        assert max(measured["maps"].values()) <= MAP_ATOL, measured["maps"]

    def test_suppression_matches_diffusers(measured):
        assert measured["suppression_effect"] > 0.01
        assert measured["suppression_diff"] <= VELOCITY_ATOL, measured

    def test_training_touches_only_the_lora_and_the_teacher_is_the_base(measured):
        assert measured["base_untouched"] and measured["clone_base_weights_unchanged"]
        assert measured["lora_changed"] > 0 and measured["lora_effect"] > 1e-3
        assert measured["teacher_is_base"] <= 1e-5, measured

    def test_flux_dev_geometry_guidance_capture_training_and_export(measured):
        dev = measured["dev"]
        if "skipped" in dev:
            pytest.skip(dev["skipped"])
        assert dev["detected"] == "Flux" and dev["needs_guidance"]
        assert dev["maps"] == 2 and dev["grads"] == dev["params"] > 0
        assert dev["lora_effect"] > 1e-4 and dev["export_vs_stock_loader"] <= 1e-4, dev

    def test_bf16_and_fp8_bases_train_an_fp32_lora(measured):
        for name, d in measured["dtypes"].items():
            assert d["lora_dtypes"] == ["torch.float32"] and d["finite"] and d["lora_moved"] > 0, (name, d)
            assert d["rel_velocity_error"] < (0.02 if name == "bf16" else 0.15), (name, d)

    def test_hooked_deltas_equal_the_stock_loader_and_distill_trains(measured):
        assert measured["hooked_vs_stock_loader"] <= VELOCITY_ATOL and measured["hooks_removed"] <= 1e-6, measured
        d = measured["distill"]
        assert d["base_untouched"] and d["moved"] > 0 and d["last"] < d["first"], d

    def test_exported_lora_is_what_diffusers_and_the_stock_loader_apply(measured):
        assert measured["export_vs_diffusers"] <= VELOCITY_ATOL, measured
        assert measured["export_vs_stock_loader"] <= VELOCITY_ATOL, measured


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1], sys.argv[2]))
