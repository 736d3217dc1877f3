"""Merging several erase-LoRAs into one (normalized / sum / concat / closed_form / distill), with an interference
report."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from erase_core.lora_file import read_lora_file, write_lora_file
from erase_core.merge import MergeConfig, interference, interference_summary, merge
from erase_core.merge_distill import DistillConfig
from erase_core.render import matrix_image

from erase_core.comfy.jobs import split_list

from .common import CATEGORY, Progress, check_name, latent_hw, lora_choices, lora_path, loras_dir, pil_to_image

log = logging.getLogger("erase_flux.nodes")
SLOTS = 4
NODE_MODES = ["normalized", "sum", "concat", "closed_form", "distill"]
NONE = "none"


class MergeLoras(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        choices = [NONE, *lora_choices()]
        inputs = []
        for i in range(1, SLOTS + 1):
            inputs.append(io.Combo.Input(f"lora_{i}", options=choices, default=NONE,
                                         tooltip=f"LoRA #{i} from models/loras ('none' = unused slot)."))
            inputs.append(io.Float.Input(f"weight_{i}", default=1.0, min=-4.0, max=4.0, step=0.05,
                                         tooltip=f"Weight of LoRA #{i} (normalized mode divides by the sum)."))
        inputs += [
            io.Combo.Input("mode", options=NODE_MODES, default="concat",
                           tooltip="concat: stack the LoRAs' factors (exact sum of their edits, rank adds up); "
                                   "sum: the same sum refactored to the largest input rank by SVD; normalized: "
                                   "weights divided by their sum (each edit diluted, the classic merge); closed_form: "
                                   "one least-squares edit that reproduces every LoRA on its own concept's inputs "
                                   "and keeps the preserved words' (needs model and clip); distill: closed_form, "
                                   "then trained through the model to act like each LoRA on its concept's prompts "
                                   "and like the base on the preserved words' (needs model and clip; the best "
                                   "merge on the sandbox, and the slowest)."),
            io.Int.Input("rank", default=0, min=0, max=1024, tooltip="Refactor the result to this rank (0 = the "
                         "mode's default)."),
            io.String.Input("name", default="merged_erase", tooltip="File name of the merged LoRA under "
                            "models/loras/erase_flux/."),
            io.String.Input("preserve", default="", optional=True, tooltip="closed_form/distill: words whose behaviour "
                            "must not change, comma-separated (e.g. the erased concepts' neighbours). For distill "
                            "list their synonyms too: it keeps exactly what it is shown (on the sandbox, kept as "
                            "'north' alone, 'top' was erased along with the merged 'topright')."),
            io.Float.Input("preserve_weight", default=1000.0, min=0.0, max=1e6, step=10.0, optional=True,
                           tooltip="closed_form/distill: λ, how hard the preserved words are kept (measured on the sandbox: "
                                   "1000 kept other concepts at 94 % of base)."),
            io.Int.Input("width", default=32, min=16, max=2048, step=16, optional=True, tooltip="closed_form/distill: image "
                         "width of the "
                         "base-model samples its inputs are read from."),
            io.Int.Input("height", default=32, min=16, max=2048, step=16, optional=True,
                         tooltip="closed_form/distill: image height."),
            # distill's widgets come after the older ones: saved UI workflows keep their widget values by position
            io.Int.Input("distill_steps", default=1500, min=1, max=100000, optional=True,
                         tooltip="distill: training steps, each one forward and backward of the model on "
                                 "2 × distill_batch rows (sandbox: 1500 kept 19 of 20 erasures at ≥ 90 %)."),
            io.Int.Input("distill_batch", default=16, min=1, max=256, optional=True,
                         tooltip="distill: rows per step from the LoRAs' prompts (and as many preserved). On a "
                                 "real Flux lower it to fit memory: 1–2 at 1024²."),
            io.Int.Input("distill_images", default=64, min=2, max=4096, optional=True,
                         tooltip="distill: images sampled per LoRA before training (half by the base model, half "
                                 "with the LoRA; four times as many for the preserved words). The slow part on a "
                                 "real Flux: 20 LoRAs × 64 images at 20 steps is 25,600 model passes."),
            io.Float.Input("cfg", default=1.0, min=1.0, max=20.0, step=0.1, optional=True,
                           tooltip="distill: classifier-free guidance of the samples it trains on (1 for Flux-dev; "
                                   "the sandbox uses 3)."),
            io.Int.Input("distill_noisings", default=8, min=1, max=64, optional=True,
                         tooltip="distill: training rows per sampled image, each noised at its own time (cheap: a "
                                 "row costs one model pass, an image a sampler run; sandbox, 20 LoRAs: 8 kept all "
                                 "20 erasures at ≥ 90 % over three seeds, 1 kept 18). Each row is held in RAM, 2 MB "
                                 "at 1024²: 4 LoRAs × 64 images + 256 preserved × 8 is about 8 GB; lower it (or "
                                 "distill_images) if memory is short."),
            io.Model.Input("model", optional=True, tooltip="closed_form/distill: the base MODEL the LoRAs were trained "
                           "on."),
            io.Clip.Input("clip", optional=True, tooltip="closed_form/distill: its text encoder."),
            io.String.Input("lora_a", optional=True, force_input=True, tooltip="Optional: a LoRA name from another "
                            "node (e.g. Erase Concept's lora_name output), merged with weight 1."),
            io.String.Input("lora_b", optional=True, force_input=True, tooltip="Optional: a second LoRA name from "
                            "another node, merged with weight 1."),
        ]
        return io.Schema(
            node_id="EraseFlux_MergeLoras", display_name="Merge Erase LoRAs (Flux)", category=f"{CATEGORY}/lora",
            description="Merges up to four LoRAs of the same model into one file (saved under "
                        "models/loras/erase_flux/) and shows how much their edits overlap per block.",
            is_output_node=True, inputs=inputs,
            outputs=[io.String.Output(display_name="lora_name"), io.Image.Output(display_name="interference")])

    @classmethod
    def validate_inputs(cls, name=None, **kw):
        chosen = [kw.get(f"lora_{i}") for i in range(1, SLOTS + 1)]
        linked = "lora_a" in kw or "lora_b" in kw
        if not linked and all(c is not None for c in chosen) and sum(c != NONE for c in chosen) < 2:
            return "choose at least two LoRAs to merge (lora_1 … lora_4, or linked lora_a / lora_b)"
        if name is not None:
            try:
                check_name(name, "name")
            except ValueError as exc:
                return str(exc)
        return True

    @classmethod
    def execute(cls, mode, rank, name, preserve="", preserve_weight=1000.0, distill_steps=1500, distill_batch=16,
                distill_images=64, cfg=1.0, distill_noisings=8, width=32, height=32, model=None, clip=None,
                lora_a=None, lora_b=None, **kw) -> io.NodeOutput:
        picks = [(kw[f"lora_{i}"], kw[f"weight_{i}"]) for i in range(1, SLOTS + 1) if kw[f"lora_{i}"] != NONE]
        picks += [(n, 1.0) for n in (lora_a, lora_b) if n]
        if len(picks) < 2:
            raise ValueError("choose at least two LoRAs to merge (lora_1 … lora_4, or linked lora_a / lora_b)")
        loras = [read_lora_file(lora_path(n)) for n, _ in picks]
        names = [n for n, _ in picks]
        config = MergeConfig(mode=mode, weights=tuple(w for _, w in picks), rank=rank or None,
                             preserve_weight=preserve_weight)
        if mode in ("closed_form", "distill"):
            if model is None or clip is None:
                raise ValueError(f"mode {mode} needs the model and clip inputs connected (the base model the "
                                 "LoRAs were trained on); or choose concat / sum / normalized")
            distill = DistillConfig(steps=distill_steps, batch=distill_batch, images=distill_images,
                                    preserve_images=4 * distill_images, noisings=distill_noisings)
            merged = _model_merge(loras, config, names, split_list(preserve), distill, cfg,
                                  latent_hw(width, height, model=model), model, clip)
        else:
            merged = merge(loras, config, names=names)
        out = loras_dir() / f"{check_name(name, 'name')}.safetensors"
        out.parent.mkdir(parents=True, exist_ok=True)
        write_lora_file(merged, out, overwrite=True)
        cos = interference(loras)
        summary = interference_summary(cos)
        worst = max(summary, key=lambda b: summary[b]["max_abs_cos"])
        mean = sum(c.abs() for c in cos.values()) / len(cos)
        short = [n.rsplit("/", 1)[-1].removesuffix(".safetensors")[:24] for n in names]
        img = matrix_image(mean, short, f"|cos| of the LoRAs' edits, mean over blocks (max in {worst}: "
                                        f"{summary[worst]['max_abs_cos']:.2f})")
        log.info("merged %s (%s) → %s", names, mode, out)
        return io.NodeOutput(f"erase_flux/{out.name}", pil_to_image(img))


def _model_merge(loras, config: MergeConfig, names, preserve: list[str], distill: DistillConfig, cfg: float, hw,
                 model, clip):
    """closed_form / distill: inputs (and, for distill, training) on the connected MODEL."""
    import torch

    from erase_core.comfy.jobs import closed_form_merge_inputs, distill_merge_prompts
    from erase_core.comfy.world import ComfyWorld
    from erase_core.merge_distill import distill_merge
    from erase_core.train import trainable_copy

    with torch.inference_mode(False):
        world = ComfyWorld(model, clip, hw, cfg_scale=cfg if config.mode == "distill" else 1.0)
        concept_inputs, preserve_inputs = closed_form_merge_inputs(world, loras, preserve)
        if config.mode == "closed_form":
            return merge(loras, config, concept_inputs, preserve_inputs, names=names)
        prompts, keep = distill_merge_prompts(loras, preserve)
        progress = Progress(distill.steps)

        def report(step: int, _losses) -> None:
            if progress.should_stop():  # Cancel: nothing is written
                import comfy.model_management

                raise comfy.model_management.InterruptProcessingException()
            progress.update(step + 1)

        with torch.enable_grad():
            merged, _ = distill_merge(world, loras, config, prompts, keep, concept_inputs, preserve_inputs,
                                      distill, names, progress=report, transformer=trainable_copy(model))
        return merged
