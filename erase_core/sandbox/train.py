"""Seeded, reproducible training of the sandbox world: tokenizer → autoencoder → classifier → text encoder + Flux.

``python -m erase_core sandbox train --out DIR`` runs every stage; each stage writes its files atomically, so an
interrupted run keeps what finished.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import FluxTransformer2DModel

from ..flux.backend import DiffusersFlux, TextCond
from ..flux.flow import flow_target, noised, sample_timesteps
from ..flux.packing import pack_latents
from ..io import atomic_save_safetensors, atomic_write_text
from .models import AutoEncoder, Classifier, SandboxConfig, TextEncoder, blur
from .prompts import corpus, training_example
from .tokenizer import load_tokenizer, train_tokenizer
from .world import AXES, random_scene, render

log = logging.getLogger("erase_flux.sandbox")


@dataclass(frozen=True)
class SandboxTrainConfig:
    """Knobs of the sandbox training run."""

    seed: int = 0
    ae_steps: int = 800
    ae_batch: int = 64
    classifier_steps: int = 1000
    flux_steps: int = 4000
    batch: int = 128
    lr: float = 5e-4
    warmup: int = 200
    ema: float = 0.999
    pooled_dropout: float = 0.5  # the CLIP-role vector is replaced by the empty prompt's this often
    null_prompt: float = 0.1  # the whole prompt is dropped (for classifier-free guidance)
    t_mean: float = 0.0  # logit-normal location of training times (>0 favours high noise)
    stop_at: int | None = None  # end this run after this step (the schedule still spans flux_steps; resumable)
    log_every: int = 50
    checkpoint_every: int = 500
    device: str = "cpu"  # of the transformer stage

    def __post_init__(self) -> None:
        for name in ("ae_steps", "ae_batch", "classifier_steps", "flux_steps", "batch", "log_every", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be ≥ 1")
        for name in ("pooled_dropout", "null_prompt", "ema"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"{name}={getattr(self, name)} must be in [0, 1)")


def scene_batch(rng: random.Random, n: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    scenes = [random_scene(rng) for _ in range(n)]
    imgs = torch.stack([render(s) for s in scenes])
    labels = torch.tensor([s.labels() for s in scenes])
    return imgs, {axis: labels[:, i] for i, axis in enumerate(AXES)}


def _fit(module: torch.nn.Module, steps: int, lr: float, loss_fn, name: str, log_every: int,
         weight_decay: float = 0.0) -> None:
    """AdamW with a cosine learning rate over ``steps`` calls of ``loss_fn()``."""
    opt = torch.optim.AdamW(module.parameters(), lr=lr, weight_decay=weight_decay)
    for step in range(steps):
        loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        for g in opt.param_groups:
            g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        if step % log_every == 0:
            log.info("%s step %d loss %.4f", name, step, loss.item())


def train_autoencoder(cfg: SandboxConfig, tc: SandboxTrainConfig) -> AutoEncoder:
    """Reconstruction with latent noise and a small latent penalty, so the latent is smooth and the decoder robust."""
    torch.manual_seed(tc.seed)
    rng = random.Random(tc.seed)
    ae = AutoEncoder(cfg)

    def loss_fn() -> torch.Tensor:
        imgs, _ = scene_batch(rng, tc.ae_batch)
        z = ae.encode_raw(imgs)
        rec = ae.decode_raw(z + 0.1 * z.detach().std() * torch.randn_like(z))
        return F.l1_loss(rec, imgs) + F.mse_loss(rec, imgs) + 1e-3 * z.pow(2).mean()

    _fit(ae, tc.ae_steps, 2e-3, loss_fn, "autoencoder", tc.log_every)
    ae.eval().requires_grad_(False)
    with torch.no_grad():
        z = torch.cat([ae.encode_raw(scene_batch(rng, 256)[0]) for _ in range(8)])
    ae.shift, ae.scale = z.mean().item(), 1.0 / z.std().item()
    return ae


def train_classifier(ae: AutoEncoder, tc: SandboxTrainConfig) -> tuple[Classifier, dict[str, float]]:
    """Classifier on clean, blurred, noisy and autoencoder-round-tripped images; returns held-out accuracy."""
    torch.manual_seed(tc.seed + 1)
    rng = random.Random(tc.seed + 1)
    clf = Classifier({a: len(v) for a, v in AXES.items()})

    def loss_fn() -> torch.Tensor:
        imgs, labels = scene_batch(rng, tc.batch)
        with torch.no_grad():
            q = tc.batch // 3
            lat = ae.encode(imgs[:q])
            imgs[:q] = ae.decode(lat + rng.uniform(0.0, 0.5) * torch.randn_like(lat))
            imgs[q:2 * q] = blur(imgs[q:2 * q], rng.uniform(0.3, 1.2))
            imgs = (imgs + rng.uniform(0.0, 0.08) * torch.randn_like(imgs)).clamp(0, 1)
        logits = clf(imgs)
        return sum(F.cross_entropy(logits[a], labels[a]) for a in AXES)

    _fit(clf, tc.classifier_steps, 2e-3, loss_fn, "classifier", tc.log_every, weight_decay=0.01)
    clf.eval().requires_grad_(False)
    return clf, classifier_accuracy(clf, seed=tc.seed + 99)


@torch.no_grad()
def classifier_accuracy(clf: Classifier, seed: int, n: int = 2048) -> dict[str, float]:
    """Accuracy per axis on clean held-out renders."""
    imgs, labels = scene_batch(random.Random(seed), n)
    logits = clf(imgs.to(next(clf.parameters()).device))
    return {a: (logits[a].argmax(-1).cpu() == labels[a]).float().mean().item() for a in AXES}


def _lr(step: int, tc: SandboxTrainConfig) -> float:
    if step < tc.warmup:
        return tc.lr * (step + 1) / tc.warmup
    p = (step - tc.warmup) / max(1, tc.flux_steps - tc.warmup)
    return tc.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * p)))


def train_flux(cfg: SandboxConfig, tc: SandboxTrainConfig, tokenizer, ae: AutoEncoder, out: Path,
               resume: bool = True) -> tuple[TextEncoder, FluxTransformer2DModel]:
    """Rectified-flow training of the Flux transformer jointly with the text encoder, with an EMA copy."""
    torch.manual_seed(tc.seed + 2)
    rng = random.Random(tc.seed + 2)
    te = TextEncoder(cfg)
    vocab = tokenizer.get_vocab()
    te.set_vocabulary([p for p, _ in sorted(vocab.items(), key=lambda kv: kv[1])])
    tr = FluxTransformer2DModel(**cfg.transformer_kwargs())
    dev = torch.device(tc.device)
    te, tr, ae = te.to(dev), tr.to(dev), ae.to(dev)
    params = list(te.parameters()) + list(tr.parameters())
    opt = torch.optim.AdamW(params, lr=tc.lr, weight_decay=0.01, betas=(0.9, 0.99))
    ema_te, ema_tr = copy.deepcopy(te).requires_grad_(False), copy.deepcopy(tr).requires_grad_(False)
    start = 0
    ckpt = out / "flux_checkpoint.pt"
    if resume and ckpt.exists():
        # our own checkpoint, written by this function; weights_only refuses anything but tensors and containers
        state = torch.load(ckpt, weights_only=True, map_location=dev)
        for module, key in ((te, "te"), (tr, "tr"), (ema_te, "ema_te"), (ema_tr, "ema_tr"), (opt, "opt")):
            module.load_state_dict(state[key])
        start = state["step"]
        rng.setstate(_tuple_state(state["rng"]))
        torch.set_rng_state(state["torch_rng"].cpu())
        log.info("resumed flux training at step %d", start)
    backend = DiffusersFlux(tr, (cfg.latent_size, cfg.latent_size))
    empty_ids = torch.tensor(tokenizer.encode("").ids, device=dev)
    t0, seen = time.time(), 0.0
    end = min(tc.flux_steps, tc.stop_at or tc.flux_steps)
    for step in range(start, end):
        examples = [training_example(rng) for _ in range(tc.batch)]
        prompts = ["" if rng.random() < tc.null_prompt else p for p, _ in examples]
        with torch.no_grad():
            x0 = pack_latents(ae.encode(torch.stack([render(s) for _, s in examples]).to(dev)))
        ids = torch.tensor([e.ids for e in tokenizer.encode_batch(prompts)], device=dev)
        pooled_ids = ids.clone()
        drop = (torch.rand(len(ids)) < tc.pooled_dropout).to(dev)
        pooled_ids[drop] = empty_ids
        text = TextCond(te.sequence(ids), te.pooled(pooled_ids))
        noise = torch.randn_like(x0)
        t = sample_timesteps(len(x0), mean=tc.t_mean).to(dev)
        loss = F.mse_loss(backend.velocity(noised(x0, noise, t), t, text), flow_target(x0, noise))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for g in opt.param_groups:
            g["lr"] = _lr(step, tc)
        opt.step()
        decay = min(tc.ema, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, live in ((ema_te, te), (ema_tr, tr)):
                for pe, pl in zip(ema.parameters(), live.parameters()):
                    pe.lerp_(pl, 1 - decay)
        seen = 0.98 * seen + 0.02 * loss.item() if step > start else loss.item()
        if step % tc.log_every == 0:
            log.info("flux step %d loss %.4f (avg %.4f) lr %.2e %.2fs/step", step, loss.item(), seen,
                     _lr(step, tc), (time.time() - t0) / (step - start + 1))
        if (step + 1) % tc.checkpoint_every == 0 or step + 1 == end:
            state = _cpu({"te": te.state_dict(), "tr": tr.state_dict(), "ema_te": ema_te.state_dict(),
                          "ema_tr": ema_tr.state_dict(), "opt": opt.state_dict(), "step": step + 1,
                          "rng": _list_state(rng.getstate()), "torch_rng": torch.get_rng_state()})
            tmp = ckpt.with_suffix(".tmp")
            torch.save(state, tmp)
            tmp.replace(ckpt)
            save_text_and_flux(out, ema_te, ema_tr)
    return ema_te, ema_tr


def _cpu(obj):
    """Every tensor of a nested state moved to the CPU (checkpoints load on any device)."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_cpu(v) for v in obj)
    return obj


