"""The attention patch: exact capture, clean removal, gradients, suppression."""
import math

import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb

from erase_core.flux.attention import AttentionPatch, selection_tensor
from erase_core.flux.backend import DiffusersFlux
from erase_core.flux.packing import image_ids, text_ids


def reference_probs(model, x, t, text, block: int):
    """Full joint-attention probabilities of dual block ``block`` recomputed by hand, (B, H, S, S)."""
    rec = {}

    def grab(mod, args, kwargs):
        rec["h"], rec["e"] = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
        rec["rot"] = kwargs["image_rotary_emb"]

    hook = model.transformer_blocks[block].attn.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        DiffusersFlux(model, (8, 8)).velocity(x, t, text)
    finally:
        hook.remove()
    attn = model.transformer_blocks[block].attn
    heads = lambda y: y.unflatten(-1, (-1, attn.head_dim))  # noqa: E731
    q = torch.cat([attn.norm_added_q(heads(attn.add_q_proj(rec["e"]))), attn.norm_q(heads(attn.to_q(rec["h"])))], 1)
    k = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(rec["e"]))), attn.norm_k(heads(attn.to_k(rec["h"])))], 1)
    q, k = apply_rotary_emb(q, rec["rot"], sequence_dim=1), apply_rotary_emb(k, rec["rot"], sequence_dim=1)
    return (torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(attn.head_dim)).softmax(-1)


def test_capture_is_bit_identical_and_restores(flux, flux_inputs):
    x, t, text = flux_inputs
    be = DiffusersFlux(flux, (8, 8))
    before = [b.attn.processor for b in flux.transformer_blocks]
    with torch.no_grad():
        ref = be.velocity(x, t, text)
        with AttentionPatch(flux, [2, 3], blocks=["double.0", "double.1", "single.1"]) as patch:
            out = be.velocity(x, t, text)
            assert flux.transformer_blocks[0].attn.processor is not before[0]
        after = be.velocity(x, t, text)
    assert torch.equal(out, ref)
    assert torch.equal(after, ref)
    assert [b.attn.processor for b in flux.transformer_blocks] == before
    assert set(patch.result.maps) == {("double.0", 0), ("double.1", 0), ("single.1", 0)}


def test_maps_match_hand_computed_softmax(flux, flux_inputs):
    x, t, text = flux_inputs
    with torch.no_grad():
        probs = reference_probs(flux, x, t, text, block=1)
        with AttentionPatch(flux, [1, 4, 7], blocks=["double.1"], grid=(4, 4), query_chunk=5) as patch:
            DiffusersFlux(flux, (8, 8)).velocity(x, t, text)
    n_txt = 8
    expected = probs[:, :, n_txt:, :n_txt].mean(1)[..., [1, 4, 7]].transpose(1, 2).reshape(2, 3, 4, 4)
    got = patch.result.maps[("double.1", 0)]
    assert got.shape == (2, 3, 4, 4)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    # attention mass is the sum over the chosen tokens of the mean over pixels
    torch.testing.assert_close(patch.result.mass(["double.1"]), expected.flatten(2).mean(-1).sum(-1))


def test_maps_come_from_the_processors_own_projections_and_match_a_recompute(flux, flux_inputs, monkeypatch):
    """Capture reads q/k from the processor's normed projections (no second projection); the recompute used for
    processors that bypass the norms gives the same maps, in dual and single blocks."""
    x, t, text = flux_inputs
    blocks = ["double.1", "single.0"]
    with torch.no_grad(), AttentionPatch(flux, [1, 4], blocks=blocks) as hooked:
        DiffusersFlux(flux, (8, 8)).velocity(x, t, text)
    calls = []
    real_qk = AttentionPatch._qk
    monkeypatch.setattr(AttentionPatch, "_qk", staticmethod(lambda *a: calls.append(1) or real_qk(*a)))
    with torch.no_grad(), AttentionPatch(flux, [1, 4], blocks=blocks):
        DiffusersFlux(flux, (8, 8)).velocity(x, t, text)
    assert calls == []  # the hook path was taken
    monkeypatch.setattr(AttentionPatch, "_from_hooks",
                        staticmethod(lambda *a: (_ for _ in ()).throw(KeyError("norm_q"))))
    real_hook = torch.nn.Module.register_forward_hook
    monkeypatch.setattr(torch.nn.Module, "register_forward_hook",  # a processor whose norms never report
                        lambda self, fn, **kw: real_hook(self, lambda *a: None, **kw))
    with torch.no_grad(), AttentionPatch(flux, [1, 4], blocks=blocks) as recomputed:
        DiffusersFlux(flux, (8, 8)).velocity(x, t, text)
    assert len(calls) == 2  # one recompute per captured block
    for key in hooked.result.maps:
        torch.testing.assert_close(recomputed.result.maps[key], hooked.result.maps[key], atol=1e-6, rtol=1e-5)


