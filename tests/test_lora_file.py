"""LoRA files: layouts, round trips (ours and diffusers' loader), validation, metadata."""
import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from conftest import tiny_flux
from erase_core.flux.backend import DiffusersFlux
from erase_core.lora import apply_lora, attach_lora, save_lora
from erase_core.lora_file import (LoraFile, LoraModule, check_against, parse_lora, read_lora_file,
                                  write_lora_file)

H = 32  # hidden of tiny_flux (2 heads × 16)


def _velocity(model, inputs):
    x, t, text = inputs
    with torch.no_grad():
        return DiffusersFlux(model, (8, 8)).velocity(x, t, text)


def _random_lora(seed=0, rank=3, targets=("add_q_proj", "add_k_proj"), blocks=(0, 1), alpha=6.0):
    g = torch.Generator().manual_seed(seed)
    mods = {}
    for b in blocks:
        for t in targets:
            mods[f"transformer_blocks.{b}.attn.{t}"] = LoraModule(torch.randn(rank, H, generator=g) * 0.3,
                                                                 torch.randn(H, rank, generator=g) * 0.3, alpha)
    return LoraFile(mods, {"concept": "test"})


def _edited(model, lf: LoraFile, scale=1.0):
    """The model with every ΔW added to its weight by hand: the reference every loader must match."""
    out = copy.deepcopy(model)
    named = dict(out.named_modules())
    with torch.no_grad():
        for name, m in lf.modules.items():
            named[name].weight += scale * m.delta().float()
    return out


def test_trained_lora_round_trips_through_file(flux, flux_inputs, tmp_path):
    model = copy.deepcopy(flux)
    params = attach_lora(model, ("add_q_proj", "add_k_proj"), rank=4, alpha=8.0)
    with torch.no_grad():
        for p in params:
            p.normal_(0, 0.2)
    path = save_lora(model, tmp_path / "a.safetensors", {"concept": "cat", "method": "esd"})
    lf = read_lora_file(path)
    assert lf.meta["concept"] == "cat" and lf.meta["geometry"]["num_layers"] == 2 and len(lf.meta["fingerprint"]) == 16
    assert {m.alpha for m in lf.modules.values()} == {8.0}
    loaded = apply_lora(copy.deepcopy(flux), path)
    torch.testing.assert_close(_velocity(loaded, flux_inputs), _velocity(model, flux_inputs), rtol=0, atol=1e-5)
    # the file is exactly the hand-edited model
    torch.testing.assert_close(_velocity(_edited(flux, lf), flux_inputs), _velocity(model, flux_inputs),
                               rtol=0, atol=1e-5)


def test_mixed_ranks_and_alphas_survive(flux, flux_inputs, tmp_path):
    lf = _random_lora(rank=3, alpha=6.0)
    lf.modules["transformer_blocks.1.attn.add_q_proj"] = LoraModule(torch.randn(5, H) * 0.2, torch.randn(H, 5) * 0.2, 1.0)
    path = write_lora_file(lf, tmp_path / "mixed.safetensors")
    back = read_lora_file(path)
    assert {k: (m.rank, m.alpha) for k, m in back.modules.items()} == {k: (m.rank, m.alpha) for k, m in lf.modules.items()}
    torch.testing.assert_close(_velocity(apply_lora(copy.deepcopy(flux), path), flux_inputs),
                               _velocity(_edited(flux, lf), flux_inputs), rtol=0, atol=1e-5)


def test_diffusers_load_lora_weights_matches_ours(flux, flux_inputs, tmp_path):
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    lf = _random_lora(seed=2, rank=4, alpha=2.0)
    path = write_lora_file(lf, tmp_path / "d.safetensors")
    pipe = FluxPipeline(scheduler=FlowMatchEulerDiscreteScheduler(), vae=None, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=copy.deepcopy(flux))
    pipe.load_lora_weights(str(path), adapter_name="erase")
    ours = apply_lora(copy.deepcopy(flux), path)
    torch.testing.assert_close(_velocity(pipe.transformer, flux_inputs), _velocity(ours, flux_inputs), rtol=0, atol=1e-5)
    # and both really changed the model (alpha 2 / rank 4 = 0.5 was honoured, not 1.0)
    torch.testing.assert_close(_velocity(ours, flux_inputs), _velocity(_edited(flux, lf), flux_inputs), rtol=0, atol=1e-5)
    assert not torch.allclose(_velocity(ours, flux_inputs), _velocity(flux, flux_inputs), atol=1e-3)


