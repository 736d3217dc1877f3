"""Module inputs recorded from forward passes (the rows closed-form edits and merges solve on)."""
import torch

from erase_core.flux.backend import DiffusersFlux
from erase_core.flux.collect import collect_token_inputs, record_inputs


def test_rows_are_the_module_inputs_at_the_given_tokens(flux, flux_inputs):
    x, t, text = flux_inputs
    be = DiffusersFlux(flux, (8, 8))
    names = ["transformer_blocks.1.attn.add_k_proj", "time_text_embed.text_embedder.linear_1"]
    rows = [[2, 3], [5]]
    got = collect_token_inputs(be, names, text, rows, [(x, t), (x * 0.5, t * 0.5)])
    with record_inputs(flux, names) as store:
        with torch.no_grad():
            be.velocity(x, t, text)
    full = store[names[0]][0]
    assert got[names[0]].shape == (2 * 3, 32)
    assert torch.equal(got[names[0]][:3], torch.cat([full[0, [2, 3]], full[1, [5]]]))
    assert got[names[1]].shape == (2 * 2, 32)  # the pooled path: one row per prompt and state
    assert torch.equal(got[names[1]][:2], text.pooled)
    # hooks are gone afterwards
    assert all(not m._forward_pre_hooks for m in flux.modules())