def _list_state(state):
    return [list(s) if isinstance(s, tuple) else s for s in state]


def _tuple_state(state):
    return tuple(tuple(s) if isinstance(s, list) else s for s in state)


def save_text_and_flux(out: Path, te: TextEncoder, tr: FluxTransformer2DModel) -> None:
    atomic_save_safetensors({k: v.half().cpu() for k, v in te.state_dict().items()}, out / "text_encoder.safetensors")
    tmp = out / "transformer.tmp"
    copy.deepcopy(tr).half().cpu().save_pretrained(str(tmp), safe_serialization=True)
    final = out / "transformer"
    if final.exists():
        for f in final.iterdir():
            f.unlink()
        final.rmdir()
    tmp.replace(final)


def train_sandbox(out: str | Path, tc: SandboxTrainConfig = SandboxTrainConfig(), cfg: SandboxConfig = SandboxConfig(),
                  stages: tuple[str, ...] = ("tokenizer", "autoencoder", "classifier", "flux")) -> dict:
    """Run the training stages into ``out``; returns a report (timings, classifier accuracy)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"train_config": tc.__dict__}
    t = time.time()
    if "tokenizer" in stages:
        tok = train_tokenizer(corpus(20000, seed=tc.seed), vocab_size=cfg.vocab_size)
        atomic_write_text(out / "tokenizer.json", tok.to_str())
    tokenizer = load_tokenizer(out / "tokenizer.json", cfg.max_tokens)
    report["seconds_tokenizer"] = time.time() - t
    t = time.time()
    if "autoencoder" in stages:
        ae = train_autoencoder(cfg, tc)
        cfg = SandboxConfig(**{**cfg.to_dict(), "latent_shift": ae.shift, "latent_scale": ae.scale})
        atomic_save_safetensors({k: v.half() for k, v in ae.state_dict().items()}, out / "autoencoder.safetensors")
        atomic_write_text(out / "config.json", json.dumps(cfg.to_dict(), indent=2))
    else:
        cfg = SandboxConfig(**json.loads((out / "config.json").read_text()))
        ae = AutoEncoder(cfg)
        from .pipeline import _load_module
        _load_module(ae, out / "autoencoder.safetensors")
    ae.eval().requires_grad_(False)
    report["seconds_autoencoder"] = time.time() - t
    t = time.time()
    if "classifier" in stages:
        clf, acc = train_classifier(ae, tc)
        atomic_save_safetensors({k: v.half() for k, v in clf.state_dict().items()}, out / "classifier.safetensors")
        report["classifier_clean_accuracy"] = acc
        log.info("classifier held-out clean accuracy %s", acc)
    report["seconds_classifier"] = time.time() - t
    t = time.time()
    if "flux" in stages:
        train_flux(cfg, tc, tokenizer, ae, out)
    report["seconds_flux"] = time.time() - t
    atomic_write_text(out / "train_report.json", json.dumps(report, indent=2))
    return report