def test_per_row_token_lists(flux, flux_inputs):
    x, t, text = flux_inputs
    with torch.no_grad():
        with AttentionPatch(flux, [[2], [3, 5]], blocks=["double.0"]) as patch:
            DiffusersFlux(flux, (8, 8)).velocity(x, t, text)
        with AttentionPatch(flux, [2, 3, 5], blocks=["double.0"]) as full:
            DiffusersFlux(flux, (8, 8)).velocity(x, t, text)
    rows = patch.result.maps[("double.0", 0)]
    ref = full.result.maps[("double.0", 0)]
    torch.testing.assert_close(rows[0, 0], ref[0, 0])
    torch.testing.assert_close(rows[1], ref[1, 1:])
    assert patch.result.valid.tolist() == [[True, False], [True, True]]
    torch.testing.assert_close(patch.result.mass()[0], ref[0, 0].mean())


def test_steps_count_forward_passes_and_inactive_passes_are_skipped(flux, flux_inputs):
    x, t, text = flux_inputs
    be = DiffusersFlux(flux, (8, 8))
    with torch.no_grad(), AttentionPatch(flux, [2]) as patch:
        be.velocity(x, t, text)
        patch.active = False
        be.velocity(x, t, text)
        patch.active = True
        be.velocity(x, t * 0.5, text)
    assert patch.result.steps() == [0, 1]
    assert patch.result.blocks() == ["double.0", "double.1"]


def test_keep_grad_reaches_add_k_proj_of_the_same_block(flux, flux_inputs):
    x, t, text = flux_inputs
    flux.requires_grad_(True)
    with AttentionPatch(flux, [2, 3], blocks=["double.1"], keep_grad=True) as patch:
        DiffusersFlux(flux, (8, 8)).velocity(x, t, text)
    patch.result.mass().sum().backward()
    attn = flux.transformer_blocks[1].attn
    assert attn.add_k_proj.weight.grad is not None and attn.add_k_proj.weight.grad.abs().sum() > 0
    # image→text maps of a block get no gradient from that block's text queries
    assert attn.add_q_proj.weight.grad is None or attn.add_q_proj.weight.grad.abs().sum() == 0


def test_without_keep_grad_maps_are_detached(flux, flux_inputs):
    x, t, text = flux_inputs
    flux.requires_grad_(True)
    with AttentionPatch(flux, [2], blocks=["double.0"]) as patch:
        DiffusersFlux(flux, (8, 8)).velocity(x, t, text)
    assert not patch.result.maps[("double.0", 0)].requires_grad


def test_suppression_zeroes_the_columns_and_changes_the_output(flux, flux_inputs):
    x, t, text = flux_inputs
    be = DiffusersFlux(flux, (8, 8))
    with torch.no_grad():
        ref = be.velocity(x, t, text)
        with AttentionPatch(flux, [2, 3], suppress=0.0) as patch:
            out = be.velocity(x, t, text)
    assert patch.result.mass().abs().max() == 0.0
    assert (out - ref).abs().max() > 1e-4


def test_partial_suppression_rescales_before_renormalising(flux, flux_inputs):
    x, t, text = flux_inputs
    with torch.no_grad():
        probs = reference_probs(flux, x, t, text, block=0)[:, :, 8:, :]  # image rows (B, H, Ni, S)
        with AttentionPatch(flux, [2], blocks=["double.0"], suppress=0.5) as patch:
            DiffusersFlux(flux, (8, 8)).velocity(x, t, text)
    p2 = probs[..., 2]
    expected = (0.5 * p2 / (1 - 0.5 * p2)).mean(1)  # softmax with logit + log 0.5 on one column
    torch.testing.assert_close(patch.result.maps[("double.0", 0)][:, 0].flatten(1), expected, atol=1e-6, rtol=1e-5)


