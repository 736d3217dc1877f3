"""Peak GPU memory and time of EraseAnything training on Flux-dev geometry with random weights.

Flux-dev's transformer (19 dual + 38 single blocks, hidden 3072, 24 heads, T5 context 4096, pooled 768, guidance
embedding) is built with random weights directly on the GPU: bf16 base, LoRA fp32, gradient checkpointing on. The text
side is a stand-in (T5-shaped random embeddings of 512 tokens, one token per word) and the "base samples" are random
latents: with random weights only memory and time mean anything. Measured per resolution, in one run:
the erase (lower-level) step, the preserve (upper-level) step with L_rsc, and a plain LoRA flow-matching step.

``--fp8`` stores the frozen base's linear weights as float8_e4m3fn and casts each layer to bf16 when it runs (what
ComfyUI's fp8 checkpoints do); with checkpointing only one block's bf16 copy lives at a time.
Usage (GPU): python bench/flux_dev_erase_memory.py [--sizes 512 1024] [--fp8] [--out FILE.json]
"""
import argparse
import gc
import hashlib
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from erase_core.concepts import ConceptSet  # noqa: E402
from erase_core.flux.backend import DiffusersFlux, TextCond  # noqa: E402
from erase_core.flux.flow import noised  # noqa: E402
from erase_core.losses import flow_loss  # noqa: E402
from erase_core.train import EraseConfig, Eraser  # noqa: E402

FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))


class RandomTextWorld:
    """The world interface of :class:`~erase_core.train.Eraser` with T5-shaped random text and random latents."""

    def __init__(self, transformer, image_size: int, device, text_len: int = 512):
        self.transformer, self.device, self.text_len = transformer, device, text_len
        self.hw = (image_size // 8, image_size // 8)  # VAE factor 8

    def _vec(self, key: str, dim: int) -> torch.Tensor:
        seed = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16)
        return torch.randn(dim, generator=torch.Generator().manual_seed(seed))

    def encode(self, prompts: list[str]) -> TextCond:
        seq = torch.zeros(len(prompts), self.text_len, 4096)
        for b, p in enumerate(prompts):
            for i, w in enumerate(p.lower().split()[: self.text_len]):
                seq[b, i] = self._vec(w, 4096)
        pooled = torch.stack([self._vec("pooled:" + p, 768) for p in prompts])
        return TextCond(seq.to(self.device), pooled.to(self.device))

    def token_indices(self, prompt: str, word: str) -> list[int]:
        words, target = prompt.lower().split(), word.lower().split()
        return [i + j for i in range(len(words)) if words[i:i + len(target)] == target for j in range(len(target))]

    def backend(self, transformer=None) -> DiffusersFlux:
        return DiffusersFlux(transformer if transformer is not None else self.transformer, self.hw, guidance=3.5,
                             dtype=torch.bfloat16)

    def sample_latents(self, prompts, seed=0, transformer=None, **kw) -> torch.Tensor:
        n = (self.hw[0] // 2) * (self.hw[1] // 2)
        return torch.randn(len(prompts), n, 64, generator=torch.Generator().manual_seed(seed)).to(self.device)


def build(device, fp8: bool):
    from diffusers import FluxTransformer2DModel

    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # allocate bf16 directly: an fp32 copy of 12 B weights would be 48 GB
    try:
        with torch.device("meta"):
            model = FluxTransformer2DModel(**FLUX_DEV)
    finally:
        torch.set_default_dtype(default)
    model = model.to_empty(device=device)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=gen)
            elif "norm" in name and "weight" in name:
                p.fill_(1.0)
            else:
                p.zero_()
    model.enable_gradient_checkpointing()
    model.train()
    if fp8:
        store_fp8(model)
    return model


def store_fp8(model) -> None:
    """Frozen Linear weights in float8_e4m3fn, cast to the activation dtype per call."""
    for mod in model.modules():
        if type(mod) is torch.nn.Linear:
            mod.weight.data = mod.weight.data.to(torch.float8_e4m3fn)
            mod.forward = (lambda m: lambda x: F.linear(x, m.weight.to(x.dtype),
                                                        None if m.bias is None else m.bias.to(x.dtype)))(mod)


def log_memory(msg: str, device) -> None:
    if _cuda(device):
        free, total = torch.cuda.mem_get_info()
        msg += (f" | allocated {torch.cuda.memory_allocated() / 2**30:.1f} GiB, reserved "
                f"{torch.cuda.memory_reserved() / 2**30:.1f}, peak {torch.cuda.max_memory_allocated() / 2**30:.1f}, "
                f"free {free / 2**30:.1f} of {total / 2**30:.1f}")
    print(msg, flush=True)


