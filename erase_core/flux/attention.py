"""The in-place patch of Flux joint attention: capture and suppress image-query → text-key attention.

Flux's blocks attend over one joint sequence with the text tokens first. For an image query i and the text key j,

    P[i, j] = softmax_j'( q_i · k_j' / √d )[j],     j' over every text and image key,

and the map of a token j is P[:, j] laid out on the latent grid, averaged over heads. :class:`AttentionPatch` wraps the
attention processors of chosen blocks. Capture takes q and k from the processor's own normed projections (forward
hooks on its q/k norms) and leaves the original processor untouched, so the model output stays bit-identical.
Suppression multiplies the chosen columns by ``scale`` before renormalisation, as an additive log-mask (``scale = 0``
deletes them: the deterministic attention-map erasure of EraseAnything Sec. 3), for every query by default (no token
can pass the word on) or image queries only.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from diffusers.models.embeddings import apply_rotary_emb
from torch import nn

from .backend import unwrap

TokenSelection = Sequence[int] | Sequence[Sequence[int]]
CHUNK_BYTES = 256 * 2**20  # one query chunk's fp32 attention probabilities, at most (measured: Flux-dev RSC at 1024²)


def selection_tensor(tokens: TokenSelection, batch: int, n_txt: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, K) token indices and a (B, K) validity mask from one list shared by all rows or one list per row."""
    rows = [list(tokens)] * batch if not tokens or isinstance(tokens[0], int) else [list(r) for r in tokens]
    if len(rows) != batch:
        raise ValueError(f"token indices were given for {len(rows)} prompts but the batch has {batch}")
    k = max(1, max(len(r) for r in rows))
    idx = torch.zeros(batch, k, dtype=torch.long)
    valid = torch.zeros(batch, k, dtype=torch.bool)
    for b, r in enumerate(rows):
        bad = [i for i in r if not 0 <= i < n_txt]
        if bad:
            raise ValueError(f"token index {bad[0]} is outside the {n_txt} text tokens of the prompt")
        idx[b, : len(r)] = torch.tensor(r, dtype=torch.long)
        valid[b, : len(r)] = True
    return idx.to(device), valid.to(device)


def suppression_bias(idx: torch.Tensor, valid: torch.Tensor, n_txt: int, n_img: int, scale: float,
                     dtype: torch.dtype, rows: str = "image") -> torch.Tensor:
    """Additive mask (B, 1, S, S): ``log(scale)`` on the chosen text columns, 0 elsewhere.

    ``rows="image"`` acts on image queries only (image→text attention); ``rows="all"`` deletes the columns for every
    query, so that no text token can pass the word on either (the word's own rows keep their self-attention).
    """
    b, s = idx.shape[0], n_txt + n_img
    value = math.log(scale) if scale > 0 else float("-inf")
    cols = torch.zeros(b, s, dtype=dtype, device=idx.device)
    cols.scatter_(1, idx, torch.where(valid, value, 0.0).to(dtype))
    bias = torch.zeros(b, 1, s, s, dtype=dtype, device=idx.device)
    if rows == "image":
        bias[:, 0, n_txt:, :] = cols[:, None, :]
    elif rows == "all":
        bias[:, 0, :, :] = cols[:, None, :]
        own = torch.zeros(b, s, dtype=torch.bool, device=idx.device)
        own.scatter_(1, idx, valid)
        diag = torch.arange(s, device=idx.device)
        bias[:, 0, diag, diag] = torch.where(own, 0.0, bias[:, 0, diag, diag])  # the word's tokens see themselves
    else:
        raise ValueError(f"rows={rows!r} must be 'image' or 'all'")
    return bias


