"""Each loss against its equation: values, shapes, and where gradients flow."""
import math

import pytest
import torch

from erase_core.losses import (anchor_loss, attention_loss, esd_loss, esd_target, flow_loss,
                               reverse_self_contrastive)


def test_esd_target_and_loss():
    vu, vc = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 1.0])
    assert esd_target(vu, vc, 1.0).tolist() == [-1.0, 3.0]  # v_u - (v_c - v_u)
    assert esd_target(vu, vc, 0.0).tolist() == vu.tolist()
    pred = torch.zeros(2, requires_grad=True)
    loss = esd_loss(pred, vu, vc, 1.0)
    assert math.isclose(loss.item(), (1 + 9) / 2)
    loss.backward()
    assert pred.grad is not None


def test_esd_target_carries_no_gradient_to_the_teacher():
    vu = torch.ones(3, requires_grad=True)
    vc = torch.zeros(3, requires_grad=True)
    esd_loss(torch.zeros(3, requires_grad=True), vu, vc, 2.0).backward()
    assert vu.grad is None and vc.grad is None


def test_attention_loss_is_mass_with_padding_masked():
    maps = torch.zeros(2, 2, 2, 2)
    maps[0, 0] = 0.4
    maps[0, 1] = 0.2
    maps[1, 0] = 0.1
    maps[1, 1] = 9.0  # padding column of prompt 1
    valid = torch.tensor([[True, True], [True, False]])
    assert math.isclose(attention_loss(maps, valid).item(), ((0.4 + 0.2) + 0.1) / 2, rel_tol=1e-6)
    stacked = torch.stack([maps, maps])
    assert math.isclose(attention_loss(stacked, valid).item(), attention_loss(maps, valid).item(), rel_tol=1e-6)


def test_flow_and_anchor_losses():
    x0, eps = torch.zeros(4), torch.ones(4)
    assert flow_loss(torch.ones(4), x0, eps).item() == 0.0
    va = torch.ones(4, requires_grad=True)
    anchor_loss(torch.zeros(4, requires_grad=True), va).backward()
    assert va.grad is None


def test_reverse_self_contrastive_prefers_irrelevant_over_synonym():
    torch.manual_seed(0)
    c = torch.randn(1, 16)
    irr = torch.randn(1, 3, 16)
    near_syn = reverse_self_contrastive(c, c + 0.01 * torch.randn(1, 16), irr)
    far_syn = reverse_self_contrastive(c, -c, irr)
    assert near_syn > far_syn >= 0  # similar synonym = high loss; dissimilar synonym = low loss
    # closed form for one irrelevant concept: -log(e^{a}/(e^{a}+e^{b}))
    a, b = 0.3, 0.9
    f_c = torch.tensor([[1.0, 0.0]])
    f_irr = torch.tensor([[[a, math.sqrt(1 - a * a)]]])
    f_syn = torch.tensor([[b, math.sqrt(1 - b * b)]])
    expected = -math.log(math.exp(a / 0.07) / (math.exp(a / 0.07) + math.exp(b / 0.07)))
    assert math.isclose(reverse_self_contrastive(f_c, f_syn, f_irr).item(), expected, rel_tol=1e-4)


def test_reverse_self_contrastive_gradient_moves_concept_toward_irrelevant():
    torch.manual_seed(1)
    c = torch.randn(2, 8, requires_grad=True)
    syn, irr = torch.randn(2, 8), torch.randn(2, 3, 8)
    loss0 = reverse_self_contrastive(c, syn, irr)
    loss0.backward()
    with torch.no_grad():
        c2 = c - 0.05 * c.grad / c.grad.norm()
    assert reverse_self_contrastive(c2, syn, irr) < loss0
    with pytest.raises(ValueError, match="tau=0"):
        reverse_self_contrastive(c, syn, irr, tau=0)
