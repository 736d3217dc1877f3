"""RealEra's neighbour mining made visible: what the model draws from embeddings near and beyond a concept."""
from __future__ import annotations

from comfy_api.latest import io

from erase_core.comfy.jobs import neighbour_grid
from erase_core.comfy.world import ComfyWorld
from erase_core.neighbours import NeighbourConfig

from .common import CATEGORY, latent_hw, pil_to_image


class NeighbourPreview(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        d = NeighbourConfig()
        return io.Schema(
            node_id="EraseFlux_NeighbourPreview", display_name="Neighbour Perturbation Preview (Flux)",
            category=f"{CATEGORY}/inspect",
            description="Moves the concept word's embedding e inside its prompt to e + η (RealEra): neighbours with "
                        "‖η‖ ≤ D1·‖e‖ and S2 ≤ cos ≤ S1, beyond-concept samples with D1 < ‖η‖/‖e‖ ≤ D2 and cos < S2, "
                        "and shows one image per sample (base, and erased beside it if given).",
            inputs=[
                io.Model.Input("model", tooltip="The base Flux MODEL."),
                io.Clip.Input("clip", tooltip="The matching text encoder."),
                io.Vae.Input("vae", tooltip="Decodes the images."),
                io.String.Input("prompt", default="a red circle", multiline=True, tooltip="A prompt naming the concept."),
                io.String.Input("concept", default="red", tooltip="The concept word in the prompt."),
                io.Float.Input("d1", default=d.d1, min=0.01, max=10.0, step=0.05, tooltip="Neighbour radius bound, "
                               "× ‖e‖."),
                io.Float.Input("d2", default=d.d2, min=0.02, max=20.0, step=0.05, tooltip="Beyond-concept radius "
                               "bound, × ‖e‖ (must exceed d1)."),
                io.Float.Input("s1", default=d.s1, min=-1.0, max=1.0, step=0.005, tooltip="Neighbours: cosine to "
                               "the concept at most S1 (not the concept itself)."),
                io.Float.Input("s2", default=d.s2, min=-1.0, max=1.0, step=0.01, tooltip="Neighbours: cosine at "
                               "least S2; beyond-concept samples: below S2."),
                io.Int.Input("neighbours", default=4, min=0, max=32, tooltip="How many neighbour samples (M)."),
                io.Int.Input("beyond", default=2, min=0, max=32, tooltip="How many beyond-concept samples (N)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seed of the samples and the noise."),
                io.Int.Input("width", default=32, min=16, max=2048, step=16, tooltip="Image width in pixels."),
                io.Int.Input("height", default=32, min=16, max=2048, step=16, tooltip="Image height in pixels."),
                io.Int.Input("sample_steps", default=12, min=1, max=100, tooltip="Euler steps per image."),
                io.Float.Input("cfg", default=3.0, min=1.0, max=20.0, step=0.1, tooltip="Classifier-free guidance."),
                io.Model.Input("erased_model", optional=True, tooltip="Optional erased MODEL: its image of each "
                               "sample is drawn beside the base one."),
            ],
            outputs=[io.Image.Output(display_name="grid")])

    @classmethod
    def validate_inputs(cls, concept=None, prompt=None, d1=None, d2=None, **kw):
        if concept is not None and not concept.strip():
            return "concept is empty: type the concept word of the prompt"
        if concept and prompt and concept.strip().lower() not in prompt.lower():
            return f"concept {concept!r} is not in the prompt {prompt!r}"
        if d1 is not None and d2 is not None and d2 <= d1:
            return f"d2={d2} must exceed d1={d1} (beyond-concept samples lie outside the neighbour radius)"
        return True

    @classmethod
    def execute(cls, model, clip, vae, prompt, concept, d1, d2, s1, s2, neighbours, beyond, seed, width, height,
                sample_steps, cfg, erased_model=None) -> io.NodeOutput:
        cfg_n = NeighbourConfig(d1=d1, d2=d2, s1=s1, s2=s2, m=neighbours, n=beyond, seed=seed)
        world = ComfyWorld(model, clip, latent_hw(width, height, vae), vae=vae, cfg_scale=cfg,
                           sample_steps=sample_steps)
        grid = neighbour_grid(world, prompt, concept.strip(), cfg_n, seed=seed, erased=erased_model)
        return io.NodeOutput(pil_to_image(grid))