def image_text_probs(q_img: torch.Tensor, k: torch.Tensor, idx: torch.Tensor, bias: torch.Tensor | None,
                     n_txt: int, query_chunk: int) -> torch.Tensor:
    """Head-averaged P[image query, chosen text key] → (B, K, N_img).

    Args:
        q_img: (B, N_img, H, D) post-norm, post-RoPE image queries.
        k: (B, N_txt + N_img, H, D) post-norm, post-RoPE keys, text first.
        idx: (B, K) chosen text columns.
        bias: optional additive mask (B, 1, S, S) as given to the attention.

    Differentiable in q and k; autograd keeps only q and k (and the bias), never the (B, H, Q, S) probabilities:
    backward recomputes them one query chunk at a time (:class:`_ChosenProbs`).
    """
    rows = bias[:, :, n_txt:, :] if bias is not None else None
    return _ChosenProbs.apply(q_img, k, idx, rows, query_chunk).transpose(1, 2)


def _chunk_probs(q: torch.Tensor, kt: torch.Tensor, rows: torch.Tensor | None, start: int, scale: float) -> torch.Tensor:
    """softmax(q kᵀ/√d + bias) for one chunk of image queries (B, H, Q, S), in fp32."""
    logits = torch.matmul(q, kt) * scale
    if rows is not None:
        logits = logits + rows[:, :, start:start + q.shape[2], :].float()
    return logits.softmax(dim=-1)


class _ChosenProbs(torch.autograd.Function):
    """o[b, i, c] = mean_h P_h[b, i, idx[b, c]] with P = softmax(q kᵀ/√d + bias); output (B, N_img, K).

    Backward, per chunk: with g scattered onto the chosen columns (÷H), dL/dlogits = P ⊙ (g − Σ_j P_j g_j),
    dq = dlogits · k / √d, dk = dlogitsᵀ · q / √d.
    """

    @staticmethod
    def forward(ctx, q_img, k, idx, rows, query_chunk):
        scale = 1.0 / math.sqrt(q_img.shape[-1])
        kt = k.permute(0, 2, 3, 1).float()  # (B, H, D, S)
        out = []
        for start in range(0, q_img.shape[1], query_chunk):
            q = q_img[:, start:start + query_chunk].permute(0, 2, 1, 3).float()  # (B, H, Q, D)
            probs = _chunk_probs(q, kt, rows, start, scale).mean(dim=1)  # (B, Q, S)
            out.append(torch.gather(probs, 2, idx[:, None, :].expand(-1, probs.shape[1], -1)))
        ctx.save_for_backward(q_img, k, idx, rows)
        ctx.query_chunk, ctx.scale = query_chunk, scale
        return torch.cat(out, dim=1)

    @staticmethod
    def backward(ctx, grad):
        q_img, k, idx, rows = ctx.saved_tensors
        chunk, scale = ctx.query_chunk, ctx.scale
        heads = q_img.shape[2]
        kf = k.permute(0, 2, 1, 3).float()  # (B, H, S, D)
        kt = kf.transpose(-1, -2)
        dq_img = torch.zeros_like(q_img, dtype=torch.float32)
        dk = torch.zeros_like(kf)
        for start in range(0, q_img.shape[1], chunk):
            q = q_img[:, start:start + chunk].permute(0, 2, 1, 3).float()  # (B, H, Q, D)
            probs = _chunk_probs(q, kt, rows, start, scale)
            g = torch.zeros(probs.shape[0], probs.shape[2], probs.shape[3], device=probs.device)  # (B, Q, S)
            g.scatter_add_(2, idx[:, None, :].expand(-1, probs.shape[2], -1), grad[:, start:start + chunk].float())
            g = (g / heads)[:, None]  # (B, 1, Q, S): the head mean's share
            dlogits = probs * (g - (probs * g).sum(-1, keepdim=True))
            dq_img[:, start:start + chunk] = (torch.matmul(dlogits, kf) * scale).permute(0, 2, 1, 3)
            dk += torch.matmul(dlogits.transpose(-1, -2), q) * scale
        return dq_img.to(q_img.dtype), dk.permute(0, 2, 1, 3).to(k.dtype), None, None, None


