"""Capture overhead: a forward with the attention patch capturing every dual-stream block vs a plain forward.

Runs both interleaved in one process on one thread and reports the ratio of the minimum thread CPU times.
Usage: python bench/attention_overhead.py [--repeats N] [--out FILE.json]
"""
import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from diffusers import FluxTransformer2DModel  # noqa: E402

from erase_core.flux.attention import AttentionPatch  # noqa: E402
from erase_core.flux.backend import DiffusersFlux, TextCond  # noqa: E402
from erase_core.sandbox.models import SandboxConfig  # noqa: E402

CASES = {
    # name: (transformer kwargs, batch, latent h=w, text tokens)
    "sandbox (hidden 128, 3+3 blocks), 8x8 latent, 32 text tokens, batch 64":
        (SandboxConfig().transformer_kwargs(), 64, 8, 32),
    "wider (hidden 512, 4+4 blocks), 32x32 latent, 128 text tokens, batch 1":
        (dict(patch_size=1, in_channels=64, num_layers=4, num_single_layers=4, attention_head_dim=128,
              num_attention_heads=4, joint_attention_dim=256, pooled_projection_dim=64, guidance_embeds=False,
              axes_dims_rope=(16, 56, 56)), 1, 32, 128),
}


def cpu_ms(fn) -> float:
    t = time.thread_time()
    fn()
    return 1000 * (time.thread_time() - t)


def run_case(kwargs, batch, hw, n_txt, repeats):
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**kwargs).eval()
    be = DiffusersFlux(model, (hw, hw))
    x = torch.randn(batch, (hw // 2) ** 2, kwargs["in_channels"])
    text = TextCond(torch.randn(batch, n_txt, kwargs["joint_attention_dim"]),
                    torch.randn(batch, kwargs["pooled_projection_dim"]))
    t = torch.full((batch,), 0.5)
    tokens = [3, 4, 5]

    def plain():
        with torch.no_grad():
            be.velocity(x, t, text)

    def captured():
        with torch.no_grad(), AttentionPatch(model, tokens):
            be.velocity(x, t, text)

    plain()  # warm up
    captured()
    a, b = [], []
    for _ in range(repeats):
        a.append(cpu_ms(plain))
        b.append(cpu_ms(captured))
    return {"plain_ms": min(a), "capture_ms": min(b), "ratio": min(b) / min(a)}


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    torch.set_num_threads(1)
    results = {name: run_case(*case, args.repeats) for name, case in CASES.items()}
    for name, r in results.items():
        print(f"{name}: plain {r['plain_ms']:.1f} ms, capture {r['capture_ms']:.1f} ms, ratio {r['ratio']:.3f}x")
    if args.out:
        args.out.write_text(json.dumps({"torch": torch.__version__, "threads": 1, "results": results}, indent=2))


if __name__ == "__main__":
    main()
