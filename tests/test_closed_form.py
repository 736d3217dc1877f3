"""Closed-form K/V edit (UCE / RealEra Eq. 7): the maths, and that it erases a placement on the sandbox."""
import copy

import pytest
import torch

from erase_core.closed_form import ClosedFormConfig, solve_edit, truncate_energy
from erase_core.lora_file import LoraModule


def test_edit_maps_concept_rows_to_anchor_outputs_and_keeps_preserved_rows():
    g = torch.Generator().manual_seed(0)
    d = 16
    basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0].float()
    e, p = basis[:3] * 2, basis[3:10] * 2  # orthogonal concept and preserved rows
    e_star = torch.randn(3, d, generator=g)
    w = torch.randn(8, d, generator=g)
    edit = solve_edit(w, e, e_star, p, lam=1.0, ridge=1e-9)
    new = w + edit.delta().float()
    assert torch.allclose(e @ new.T, e_star @ w.T, atol=1e-4)  # W e_i = W_org e*_i
    assert torch.allclose(p @ new.T, p @ w.T, atol=1e-4)  # W e_j = W_org e_j
    assert edit.rank == 3


def test_energy_truncation_keeps_the_stated_share():
    m = LoraModule(torch.randn(10, 30), torch.randn(20, 10) * torch.logspace(0, -3, 10), 10.0)
    s = torch.linalg.svdvals(m.delta())
    for energy in (0.5, 0.9, 0.999):
        t = truncate_energy(m, energy, max_rank=64)
        kept = (s[: t.rank] ** 2).sum() / (s ** 2).sum()
        assert kept >= energy - 1e-6 and (t.rank == 1 or (s[: t.rank - 1] ** 2).sum() / (s ** 2).sum() < energy)
        err = torch.linalg.matrix_norm(t.delta() - m.delta())
        assert err == pytest.approx(s[t.rank:].square().sum().sqrt().item(), rel=1e-4, abs=1e-6)
    assert truncate_energy(m, 1.0, max_rank=2).rank == 2


def test_config_validates():
    with pytest.raises(ValueError, match="text K/V"):
        ClosedFormConfig(targets=("add_q_proj",))
    with pytest.raises(ValueError, match="energy"):
        ClosedFormConfig(energy=0.0)


def test_closed_form_erases_west_on_the_sandbox(world):
    from erase_core.evaluate import found_rate
    from erase_core.lora import apply_lora
    from erase_core.kv_edit import closed_form_erase
    from erase_core.sandbox.erase_sets import sandbox_concept_set

    lf = closed_form_erase(world, sandbox_concept_set("west"), n_prompts=6)
    assert set(lf.modules) == {f"transformer_blocks.{b}.attn.{t}" for b in range(3) for t in ("add_k_proj", "add_v_proj")}
    model = apply_lora(copy.deepcopy(world.transformer), lf)
    before = found_rate(world, "a shape in the west", "west", 16, seed=3)
    after = found_rate(world, "a shape in the west", "west", 16, seed=3, transformer=model)
    kept = found_rate(world, "a shape in the east", "east", 16, seed=3, transformer=model)
    assert before >= 90 and after <= 25 and kept >= 80, (before, after, kept)