@dataclass
class CapturedMaps:
    """Maps recorded by a patch: ``maps[(block_name, step)]`` is (B, K, h, w); ``valid`` marks real columns (B, K)."""

    grid: tuple[int, int] | None
    maps: dict[tuple[str, int], torch.Tensor] = field(default_factory=dict)
    valid: torch.Tensor | None = None

    def blocks(self) -> list[str]:
        return sorted({b for b, _ in self.maps}, key=_block_order)

    def steps(self) -> list[int]:
        return sorted({s for _, s in self.maps})

    def mean(self, blocks: Sequence[str] | None = None, steps: Sequence[int] | None = None) -> torch.Tensor:
        """Average map over the chosen blocks and steps (B, K, h, w)."""
        keys = [k for k in self.maps if (blocks is None or k[0] in blocks) and (steps is None or k[1] in steps)]
        if not keys:
            raise ValueError(f"no captured map for blocks={blocks} steps={steps}; captured: {sorted(self.maps)}")
        return torch.stack([self.maps[k] for k in keys]).mean(0)

    def mass(self, blocks: Sequence[str] | None = None, steps: Sequence[int] | None = None) -> torch.Tensor:
        """Attention mass on the chosen tokens: Σ_tokens mean_pixels P, per prompt (B,)."""
        m = self.mean(blocks, steps)
        valid = self.valid if self.valid is not None else torch.ones(m.shape[:2], dtype=torch.bool)
        return (m.flatten(2).mean(-1) * valid.to(m)).sum(-1)


def _block_order(name: str) -> tuple[int, int]:
    kind, i = name.split(".")
    return (0 if kind == "double" else 1, int(i))


class _Processor:
    """Wraps one block's attention processor; the original keeps computing the output."""

    def __init__(self, original, patch: "AttentionPatch", name: str):
        self.original = original
        self.patch = patch
        self.name = name

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 **kwargs):
        return self.patch._run(self, attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                               kwargs)