def test_bad_arguments_name_the_field(flux):
    with pytest.raises(ValueError, match="block 'double.9'"):
        AttentionPatch(flux, [1], blocks=["double.9"])
    with pytest.raises(ValueError, match="suppress=1.5"):
        AttentionPatch(flux, [1], suppress=1.5)
    with pytest.raises(ValueError, match="token index 40"):
        selection_tensor([40], 1, 8)
    with pytest.raises(ValueError, match="3 prompts"):
        selection_tensor([[1], [2], [3]], 2, 8)


def test_ids_layout():
    ids = image_ids(4, 6)
    assert ids.shape == (6, 3) and ids[:, 0].abs().sum() == 0
    assert ids[4].tolist() == [0, 1, 1]
    assert text_ids(5).abs().sum() == 0


def test_suppression_bias_rows():
    from erase_core.flux.attention import suppression_bias

    idx, valid = torch.tensor([[1]]), torch.tensor([[True]])
    img = suppression_bias(idx, valid, n_txt=3, n_img=2, scale=0.0, dtype=torch.float32, rows="image")[0, 0]
    assert torch.isinf(img[3:, 1]).all() and not torch.isinf(img[:3]).any()
    full = suppression_bias(idx, valid, n_txt=3, n_img=2, scale=0.0, dtype=torch.float32, rows="all")[0, 0]
    assert torch.isinf(full[:, 1]).sum() == 4 and full[1, 1] == 0  # every query but the word's own token
    half = suppression_bias(idx, valid, n_txt=3, n_img=2, scale=0.5, dtype=torch.float32)[0, 0]
    assert torch.allclose(half[3:, 1], torch.tensor(math.log(0.5)))


def test_deleting_columns_for_all_rows_differs_from_image_rows_only(flux, flux_inputs):
    x, t, text = flux_inputs
    be = DiffusersFlux(flux, (8, 8))
    with torch.no_grad():
        with AttentionPatch(flux, [2, 3], capture=False, suppress=0.0, suppress_rows="image"):
            img_only = be.velocity(x, t, text)
        with AttentionPatch(flux, [2, 3], capture=False, suppress=0.0, suppress_rows="all"):
            every = be.velocity(x, t, text)
    assert (img_only - every).abs().max() > 1e-5
    with pytest.raises(ValueError, match="suppress_rows='text'"):
        AttentionPatch(flux, [1], suppress=0.0, suppress_rows="text")


def test_capture_backward_matches_autograd_in_every_chunking():
    """The capture's hand-written backward (probabilities recomputed per query chunk, never stored) equals autograd
    through the plain softmax, for a chunk that splits the queries and one that does not."""
    import math

    from erase_core.flux.attention import image_text_probs

    torch.manual_seed(0)
    b, n, h, d, t = 2, 12, 3, 8, 5
    q = torch.randn(b, n, h, d, requires_grad=True)
    k = torch.randn(b, t + n, h, d, requires_grad=True)
    idx = torch.tensor([[1, 3], [0, 4]])
    bias = torch.zeros(b, 1, t + n, t + n)
    bias[:, :, :, 2] = -1.5
    w = torch.randn(b, 2, n)
    logits = torch.einsum("bqhd,bshd->bhqs", q.double(), k.double()) / math.sqrt(d) + bias[:, :, t:, :].double()
    ref = torch.gather(logits.softmax(-1).mean(1), 2, idx[:, None, :].expand(-1, n, -1)).transpose(1, 2)
    gq, gk = torch.autograd.grad((ref * w).sum(), (q, k))
    for chunk in (5, 12):
        out = image_text_probs(q, k, idx, bias, t, chunk)
        assert torch.allclose(out.double(), ref, atol=1e-6)
        dq, dk = torch.autograd.grad((out * w).sum(), (q, k))
        assert torch.allclose(dq, gq.float(), atol=1e-6) and torch.allclose(dk, gk.float(), atol=1e-6)
