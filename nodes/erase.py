"""Concept-erase training inside ComfyUI: an erase-LoRA trained on the MODEL, saved under models/loras/erase_flux/."""
from __future__ import annotations

import logging

import torch
from comfy_api.latest import io

from erase_core.comfy.jobs import concept_set, erase, loss_curve, save_lora
from erase_core.comfy.world import ComfyWorld
from erase_core.render import to_pil
from erase_core.train import EA_METHODS, EraseConfig

from .common import CATEGORY, Progress, apply_lora, check_name, checkpoints_dir, latent_hw, loras_dir, pil_to_image

log = logging.getLogger("erase_flux.nodes")
METHODS = [*EA_METHODS, "realera", "esd", "ca", "uce"]


class EraseConcept(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        d = EraseConfig()
        return io.Schema(
            node_id="EraseFlux_EraseConcept", display_name="Erase Concept (train LoRA, Flux)",
            category=f"{CATEGORY}/train",
            description="Trains an erase-LoRA (EraseAnything: ESD erase + attention suppression, preservation and "
                        "reverse self-contrastive terms, bi-level) on the text-stream projections of the MODEL, saves "
                        "it to models/loras/erase_flux/ and returns the model with it applied.",
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The Flux MODEL to erase from (stays untouched; a clone is trained)."),
                io.Clip.Input("clip", tooltip="The matching text encoder (prompts, synonyms, token positions)."),
                io.String.Input("concept", default="red", tooltip="The word or phrase to erase."),
                io.String.Input("prompts", default="", multiline=True, tooltip="Prompts that show the concept, one "
                                "per line, each containing the concept word. Empty = 'a photo of <concept>' and two more."),
                io.Combo.Input("method", options=METHODS, default=d.method, tooltip="eraseanything: the full "
                               "bi-level method; +neighbors adds RealEra's mined neighbours to the erase set; realera: "
                               "closed-form K/V edit with neighbours, then LoRA noise alignment; esd / ca: baselines; "
                               "uce: the closed-form edit alone (seconds, no training)."),
                io.Int.Input("steps", default=d.steps, min=1, max=10000, tooltip="Outer steps (each: one erase and "
                             "one preserve optimiser step)."),
                io.Float.Input("lr", default=d.lr, min=1e-6, max=1.0, step=1e-4, tooltip="AdamW learning rate."),
                io.Int.Input("rank", default=d.rank, min=1, max=128, tooltip="LoRA rank (alpha = rank)."),
                io.Float.Input("eta", default=d.eta, min=0.0, max=10.0, step=0.1, tooltip="ESD negative guidance η "
                               "(paper 1.0)."),
                io.Float.Input("lambda_attn", default=d.lambda_attn, min=0.0, max=100.0, step=0.1,
                               tooltip="Weight of the attention-suppression loss on the concept's token columns."),
                io.Float.Input("lambda_preserve", default=d.lambda_preserve, min=0.0, max=100.0, step=0.1,
                               tooltip="Weight of the preservation loss on the preserved prompts."),
                io.Float.Input("lambda_rsc", default=d.lambda_rsc, min=0.0, max=10.0, step=0.01,
                               tooltip="Weight of the reverse self-contrastive loss (synonym vs irrelevant concepts)."),
                io.String.Input("synonyms", default="auto", tooltip="Comma-separated synonyms, or 'auto' (offline "
                                "WordNet)."),
                io.String.Input("irrelevant", default="auto", tooltip="Comma-separated unrelated concepts to keep "
                                "apart from the concept, or 'auto' (WordNet, three similarity bands)."),
                io.String.Input("preserve_prompts", default="", multiline=True, tooltip="Prompts whose images must "
                                "not change, one per line (e.g. neighbours of the concept). Empty: the concept's "
                                "prompts with each irrelevant concept in place of the word. Set lambda_preserve to 0 "
                                "to preserve nothing."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seed of everything random in training."),
                io.Int.Input("width", default=32, min=16, max=2048, step=16, tooltip="Training image width in "
                             "pixels (sandbox: 32; Flux: 512 fits 24 GB with fp8 weights)."),
                io.Int.Input("height", default=32, min=16, max=2048, step=16, tooltip="Training image height."),
                io.Float.Input("cfg", default=3.0, min=1.0, max=20.0, step=0.1, tooltip="CFG of the base-model "
                               "samples the trainer makes (1 for Flux-dev, 3 for the sandbox)."),
                io.String.Input("lora_name", default="erase_red", tooltip="File name under models/loras/erase_flux/ "
                                "(letters, digits, _ - .)."),
                io.Boolean.Input("resume", default=False, tooltip="Continue from the checkpoint a Cancel left for "
                                 "this lora_name (output/erase_flux/checkpoints/); steps may be raised, nothing else "
                                 "may change."),
                io.Int.Input("preview_every", default=10, min=0, max=1000, tooltip="Show a sample of the concept "
                             "prompt in the progress bar every N steps (0 = off)."),
                io.Vae.Input("vae", optional=True, tooltip="Decodes the preview samples."),
                io.Boolean.Input("low_memory", default=False, optional=True, tooltip="Run the reverse "
                                 "self-contrastive term one prompt at a time (same gradient, one more forward). "
                                 "Flux-dev with fp8 weights at 1024²: peak 34.4 → 20.7 GiB, fits a 24 GB card; "
                                 "each outer step 6 % slower at 1024², 37 % at 512² (H100)."),
            ],
            outputs=[io.Model.Output(display_name="model"), io.String.Output(display_name="lora_name"),
                     io.Image.Output(display_name="loss_curves")])

    @classmethod
    def validate_inputs(cls, concept=None, prompts=None, lora_name=None, **kw):
        if concept is not None and not concept.strip():
            return "concept is empty: type the word to erase, e.g. 'red'"
        if concept and prompts:
            bad = [p for p in prompts.splitlines() if p.strip() and concept.strip().lower() not in p.lower()]
            if bad:
                return f"prompt {bad[0]!r} does not contain the concept {concept!r}; every prompt must name it"
        if lora_name is not None:
            try:
                check_name(lora_name)
            except ValueError as exc:
                return str(exc)
        return True

    @classmethod
    def execute(cls, model, clip, concept, prompts, method, steps, lr, rank, eta, lambda_attn, lambda_preserve,
                lambda_rsc, synonyms, irrelevant, preserve_prompts, seed, width, height, cfg, lora_name, resume,
                preview_every, vae=None, low_memory=False) -> io.NodeOutput:
        import comfy.model_management

        stem = check_name(lora_name)
        out = loras_dir() / f"{stem}.safetensors"
        ckpt = checkpoints_dir() / f"{stem}.pt"
        ckpt.parent.mkdir(parents=True, exist_ok=True)
        config = EraseConfig(method="esd" if method == "uce" else method, steps=steps, lr=lr, rank=rank, alpha=float(rank), eta=eta,
                             lambda_attn=lambda_attn, lambda_preserve=lambda_preserve, lambda_rsc=lambda_rsc,
                             seed=seed, preview_every=preview_every if vae is not None else 0,
                             rsc_chunk=1 if low_memory else 0)
        progress = Progress(steps)
        with torch.inference_mode(False), torch.enable_grad():
            world = ComfyWorld(model, clip, latent_hw(width, height, vae), vae=vae, cfg_scale=cfg)
            cs = concept_set(concept, [p.strip() for p in prompts.splitlines() if p.strip()], synonyms, irrelevant,
                             [p.strip() for p in preserve_prompts.splitlines() if p.strip()], seed)
            log.info("erasing %r: synonyms %s, irrelevant %s, preserved %s", cs.word, list(cs.synonyms),
                     list(cs.irrelevant), list(cs.preserve_prompts))

            def report(entry):
                preview = to_pil(entry.preview, 4) if entry.preview is not None else None
                progress.update(entry.step + 1, preview)

            job = erase(world, cs, config, progress=report, should_stop=progress.should_stop, checkpoint_path=ckpt,
                        resume=resume, method=method)
        if job.result.interrupted:
            log.info("erase interrupted; resumable checkpoint at %s", ckpt)
            raise comfy.model_management.InterruptProcessingException()
        save_lora(job.lora, out, overwrite=True)
        ckpt.unlink(missing_ok=True)
        log.info("saved %s", out)
        name = f"erase_flux/{out.name}"
        return io.NodeOutput(apply_lora(model, out), name, pil_to_image(loss_curve(job.result.history)))