class PatchCore:
    """What a patch does inside one attention call, whatever Flux implementation installs it (see
    :class:`AttentionPatch` for diffusers and ``erase_core.flux.comfy.ComfyAttentionPatch`` for ComfyUI).

    Args:
        tokens: text token indices, one list for every prompt or one list per prompt in the batch.
        blocks: block names ``"double.i"`` / ``"single.i"``; default every dual-stream block.
        capture: record maps; ``keep_grad`` keeps them differentiable (for training losses).
        suppress: ``None`` or a scale in [0, 1) applied to the chosen columns (0 zeroes them).
        suppress_rows: ``"image"`` (image queries only) or ``"all"`` (every query: the column is deleted).
        suppress_blocks: where suppression acts (default: the same blocks).
        grid: latent token grid (h, w) for reshaping maps; default square.
        query_chunk: image queries per chunk when computing maps (bounds memory); default: as many as keep one
            chunk's fp32 probabilities (B, H, Q, S) within ``CHUNK_BYTES``.

    The step index of a map counts the forward passes (while ``active``) since entering; set ``active = False`` around
    passes that should not be recorded, e.g. the unconditional pass of classifier-free guidance.
    """

    def __init__(self, known_blocks: list[str], n_double: int, tokens: TokenSelection,
                 blocks: Sequence[str] | None = None, capture: bool = True, keep_grad: bool = False,
                 suppress: float | None = None, suppress_blocks: Sequence[str] | None = None,
                 grid: tuple[int, int] | None = None, query_chunk: int | None = None, suppress_rows: str = "all"):
        self.blocks = list(blocks) if blocks is not None else [f"double.{i}" for i in range(n_double)]
        self.suppress_blocks = list(suppress_blocks) if suppress_blocks is not None else list(self.blocks)
        for name in (*self.blocks, *self.suppress_blocks):
            if name not in known_blocks:
                raise ValueError(f"block {name!r} does not exist; this model has {known_blocks[0]}..{known_blocks[-1]}")
        if suppress is not None and not 0.0 <= suppress < 1.0:
            raise ValueError(f"suppress={suppress} must be in [0, 1): the factor on the chosen columns (0 removes them)")
        if query_chunk is not None and query_chunk < 1:
            raise ValueError(f"query_chunk={query_chunk} must be ≥ 1")
        if suppress_rows not in ("image", "all"):
            raise ValueError(f"suppress_rows={suppress_rows!r} must be 'image' (image queries) or 'all' (every query)")
        self.suppress_rows = suppress_rows
        self.tokens = tokens
        self.capture, self.keep_grad, self.suppress = capture, keep_grad, suppress
        self.query_chunk = query_chunk
        self.active = True
        self.result = CapturedMaps(grid)
        self._calls: dict[str, int] = {}

    def installed_blocks(self) -> list[str]:
        """The blocks whose attention this patch must see."""
        names = set(self.blocks) | (set(self.suppress_blocks) if self.suppress is not None else set())
        return sorted(names, key=_block_order)

    def attend(self, name: str, batch: int, n_txt: int, n_img: int, device, dtype, mask, qk) -> torch.Tensor | None:
        """Per attention call: record the maps (``qk()`` gives post-norm, post-RoPE image queries (B, N_img, H, D)
        and keys (B, S, H, D), text first) and return the attention mask to use (suppression added to ``mask``)."""
        mask = self.mask_for(name, batch, n_txt, n_img, device, dtype, mask)
        if self.records(name):
            self.record(name, batch, n_txt, n_img, device, mask, qk)
        return mask

    def records(self, name: str) -> bool:
        """Whether this call's maps are recorded."""
        return self.active and self.capture and name in self.blocks

    def mask_for(self, name: str, batch: int, n_txt: int, n_img: int, device, dtype, mask) -> torch.Tensor | None:
        """The attention mask of this call: ``mask`` with the suppression of the chosen columns added."""
        if not self.active or self.suppress is None or name not in self.suppress_blocks:
            return mask
        idx, valid = selection_tensor(self.tokens, batch, n_txt, device)
        bias = suppression_bias(idx, valid, n_txt, n_img, self.suppress, dtype, self.suppress_rows)
        if mask is not None:
            bias = bias + (mask if mask.dtype != torch.bool else torch.where(mask, 0.0, float("-inf")).to(bias))
        return bias

    def record(self, name: str, batch: int, n_txt: int, n_img: int, device, mask, qk) -> None:
        """Record this call's maps under ``(name, step)`` from ``qk()`` (see :meth:`attend`) and ``mask``."""
        idx, valid = selection_tensor(self.tokens, batch, n_txt, device)
        step = self._calls.get(name, 0)
        self._calls[name] = step + 1
        with torch.set_grad_enabled(self.keep_grad and torch.is_grad_enabled()):
            q_img, k = qk()
            b, _, h, _ = q_img.shape
            chunk = self.query_chunk or max(1, CHUNK_BYTES // (4 * b * h * k.shape[1]))
            maps = image_text_probs(q_img, k, idx, mask, n_txt, min(chunk, n_img))
        if not self.keep_grad:
            maps = maps.detach()
        h, w = self.result.grid or (int(math.isqrt(n_img)), n_img // max(1, int(math.isqrt(n_img))))
        self.result.maps[(name, step)] = maps.reshape(maps.shape[0], maps.shape[1], h, w)
        self.result.valid = valid


class AttentionPatch(PatchCore):
    """Context manager that patches chosen blocks of diffusers' ``FluxTransformer2DModel`` (or a peft wrapper of it)
    to capture and/or suppress image→text attention; arguments as :class:`PatchCore`."""

    def __init__(self, model: nn.Module, tokens: TokenSelection, blocks: Sequence[str] | None = None, **kw):
        self.inner = unwrap(model)
        n_double, n_single = len(self.inner.transformer_blocks), len(self.inner.single_transformer_blocks)
        known = [f"double.{i}" for i in range(n_double)] + [f"single.{i}" for i in range(n_single)]
        super().__init__(known, n_double, tokens, blocks, **kw)
        self._saved: dict[str, object] = {}
        self._n_txt: int | None = None

    # --- install / remove -------------------------------------------------------------------------------------
    def _attn(self, name: str):
        kind, i = name.split(".")
        blocks = self.inner.transformer_blocks if kind == "double" else self.inner.single_transformer_blocks
        return blocks[int(i)].attn

    def __enter__(self) -> "AttentionPatch":
        for name in self.installed_blocks():
            attn = self._attn(name)
            self._saved[name] = attn.processor
            attn.set_processor(_Processor(attn.processor, self, name))
        return self

    def __exit__(self, *exc) -> None:
        for name, proc in self._saved.items():
            self._attn(name).set_processor(proc)
        self._saved.clear()

    # --- per call ---------------------------------------------------------------------------------------------
    def _run(self, proc: _Processor, attn, hidden, enc, mask, rotary, kwargs):
        if enc is not None:
            n_txt, n_img = enc.shape[1], hidden.shape[1]
            self._n_txt = n_txt
        else:  # single block: text first in one sequence
            if self._n_txt is None:
                raise RuntimeError("a single-stream block ran before any dual-stream block; cannot locate text tokens")
            n_txt, n_img = self._n_txt, hidden.shape[1] - self._n_txt
        batch, device = hidden.shape[0], hidden.device
        mask = self.mask_for(proc.name, batch, n_txt, n_img, device, hidden.dtype, mask)
        if not self.records(proc.name):
            return proc.original(attn, hidden, enc, mask, rotary, **kwargs)
        # the processor's own normed q/k (diffusers' processors all pass them through these modules), so the maps
        # cost no second projection; a processor that bypasses the norms gets them recomputed
        seen: dict[str, torch.Tensor] = {}
        names = ("norm_q", "norm_k", "norm_added_k") if enc is not None else ("norm_q", "norm_k")
        hooks = [getattr(attn, n).register_forward_hook(lambda _m, _i, out, n=n: seen.__setitem__(n, out))
                 for n in names if isinstance(getattr(attn, n, None), nn.Module)]
        try:
            out = proc.original(attn, hidden, enc, mask, rotary, **kwargs)
        finally:
            for hook in hooks:
                hook.remove()
        if len(seen) == len(names):
            qk = lambda: self._rope(*self._from_hooks(seen, n_txt, enc is not None), rotary, n_txt)  # noqa: E731
        else:
            qk = lambda: self._rope(*self._qk(attn, hidden, enc, n_txt), rotary, n_txt)  # noqa: E731
        self.record(proc.name, batch, n_txt, n_img, device, mask, qk)
        return out

    @staticmethod
    def _from_hooks(seen: dict[str, torch.Tensor], n_txt: int, dual: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Image queries and keys (text first), before RoPE, from the normed projections the processor computed."""
        if dual:
            return seen["norm_q"], torch.cat([seen["norm_added_k"], seen["norm_k"]], 1)
        return seen["norm_q"][:, n_txt:], seen["norm_k"]

    @staticmethod
    def _rope(q_img: torch.Tensor, k: torch.Tensor, rotary, n_txt: int) -> tuple[torch.Tensor, torch.Tensor]:
        """RoPE on image queries (their rows of the joint sequence) and on all keys."""
        if rotary is None:
            return q_img, k
        cos, sin = rotary
        return (apply_rotary_emb(q_img, (cos[n_txt:], sin[n_txt:]), sequence_dim=1),
                apply_rotary_emb(k, rotary, sequence_dim=1))

    @staticmethod
    def _qk(attn, hidden, enc, n_txt) -> tuple[torch.Tensor, torch.Tensor]:
        """Image queries and keys (text first), before RoPE, projected again (processors that bypass the norms)."""
        heads = lambda x: x.unflatten(-1, (-1, attn.head_dim))  # noqa: E731  (B, S, H, D)
        if enc is not None:
            q_img = attn.norm_q(heads(attn.to_q(hidden)))
            k = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(enc))), attn.norm_k(heads(attn.to_k(hidden)))], 1)
        else:
            q_img = attn.norm_q(heads(attn.to_q(hidden[:, n_txt:])))
            k = attn.norm_k(heads(attn.to_k(hidden)))
        return q_img, k
