"""Merging several erase-LoRAs into one (normalized / sum / concat), with an interference report."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from erase_core.lora_file import read_lora_file, write_lora_file
from erase_core.merge import MergeConfig, interference, interference_summary, merge
from erase_core.render import matrix_image

from .common import CATEGORY, check_name, lora_choices, lora_path, loras_dir, pil_to_image

log = logging.getLogger("erase_flux.nodes")
SLOTS = 4
NODE_MODES = ["normalized", "sum", "concat"]
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
                                   "weights divided by their sum (each edit diluted, the classic merge)."),
            io.Int.Input("rank", default=0, min=0, max=1024, tooltip="Refactor the result to this rank (0 = the "
                         "mode's default)."),
            io.String.Input("name", default="merged_erase", tooltip="File name of the merged LoRA under "
                            "models/loras/erase_flux/."),
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
    def execute(cls, mode, rank, name, lora_a=None, lora_b=None, **kw) -> io.NodeOutput:
        picks = [(kw[f"lora_{i}"], kw[f"weight_{i}"]) for i in range(1, SLOTS + 1) if kw[f"lora_{i}"] != NONE]
        picks += [(n, 1.0) for n in (lora_a, lora_b) if n]
        if len(picks) < 2:
            raise ValueError("choose at least two LoRAs to merge (lora_1 … lora_4, or linked lora_a / lora_b)")
        loras = [read_lora_file(lora_path(n)) for n, _ in picks]
        names = [n for n, _ in picks]
        merged = merge(loras, MergeConfig(mode=mode, weights=tuple(w for _, w in picks), rank=rank or None),
                       names=names)
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
