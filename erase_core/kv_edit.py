"""The closed-form K/V edit (UCE / RealEra Eq. 7) on any world: rows from real forward passes, LoRA out.

The edited modules are named as diffusers names them (``transformer_blocks.N.attn.add_k_proj``); the backend maps a
name to its Linear and rows (on ComfyUI's Flux: the k rows of the fused ``txt_attn.qkv``), so the same solve runs on
the diffusers sandbox and on a Flux loaded by ComfyUI.
"""
from __future__ import annotations

import torch

from .closed_form import ClosedFormConfig, solve_edit, truncate_energy
from .concepts import ConceptSet
from .flux.backend import TextCond
from .flux.collect import record_module_inputs
from .flux.flow import noised
from .lora_file import LoraFile
from .neighbours import NeighbourConfig, mine


def _anchor_rows(world, prompt: str, anchor: str) -> list[int]:
    """Token rows of the anchor word in its prompt, or the end-of-sequence token when the anchor is empty."""
    if anchor.strip():
        return world.token_indices(prompt, anchor)
    return [world.end_index(prompt)]


def noised_states(world, x0: torch.Tensor, times, seed: int,
                  stride: int = 7919) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(x_t, t) pairs: ``x0`` noised to each time in ``times``, noise seed ``seed + stride · (i + 1)`` for the i-th."""
    states = []
    for i, t in enumerate(times):
        tt = torch.full((len(x0),), float(t), device=x0.device)
        states.append((noised(x0, world.noise(len(x0), seed + stride * (i + 1)), tt), tt))
    return states


@torch.no_grad()
def _rows(world, names: list[str], text: TextCond, rows: list[list[int]], states) -> dict[str, list[torch.Tensor]]:
    """Per module, per state, per prompt: the module's input rows at ``rows[prompt]``."""
    backend = world.backend()
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    with record_module_inputs({n: backend.linear(n)[0] for n in names}) as store:
        for x, t in states:
            backend.velocity(x, t, text)
    for n in names:
        for inp in store[n]:
            out[n].append([inp[b, r].float() for b, r in enumerate(rows)])
    return out


@torch.no_grad()
def closed_form_erase(world, cs: ConceptSet, cfg: ClosedFormConfig = ClosedFormConfig(),
                      neighbours: NeighbourConfig | None = None, n_prompts: int = 8, seed: int = 0) -> LoraFile:
    """The closed-form edit of every dual-stream block's text K/V projections as a LoRA file object.

    Concept rows (the word's tokens in its prompts, plus mined neighbours when ``neighbours`` is given) are mapped
    to the anchor's rows in the same prompt with the word replaced; preserved prompts' rows and beyond-concept
    samples keep their projections.
    """
    backend = world.backend()
    names = [f"transformer_blocks.{b}.attn.{t}" for b in range(len(backend.dual_blocks())) for t in cfg.targets]
    prompts = list(cs.prompts[:n_prompts])
    anchors = [cs.substitute(p, cs.anchor) or cs.anchor for p in prompts]
    text_c, text_a = world.encode(prompts), world.encode(anchors)
    idx_c = [world.token_indices(p, cs.word) for p in prompts]
    idx_a = [_anchor_rows(world, a, cs.anchor) for a in anchors]
    states = noised_states(world, world.sample_latents(prompts, seed=seed, steps=8, text=text_c), cfg.times, seed)
    rc = _rows(world, names, text_c, idx_c, states)
    ra = _rows(world, names, text_a, idx_a, states)
    e = {n: [] for n in names}
    e_star = {n: [] for n in names}
    keep = {n: [] for n in names}
    for n in names:
        for k in range(len(states)):
            for b in range(len(prompts)):
                e[n].append(rc[n][k][b])
                e_star[n].append(ra[n][k][b].mean(0, keepdim=True).expand_as(rc[n][k][b]))
    if neighbours is not None:  # RealEra: neighbours join the erase set, beyond-concept samples the preserve set
        for b in range(len(prompts)):
            near, far = mine(text_c.sequence[b, idx_c[b]], NeighbourConfig(**{**vars(neighbours), "seed": neighbours.seed + b}))
            samples = torch.cat([near, far])
            seq = text_c.sequence[b:b + 1].repeat(len(samples), 1, 1)
            seq[:, idx_c[b]] = samples
            cond = TextCond(seq, text_c.pooled[b:b + 1].expand(len(samples), -1))
            st = [(x[b:b + 1].expand(len(samples), -1, -1), t[b:b + 1].expand(len(samples))) for x, t in states]
            rn = _rows(world, names, cond, [idx_c[b]] * len(samples), st)
            for n in names:
                for k in range(len(states)):
                    for j in range(len(samples)):
                        if j < len(near):
                            e[n].append(rn[n][k][j])
                            e_star[n].append(ra[n][k][b].mean(0, keepdim=True).expand_as(rn[n][k][j]))
                        else:
                            keep[n].append(rn[n][k][j])
    if cs.preserve_prompts:
        pp = list(cs.preserve_prompts)
        text_p = world.encode(pp)
        real = world.content_rows(pp)
        xp = world.sample_latents(pp, seed=seed + 1, steps=8, text=text_p)
        rp = _rows(world, names, text_p, real, noised_states(world, xp, cfg.times, seed, stride=31))
        for n in names:
            for per_state in rp[n]:
                keep[n] += per_state
    out = {}
    for n in names:
        p = torch.cat(keep[n]) if keep[n] else None
        module, rows = backend.linear(n)
        weight = module.weight if rows is None else module.weight[rows[0]:rows[0] + rows[1]]
        edit = solve_edit(weight.detach().float().cpu(), torch.cat(e[n]).cpu(), torch.cat(e_star[n]).cpu(),
                          None if p is None else p.cpu(), cfg.lam, cfg.ridge)
        out[n] = truncate_energy(edit, cfg.energy, cfg.max_rank)
    return LoraFile(out, {"concept": cs.word, "method": "uce" if neighbours is None else "closed_form+neighbours",
                          "closed_form": {**vars(cfg)}, "anchor": cs.anchor})


@torch.no_grad()
def word_module_inputs(world, word: str, prompts: list[str], modules: list[str], times=(0.3, 0.6, 0.9),
                       seed: int = 0) -> dict[str, torch.Tensor]:
    """Per module (diffusers name), the rows it sees at ``word``'s tokens over base-model samples of ``prompts``
    noised to ``times``: the inputs of closed-form edits and merges, on any world."""
    return token_module_inputs(world, prompts, [world.token_indices(p, word) for p in prompts], modules, times, seed)


def token_module_inputs(world, prompts: list[str], rows: list[list[int]], modules: list[str], times=(0.3, 0.6, 0.9),
                        seed: int = 0) -> dict[str, torch.Tensor]:
    """Per module, the rows it sees at token rows ``rows[k]`` of ``prompts[k]`` over base-model samples noised to
    ``times``."""
    from .flux.collect import collect_token_inputs

    text = world.encode(prompts)
    states = noised_states(world, world.sample_latents(prompts, seed=seed, steps=8, text=text), times, seed)
    return collect_token_inputs(world.backend(), modules, text, rows, states)
