"""Inputs of chosen Linear modules, recorded from real forward passes.

Closed-form edits (the merge's ``closed_form``, RealEra/UCE's K/V solve) need, per module, the rows its weight
actually sees for a concept: the text-stream projections of block N see the block's normalised, time-modulated
text hidden states, so the rows differ per block and per timestep and must come from forward passes of the
base model, not from the T5 embedding table.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .backend import TextCond, unwrap


@contextmanager
def record_inputs(model: nn.Module, names: list[str]):
    """Within the block, ``store[name]`` collects the input tensor of every call of module ``name``."""
    modules = dict(unwrap(model).named_modules())
    missing = [n for n in names if n not in modules]
    if missing:
        raise ValueError(f"module {missing[0]!r} does not exist in this model")
    with record_module_inputs({n: modules[n] for n in names}) as store:
        yield store


@contextmanager
def record_module_inputs(modules: dict[str, nn.Module]):
    """Within the block, ``store[name]`` collects the input tensor of every call of ``modules[name]``."""
    store: dict[str, list[torch.Tensor]] = {n: [] for n in modules}
    hooks = [m.register_forward_pre_hook(lambda _m, args, n=n: store[n].append(args[0].detach()))
             for n, m in modules.items()]
    try:
        yield store
    finally:
        for h in hooks:
            h.remove()


@torch.no_grad()
def collect_token_inputs(backend, names: list[str], text: TextCond, rows: list[list[int]],
                         states: list[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Rows (n, D_in) seen by each module at the given token positions of each prompt, over ``states``.

    ``rows[b]`` are the token indices of prompt b (e.g. its concept word); ``states`` are (x_t, t) pairs with
    ``len(text)`` latents each. Modules with a per-prompt input (the pooled path) contribute one row per prompt.
    """
    if len(rows) != len(text):
        raise ValueError(f"rows: {len(rows)} token lists for {len(text)} prompts")
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    with record_module_inputs({n: backend.linear(n)[0] for n in names}) as store:
        for x, t in states:
            backend.velocity(x, t, text)
    for name, calls in store.items():
        for inp in calls:
            if inp.dim() == 2:  # (B, D): per-prompt vector
                out[name].append(inp.float())
                continue
            out[name] += [inp[b, idx].float() for b, idx in enumerate(rows) if idx]
    return {n: torch.cat(v) if v else torch.zeros(0) for n, v in out.items()}