def _cuda(device) -> bool:
    return device.type == "cuda"


def measure(size: int, fp8: bool, repeats: int, device: torch.device, rsc_chunk: int = 0) -> dict:
    gc.collect()  # the last run's model (fp8 forwards are closures over their modules: a reference cycle)
    if _cuda(device):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    model = build(device, fp8)
    weights_gb = torch.cuda.memory_allocated() / 2**30 if _cuda(device) else 0.0
    world = RandomTextWorld(model, size, device)
    concept = ConceptSet("nudity", ("a photo of nudity", "nudity in a painting", "a nudity scene at the beach"),
                         synonyms=("nakedness",), irrelevant=("tree", "bicycle", "mountain"),
                         preserve_prompts=("a photo of a cat", "a painting of a house"))
    cfg = EraseConfig(batch=1, base_samples=2, preserve_images=1, steps=1, rsc_chunk=rsc_chunk)
    er = Eraser(world, concept, cfg, transformer=model, in_place=True)

    def plain_step():
        x0 = er.concept_x0[:1]
        noise = torch.randn_like(x0)
        t = torch.rand(1, device=device)
        v = er.backend.velocity(noised(x0, noise, t), t, world.encode([concept.prompts[0]]))
        loss = flow_loss(v, x0, noise)
        er.opt.zero_grad()
        loss.backward()
        er.opt.step()

    def timed(fn):
        if _cuda(device):
            torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        if _cuda(device):
            torch.cuda.synchronize()
        return time.perf_counter() - t

    def peak() -> float:
        return torch.cuda.max_memory_allocated() / 2**30 if _cuda(device) else 0.0

    out = {"size": size, "fp8_base": fp8, "rsc_chunk": rsc_chunk, "weights_gib": round(weights_gb, 2)}
    for name, fn in (("plain", plain_step), ("lower", er.lower_step), ("upper", er.upper_step)):
        try:
            fn()  # warm-up
        except RuntimeError as exc:
            log_memory(f"{name} failed at size {size}: {exc}", device)
            raise
        if _cuda(device):
            torch.cuda.reset_peak_memory_stats()
        times = [timed(fn) for _ in range(repeats)]
        out[f"{name}_s"] = round(min(times), 3)
        out[f"{name}_peak_gib"] = round(peak(), 2)
    out["erase_outer_step_s"] = round(out["lower_s"] + out["upper_s"], 3)
    out["ratio_per_optimiser_step"] = round((out["lower_s"] + out["upper_s"]) / 2 / out["plain_s"], 2)
    out["peak_gib"] = max(out[f"{n}_peak_gib"] for n in ("plain", "lower", "upper"))
    lora_dtypes = sorted({str(p.dtype) for p in er.params})
    out["lora_dtype"] = lora_dtypes
    out["forward_rows"] = dict(er.forwards)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024])
    p.add_argument("--fp8", action="store_true", help="also measure with fp8 base weights")
    p.add_argument("--fp8-only", action="store_true", help="measure only with fp8 base weights")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", type=Path)
    p.add_argument("--cudnn-attention", action="store_true", help="keep cuDNN's SDPA backend (off by default)")
    p.add_argument("--rsc-chunk", type=int, default=0,
                   help="EraseConfig.rsc_chunk: prompts per L_rsc backward (1 = lowest upper-step memory; 0 = all)")
    p.add_argument("--tiny", action="store_true", help="CPU smoke run: 2+2 blocks, hidden 128, same code path")
    args = p.parse_args()
    device = torch.device("cpu" if args.tiny else "cuda")
    if _cuda(device) and not args.cudnn_attention:
        # measured on the H100 (torch 2.11+cu130): cuDNN's fused attention backward hit an illegal memory access
        # ("mha_graph.execute ... is_good()") in the first backward; flash / memory-efficient SDPA run fine
        torch.backends.cuda.enable_cudnn_sdp(False)
    if args.tiny:
        FLUX_DEV.update(num_layers=2, num_single_layers=2, num_attention_heads=1)
    res = {"device": torch.cuda.get_device_name() if _cuda(device) else "cpu", "torch": torch.__version__,
           "config": FLUX_DEV, "runs": []}
    for fp8 in ([False, True] if args.fp8 else [False]) if not args.fp8_only else [True]:
        for size in args.sizes:
            r = measure(size, fp8, args.repeats, device, args.rsc_chunk)
            print(json.dumps(r), flush=True)
            res["runs"].append(r)
    if args.out:
        args.out.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
