"""Attention inspection (heatmaps of where the image looks at a word) and the deterministic suppression baseline."""
from __future__ import annotations

from comfy_api.latest import io

from erase_core.comfy.jobs import inspect, inspection_outputs, split_list, stack_vertically
from erase_core.comfy.world import ComfyWorld
from erase_core.flux.comfy import diffusion_model, suppressed_model

from .common import CATEGORY, latent_hw, pil_to_image

BLOCKS_TIP = ("Blocks to read, comma-separated: double.0 … double.18, single.0 … single.37 on Flux-dev. "
              "Empty = every dual-stream block (where image queries meet text keys).")


def _blocks(text: str, model) -> list[str] | None:
    names = split_list(text)
    if not names:
        return None
    dm = diffusion_model(model)
    known = [f"double.{i}" for i in range(len(dm.double_blocks))] + [f"single.{i}" for i in range(len(dm.single_blocks))]
    bad = [b for b in names if b not in known]
    if bad:
        raise ValueError(f"blocks: {bad[0]!r} is not a block of this model; use {known[0]} … {known[-1]}, or leave empty")
    return names


def _steps(text: str) -> list[int] | None:
    items = split_list(text)
    try:
        return [int(s) for s in items] or None
    except ValueError:
        raise ValueError(f"steps={text!r}: give sampling step numbers separated by commas (e.g. 0,3,7), or leave "
                         "empty for all") from None


class AttentionInspect(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EraseFlux_AttentionInspect", display_name="Attention Map Inspector (Flux)",
            category=f"{CATEGORY}/inspect",
            description="Generates an image while recording where image tokens attend to a word's text tokens, per "
                        "dual-stream block and sampling step; returns heatmap overlays, a mask and the attention mass.",
            inputs=[
                io.Model.Input("model", tooltip="The Flux MODEL (stock loader or the sandbox loader)."),
                io.Clip.Input("clip", tooltip="The text encoder that goes with the model; its T5 tokens locate the word."),
                io.Vae.Input("vae", tooltip="Decodes the generated image under the heatmaps."),
                io.String.Input("prompt", default="a red circle", multiline=True, tooltip="The prompt to generate."),
                io.String.Input("word", default="red", tooltip="Word or phrase of the prompt whose attention to show "
                                "(all its sub-word tokens, every occurrence)."),
                io.String.Input("blocks", default="", tooltip=BLOCKS_TIP),
                io.String.Input("steps", default="", tooltip="Sampling steps to show (0-based, comma-separated); "
                                "empty = all."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Noise seed."),
                io.Int.Input("width", default=32, min=16, max=2048, step=16, tooltip="Image width in pixels "
                             "(sandbox: 32; Flux: e.g. 512)."),
                io.Int.Input("height", default=32, min=16, max=2048, step=16, tooltip="Image height in pixels."),
                io.Int.Input("sample_steps", default=12, min=1, max=100, tooltip="Euler steps of the sampler."),
                io.Float.Input("cfg", default=3.0, min=1.0, max=20.0, step=0.1, tooltip="Classifier-free guidance "
                               "(1 = off, as Flux-dev is used; the sandbox wants 3)."),
                io.Float.Input("guidance", default=3.5, min=0.0, max=20.0, step=0.1, tooltip="Flux-dev distilled "
                               "guidance (ignored by models without it)."),
                io.Model.Input("model_b", optional=True, tooltip="Optional second MODEL (e.g. the erased one): its "
                               "grid is drawn under the first for an A/B comparison."),
            ],
            outputs=[io.Image.Output(display_name="heatmaps"), io.Mask.Output(display_name="mask"),
                     io.Float.Output(display_name="attention_mass")])

    @classmethod
    def validate_inputs(cls, word=None, prompt=None, steps=None, **kw):
        if word is not None and not word.strip():
            return "word is empty: type the word of the prompt to inspect, e.g. 'red'"
        if word and prompt and word.strip().lower() not in prompt.lower():
            return f"word {word!r} is not in the prompt {prompt!r}; pick a word of the prompt"
        if steps:
            try:
                _steps(steps)
            except ValueError as exc:
                return str(exc)
        return True

    @classmethod
    def execute(cls, model, clip, vae, prompt, word, blocks, steps, seed, width, height, sample_steps, cfg, guidance,
                model_b=None) -> io.NodeOutput:
        world = ComfyWorld(model, clip, latent_hw(width, height, vae), vae=vae, guidance=guidance, cfg_scale=cfg,
                           sample_steps=sample_steps)
        chosen, wanted = _blocks(blocks, model), _steps(steps)
        ins = inspect(world, prompt, word, chosen, wanted, seed=seed)
        grid, mask, mass = inspection_outputs(ins)
        if model_b is not None:
            ins_b = inspect(world, prompt, word, chosen, wanted, seed=seed, transformer=model_b)
            grid = stack_vertically([grid, inspection_outputs(ins_b)[0]])
        return io.NodeOutput(pil_to_image(grid), mask[None], mass)


class AttentionSuppress(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="EraseFlux_AttentionSuppress", display_name="Attention Suppression (Flux, baseline)",
            category=f"{CATEGORY}/inspect",
            description="The deterministic attention-map erasure: every query's attention to the word's text tokens "
                        "is scaled (0 = deleted) in the chosen blocks while sampling. It fails on synonyms and "
                        "misspellings, which is why learned erasure exists; use it as a baseline.",
            inputs=[
                io.Model.Input("model", tooltip="The Flux MODEL to patch (a clone is patched; the input is untouched)."),
                io.Clip.Input("clip", tooltip="The text encoder, to find the word's tokens in the prompt."),
                io.String.Input("prompt", default="a red circle", multiline=True,
                                tooltip="The prompt you will sample with (the same text as in CLIPTextEncode)."),
                io.String.Input("words", default="red", tooltip="Word(s) to suppress, comma-separated."),
                io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.05,
                               tooltip="1 deletes the columns; 0.5 halves their attention; 0 leaves the model as is."),
                io.String.Input("blocks", default="", tooltip="Blocks to act in (comma-separated); empty = every "
                                "dual- and single-stream block."),
            ],
            outputs=[io.Model.Output(display_name="model")])

    @classmethod
    def validate_inputs(cls, words=None, prompt=None, **kw):
        if words is not None and not split_list(words):
            return "words is empty: type at least one word of the prompt to suppress"
        if words and prompt:
            missing = [w for w in split_list(words) if w.lower() not in prompt.lower()]
            if missing:
                return f"word {missing[0]!r} is not in the prompt {prompt!r}; pick words of the prompt"
        return True

    @classmethod
    def execute(cls, model, clip, prompt, words, strength, blocks) -> io.NodeOutput:
        from erase_core.comfy.sandbox import comfy_token_indices

        if strength == 0.0:
            return io.NodeOutput(model)
        idx = sorted({i for w in split_list(words) for i in comfy_token_indices(clip, prompt, w)})
        return io.NodeOutput(suppressed_model(model, idx, scale=1.0 - strength, blocks=_blocks(blocks, model)))
