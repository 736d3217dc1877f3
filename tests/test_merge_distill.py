"""The distilled merge: delta hooks, its objective, its CLI."""
import copy
import dataclasses
import json

import pytest
import torch
from torch import nn

from erase_core.flux.deltas import added_deltas, folded_factors
from erase_core.lora import apply_lora
from erase_core.lora_file import LoraFile, LoraModule, read_lora_file, write_lora_file
from erase_core.merge import MergeConfig, merge
from erase_core.merge_distill import DistillConfig, distill

TINY = DistillConfig(steps=4, batch=2, images=2, preserve_images=2, sample_steps=2, noisings=1)


def _random_lora(world, seed: int, scale: float = 0.05, rank: int = 2) -> LoraFile:
    g = torch.Generator().manual_seed(seed)
    backend = world.backend()
    mods = {}
    for b in range(world.cfg.double_blocks):
        for t in ("add_k_proj", "add_v_proj"):
            name = f"transformer_blocks.{b}.attn.{t}"
            lin, _ = backend.linear(name)
            mods[name] = LoraModule(torch.randn(rank, lin.in_features, generator=g) * scale,
                                    torch.randn(lin.out_features, rank, generator=g) * scale, float(rank))
    return LoraFile(mods, {"concept": ["red", "west"][seed % 2]})


def test_added_deltas_equal_the_loaded_lora(world):
    lf = _random_lora(world, 0, scale=0.2)
    x, t, text = world.noise(2, 0), torch.tensor([0.3, 0.8]), world.encode(["a red shape", "a circle"])
    backend = world.backend()
    with torch.no_grad():
        base = backend.velocity(x, t, text)
        with added_deltas(backend, folded_factors(lf)):
            hooked = backend.velocity(x, t, text)
        loaded = world.backend(apply_lora(copy.deepcopy(world.transformer), lf)).velocity(x, t, text)
        after = backend.velocity(x, t, text)
    assert (hooked - base).abs().max() > 1e-2  # the delta does something
    assert torch.allclose(hooked, loaded, atol=1e-5)
    assert torch.equal(after, base)  # hooks removed on exit


def test_added_deltas_touch_only_the_named_rows_of_a_fused_projection():
    fused = nn.Linear(4, 9)

    class Fused:  # ComfyUI's qkv: the k rows are 3..6, given as (offset, length)
        def linear(self, name):
            return fused, (3, 3)

    down, up = torch.randn(2, 4), torch.randn(3, 2)
    x = torch.randn(5, 4)
    with added_deltas(Fused(), {"k": (down, up)}):
        out = fused(x)
    want = fused(x)
    want[:, 3:6] += x @ down.T @ up.T
    assert torch.allclose(out, want, atol=1e-6)
    with pytest.raises(ValueError, match="another geometry"):
        with added_deltas(Fused(), {"k": (torch.randn(2, 5), up)}):
            pass


def test_distill_starts_at_zero_when_the_merge_already_is_the_lora(world):
    lf = _random_lora(world, 0)
    cfg = dataclasses.replace(TINY, steps=1, preserve_weight=0.0)
    _, history = distill(world, [lf], lf, [["a red shape"]], [""], cfg)
    assert history[0]["teachers"] < 1e-10  # teacher i is the base + ΔW_i, the student the base + the same ΔW


@pytest.mark.parametrize("balance", ["uniform", "adaptive"])
def test_distill_lowers_its_objective_and_keeps_the_layout(world, balance):
    loras = [_random_lora(world, s) for s in (0, 1)]
    init = merge(loras, MergeConfig(mode="normalized"))  # half of each: far from either teacher
    cfg = DistillConfig(steps=40, lr=1e-2, batch=4, images=4, preserve_images=4, sample_steps=2, balance=balance)
    merged, history = distill(world, loras, init, [["a red shape"], ["a shape in the west"]], ["a moon", ""], cfg)
    first = sum(h["teachers"] for h in history[:5]) / 5
    last = sum(h["teachers"] for h in history[-5:]) / 5
    assert last < 0.5 * first
    assert set(merged.modules) == set(init.modules)
    assert all(merged.modules[k].shape == init.modules[k].shape for k in init.modules)
    assert merged.meta["merge"]["mode"] == "distill" and merged.meta["merge"]["distill"]["steps"] == 40


def test_teacher_gaps_are_each_loras_mean_squared_move():
    """E‖v_i − v_0‖² per LoRA over its own rows (here the base predicts 0 and teacher i predicts i everywhere)."""
    from erase_core.flux.backend import TextCond
    from erase_core.merge_distill import _Pool, teacher_gaps

    class ZeroBase:
        def velocity(self, x, t, text):
            return torch.zeros_like(x)

    owner = torch.tensor([0, 0, 1, 1, 1])
    target = (owner + 1).float()[:, None, None].expand(5, 2, 3).clone()
    pool = _Pool(torch.randn(5, 2, 3), torch.rand(5), torch.zeros(5, dtype=torch.long), target,
                 TextCond(torch.zeros(1, 4, 8), torch.zeros(1, 8)), owner)
    assert torch.allclose(teacher_gaps(ZeroBase(), pool, 2, batch=2), torch.tensor([1.0, 4.0]))