@pytest.mark.parametrize("layout", ["kohya", "comfy"])
def test_fused_qkv_layouts_split_exactly(flux, flux_inputs, layout):
    g = torch.Generator().manual_seed(3)
    tensors, ref = {}, {}
    for b in (0, 1):
        down, up = torch.randn(4, H, generator=g) * 0.3, torch.randn(3 * H, 4, generator=g) * 0.3
        up[2 * H:] = 0  # no v update: the v slice must be dropped, q and k kept
        prefix = f"lora_unet_double_blocks_{b}_txt_attn_qkv" if layout == "kohya" else \
            f"diffusion_model.double_blocks.{b}.txt_attn.qkv"
        tensors[f"{prefix}.lora_down.weight"], tensors[f"{prefix}.lora_up.weight"] = down, up
        tensors[f"{prefix}.alpha"] = torch.tensor(2.0)
        for i, name in enumerate(("add_q_proj", "add_k_proj")):
            ref[f"transformer_blocks.{b}.attn.{name}"] = LoraModule(down, up[i * H:(i + 1) * H], 2.0)
    lf, unknown = parse_lora(tensors)
    assert unknown == [] and lf.layout == layout and sorted(lf.modules) == sorted(ref)
    torch.testing.assert_close(_velocity(apply_lora(copy.deepcopy(flux), lf), flux_inputs),
                               _velocity(_edited(flux, LoraFile(ref)), flux_inputs), rtol=0, atol=1e-5)


def test_unknown_keys_are_reported_not_dropped(tmp_path):
    t = {"diffusion_model.double_blocks.0.img_mlp.0.lora_up.weight": torch.zeros(4, 2),
         "diffusion_model.double_blocks.0.img_mlp.0.lora_down.weight": torch.zeros(2, 4),
         "transformer.transformer_blocks.0.attn.add_q_proj.lora_A.weight": torch.zeros(2, H),
         "transformer.transformer_blocks.0.attn.add_q_proj.lora_B.weight": torch.zeros(H, 2),
         "something.else": torch.zeros(1)}
    save_file(t, tmp_path / "u.safetensors")
    with pytest.raises(ValueError, match="3 keys .*img_mlp"):
        read_lora_file(tmp_path / "u.safetensors")
    lf = read_lora_file(tmp_path / "u.safetensors", allow_unknown=True)
    assert list(lf.modules) == ["transformer_blocks.0.attn.add_q_proj"]


def test_other_geometry_is_refused_naming_the_key(flux):
    wide = tiny_flux(double=3)
    lf = _random_lora(blocks=(2,))
    with pytest.raises(ValueError, match="transformer_blocks.2.attn.add_k_proj|transformer_blocks.2.attn.add_q_proj"):
        check_against(lf, flux)
    check_against(lf, wide)
    bad = LoraFile({"transformer_blocks.0.attn.add_q_proj": LoraModule(torch.zeros(2, 64), torch.zeros(64, 2), 2.0)})
    with pytest.raises(ValueError, match=r"add_q_proj.lora_A.weight has shape \(2, 64\).*32 → 32"):
        check_against(bad, flux)
    meta = LoraFile(_random_lora().modules, {"geometry": {"num_layers": 19}})
    with pytest.raises(ValueError, match="num_layers = 19 in the LoRA, 2 in this model"):
        check_against(meta, flux)


def test_files_are_safetensors_only_and_not_overwritten(tmp_path):
    lf = _random_lora()
    with pytest.raises(ValueError, match="must end in .safetensors"):
        write_lora_file(lf, tmp_path / "x.pt")
    path = write_lora_file(lf, tmp_path / "x.safetensors")
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        write_lora_file(_random_lora(seed=9), path)
    assert path.read_bytes() == before
    (tmp_path / "y.ckpt").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ValueError, match="pickled LoRAs are refused"):
        read_lora_file(tmp_path / "y.ckpt")
    assert not list(tmp_path.glob(".*.tmp"))


def test_lora_info_command(tmp_path, capsys):
    from erase_core.cli import main

    path = write_lora_file(_random_lora(), tmp_path / "i.safetensors")
    assert main(["lora-info", str(path)]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["metadata"]["concept"] == "test" and info["ranks"] == [3] and info["modules"] == 4
    assert main(["lora-info", str(tmp_path / "missing.safetensors")]) == 2
