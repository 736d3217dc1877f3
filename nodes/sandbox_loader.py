"""The bundled sandbox world as ComfyUI MODEL, CLIP and VAE: every example workflow runs on a CPU, no downloads."""
from __future__ import annotations

from comfy_api.latest import io

from erase_core.comfy.sandbox import load_sandbox_comfy

from .common import CATEGORY


class SandboxLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EraseFlux_SandboxLoader", display_name="Sandbox World Loader (tiny Flux)",
            category=f"{CATEGORY}/sandbox",
            description="Loads the pack's tiny Flux-architecture sandbox model (32×32 images of coloured shapes in "
                        "placements), its text encoder and autoencoder. Use width/height 32 on our nodes and on stock "
                        "empty latents (EmptySD3LatentImage 32×32: KSampler resizes it to the 4× VAE's 8×8 latent). "
                        "Sample it as it was measured: euler / simple, 24 steps, cfg 3.5 (the loader sets the model's "
                        "time shift, 3, so KSampler walks the same schedule as the engine).",
            inputs=[],
            outputs=[io.Model.Output(display_name="model"), io.Clip.Output(display_name="clip"),
                     io.Vae.Output(display_name="vae")])

    @classmethod
    def execute(cls) -> io.NodeOutput:
        model, clip, vae = load_sandbox_comfy()
        return io.NodeOutput(model, clip, vae)