def test_guided_targets_give_the_teachers_guided_velocity_with_the_bases_uncond(world):
    """(1 − g)·v_0(∅) + g·v_i* = (1 − g)·v_i(∅) + g·v_i(p): what the sampler follows under teacher i."""
    from erase_core.merge_distill import distill_pools

    lf, g = _random_lora(world, 0, scale=0.2), world.cfg_scale
    assert g != 1.0
    cfg = dataclasses.replace(TINY, guided_targets=True)
    teach, _ = distill_pools(world, [lf], [["a red shape"]], [""], cfg)
    plain, _ = distill_pools(world, [lf], [["a red shape"]], [""], dataclasses.replace(cfg, guided_targets=False))
    assert torch.equal(teach.x_t, plain.x_t) and torch.equal(teach.t, plain.t)
    backend, empty = world.backend(), world.encode([""] * len(teach.x_t))
    with torch.no_grad():
        u_0 = backend.velocity(teach.x_t, teach.t, empty)
        with added_deltas(backend, folded_factors(lf)):
            u_i = backend.velocity(teach.x_t, teach.t, empty)
    assert (u_i - u_0).abs().max() > 1e-2  # the LoRA moves the unconditional branch
    diff = ((1 - g) * u_0 + g * teach.target) - ((1 - g) * u_i + g * plain.target)
    assert diff.abs().max() < 1e-4


def test_noisings_noise_each_image_at_several_times(world):
    """k noisings: k rows per sampled image (same prompts, fresh times), each with its teacher's velocity."""
    from erase_core.merge_distill import _repeated, distill_pools

    x = torch.arange(6.0).view(3, 2)
    assert torch.equal(_repeated(x, 2), torch.cat([x, x]))
    lf, k = _random_lora(world, 0, scale=0.2), 3
    prompts = [["a red shape", "a red moon"]]
    teach, kept = distill_pools(world, [lf], prompts, [""], dataclasses.replace(TINY, noisings=k))
    one, one_kept = distill_pools(world, [lf], prompts, [""], TINY)
    n = len(one.x_t)
    assert len(teach.x_t) == k * n and len(kept.x_t) == k * len(one_kept.x_t)
    rows, times = teach.prompt.view(k, n), teach.t.view(k, n)
    assert all(torch.equal(rows[0], rows[c]) and not torch.allclose(times[0], times[c]) for c in range(1, k))
    with torch.no_grad(), added_deltas(world.backend(), folded_factors(lf)):
        v = world.backend().velocity(teach.x_t, teach.t, teach.text.select(teach.prompt))
    assert torch.allclose(v, teach.target, atol=1e-4)  # batched in twos there, all six here
    with pytest.raises(ValueError, match="noisings"):
        DistillConfig(noisings=0)


def test_bad_distill_input_is_named(world):
    lf = _random_lora(world, 0)
    for bad, field in [({"steps": 0}, "steps"), ({"lr": -1.0}, "lr"), ({"preserve_weight": float("nan")},
                                                                        "preserve_weight"),
                       ({"t_range": (0.5, 0.2)}, "t_range"), ({"balance": "fair"}, "balance")]:
        with pytest.raises(ValueError, match=field):
            DistillConfig(**bad)
    with pytest.raises(ValueError, match="prompt list for each"):
        distill(world, [lf, lf], lf, [["a red shape"]], [""], TINY)
    with pytest.raises(ValueError, match="weights"):
        distill(world, [lf], lf, [["a red shape"]], [""], TINY, weights=[0.0])
    with pytest.raises(ValueError, match="distill_merge"):
        merge([lf, lf], MergeConfig(mode="distill"))


def test_merge_command_distills(tmp_path, capsys, world):
    from erase_core.cli import main

    paths = [write_lora_file(_random_lora(world, s), tmp_path / f"{s}.safetensors") for s in (0, 1)]
    out = tmp_path / "m.safetensors"
    assert main(["merge", *map(str, paths), "--mode", "distill", "--distill-steps", "2", "--distill-batch", "2",
                 "--distill-images", "2", "--distill-balance", "uniform", "--distill-guided", "--preserve", "moon",
                 "--out", str(out)]) == 0
    assert json.loads(capsys.readouterr().out)["mode"] == "distill"
    merged = read_lora_file(out)
    assert merged.meta["method"] == "merge:distill" and merged.meta["merge"]["init"] == "closed_form"
    assert merged.meta["merge"]["distill"]["steps"] == 2 and merged.meta["merge"]["distill"]["balance"] == "uniform"
    assert merged.meta["merge"]["distill"]["guided_targets"] is True


def test_cli_balance_choices_are_the_engines():
    """The CLI lists the balances without importing the engine at parse time; they must stay the same."""
    from erase_core.cli import build_parser
    from erase_core.merge_distill import BALANCES

    merge = build_parser()._subparsers._group_actions[0].choices["merge"]
    action = next(a for a in merge._actions if a.dest == "distill_balance")
    assert tuple(action.choices) == BALANCES
