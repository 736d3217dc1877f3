"""RealEra on the sandbox: the combined LoRA is exactly closed form + alignment LoRA, and it erases."""
import copy

import pytest
import torch

from erase_core.evaluate import found_rate
from erase_core.lora import apply_lora, trained_lora
from erase_core.neighbours import NeighbourConfig
from erase_core.realera import RealEraEraser, realera
from erase_core.kv_edit import closed_form_erase
from erase_core.sandbox.erase_sets import sandbox_concept_set
from erase_core.train import EraseConfig


def test_combined_lora_is_closed_form_plus_alignment(world):
    cs = sandbox_concept_set("west")
    res, lf = realera(world, cs, EraseConfig(method="realera", steps=2, batch=4, base_samples=4))
    edit = closed_form_erase(world, cs, neighbours=NeighbourConfig())
    trained = trained_lora(res.model)
    for name, m in lf.modules.items():
        want = edit.modules[name].delta() if name in edit.modules else 0
        want = want + (trained.modules[name].delta() if name in trained.modules else 0)
        assert torch.allclose(m.delta(), want, atol=1e-5), name
    # the student is the edited model + LoRA; the teacher is the untouched base
    er = RealEraEraser(world, cs, EraseConfig(method="realera", steps=1, batch=2, base_samples=2), edit)
    x, t, text = world.noise(1, 0), torch.tensor([0.5]), world.encode(["a shape in the west"])
    with torch.no_grad():
        assert torch.equal(er.original.velocity(x, t, text), world.backend().velocity(x, t, text))
        assert torch.allclose(er.backend.velocity(x, t, text),
                              world.backend(apply_lora(copy.deepcopy(world.transformer), edit)).velocity(x, t, text),
                              atol=1e-5)
    with pytest.raises(ValueError, match="method='realera'"):
        RealEraEraser(world, cs, EraseConfig(), edit)


def test_realera_erases_west(world):
    _, lf = realera(world, sandbox_concept_set("west"), EraseConfig(method="realera", steps=40))
    model = apply_lora(copy.deepcopy(world.transformer), lf)
    assert found_rate(world, "a shape in the west", "west", 16, seed=3, transformer=model) <= 25
    assert found_rate(world, "a shape in the east", "east", 16, seed=3, transformer=model) >= 80


def test_ablation_without_neighbours_aligns_the_concept_only(world):
    """Table 3's "closed form + alignment": no mined rows in the closed form, every step Eq. 8."""
    cs = sandbox_concept_set("west")
    res, lf = realera(world, cs, EraseConfig(method="realera", steps=3, batch=2, base_samples=2), neighbours=None)
    assert [set(h.losses) for h in res.history] == [{"align"}] * 3
    edit = closed_form_erase(world, cs)
    trained = trained_lora(res.model)
    name = next(n for n in edit.modules if n in trained.modules)
    torch.testing.assert_close(lf.modules[name].delta(), edit.modules[name].delta() + trained.modules[name].delta(),
                               atol=1e-5, rtol=1e-4)
