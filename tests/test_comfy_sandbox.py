"""The sandbox world as ComfyUI MODEL / CLIP / VAE, checked against the engine inside a real ComfyUI.

Skipped unless ``ERASE_FLUX_COMFYUI`` names a ComfyUI checkout; run it with a python that has ComfyUI's
requirements (ComfyUI's venv), e.g.::

    ERASE_FLUX_COMFYUI=/work/comfy/ComfyUI /work/comfy/venv/bin/python -m pytest -q tests/test_comfy_sandbox.py

ComfyUI is imported in a child process (this file run as a script), not in the pytest process: ComfyUI's
``nodes`` module would clash with this pack's ``nodes`` package, and its global state (``args.cpu``, loaded
models, the working directory) must not leak into the other tests (``test_package`` checks that ``comfy`` is never
imported). The child calls the stock nodes directly, as the ComfyUI kit's in-process recipe does, and writes its
measurements as JSON; the tests below compare them with the stated tolerances.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = "ERASE_FLUX_COMFYUI"
SKIP_EXIT = 3  # the child's exit status when ComfyUI cannot be imported

# Tolerances
VELOCITY_ATOL = 1e-4  # ComfyUI's native Flux vs diffusers' FluxTransformer2DModel, fp32, max abs difference
SAMPLER_ATOL = 1e-3  # stock KSampler latents vs the engine's Euler + CFG on the same noise and sigmas
RED_CIRCLE_MIN = 6  # of 8 seeds, KSampler images of "a red circle" the sandbox classifier calls red

PROMPTS = ["a red circle", "a cruciform lozenge in the bottomleft", "Turquoise, Pentagram   upperright!", ""]
TOKEN_CASES = [  # (prompt, word): multi-token words, repeats, case, punctuation, extra spaces
    ("a red circle", "red"),
    ("a cruciform lozenge in the bottomleft", "cruciform"),
    ("a cruciform lozenge in the bottomleft", "bottomleft"),
    ("scarlet scarlet disc, crimson", "scarlet"),
    ("Red circle, a RED red disc", "red"),
    ("Turquoise, Pentagram   upperright!", "pentagram"),
    ("Turquoise, Pentagram   upperright!", "upperright"),
]
T5_CASES = [  # ComfyUI's real Flux T5-XXL tokenizer (vocabulary only, no weights)
    ("A painting of a cat in the style of Van Gogh", "van gogh"),
    ("Schwarzenegger lifts a Gogh, schwarzenegger", "Schwarzenegger"),
    ("an emerald lozenge to the upperleft", "lozenge"),
]


# =====================================================================================================================
# Child process: import ComfyUI, run the stock nodes, measure.
# =====================================================================================================================
def _import_comfy(comfy_dir: str):
    """ComfyUI's in-process recipe: path, cwd, ``args.cpu`` before ``model_management``, then the nodes."""
    import asyncio

    sys.path.insert(0, str(ROOT))
    sys.path.insert(0, comfy_dir)
    os.chdir(comfy_dir)
    from comfy.cli_args import args

    args.cpu = True
    import comfy.model_management  # noqa: F401
    import nodes

    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    return nodes


def _max_diff(a, b) -> float:
    return float((a.float() - b.float()).abs().max())


def _measure_velocity(world, model) -> dict:
    import torch

    from erase_core.flux.packing import pack_latents, unpack_latents

    h, w = world.latent_hw
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, world.cfg.latent_channels, h, w, generator=g)
    t = torch.tensor([0.05, 0.5, 0.97])
    text = world.encode(PROMPTS[:3])
    with torch.no_grad():
        native = model.model.diffusion_model(x, t, context=text.sequence, y=text.pooled, guidance=None,
                                             transformer_options={})
        engine = unpack_latents(world.backend().velocity(pack_latents(x), t, text), h, w)
    fmt = model.model.latent_format
    return {"detected": type(model.model.model_config).__name__, "max_diff": _max_diff(native, engine),
            "scale": float(engine.abs().max()), "latent_channels": fmt.latent_channels,
            "latent_identity": bool(torch.equal(fmt.process_in(x), x) and torch.equal(fmt.process_out(x), x))}


def _measure_clip(nodes, world, clip) -> dict:
    out = {}
    for prompt in PROMPTS:
        cond = nodes.CLIPTextEncode().encode(clip, prompt)[0]
        ref = world.encode([prompt])
        seq, extra = cond[0]
        out[prompt] = {"entries": len(cond), "seq_shape": list(seq.shape),
                       "pooled_shape": list(extra["pooled_output"].shape),
                       "seq_diff": _max_diff(seq, ref.sequence),
                       "pooled_diff": _max_diff(extra["pooled_output"], ref.pooled)}
    return out


def _measure_vae(nodes, world, vae) -> dict:
    import torch

    g = torch.Generator().manual_seed(1)
    images = torch.rand(2, 3, world.cfg.image_size, world.cfg.image_size, generator=g)
    latent = world.autoencoder.encode(images)
    decoded = nodes.VAEDecode().decode(vae, {"samples": latent})[0]
    encoded = nodes.VAEEncode().encode(vae, decoded)[0]["samples"]
    reference_images = world.autoencoder.decode(latent).movedim(1, -1)
    reference_latents = world.autoencoder.encode(decoded.movedim(-1, 1))
    return {"decoded_shape": list(decoded.shape), "decode_diff": _max_diff(decoded, reference_images),
            "encoded_shape": list(encoded.shape), "encode_diff": _max_diff(encoded, reference_latents)}


def _engine_latents(world, prompt: str, seed: int, sigmas, cfg_scale: float):
    """The engine's Euler + CFG (``world.sample_latents``' maths) on ComfyUI's sigmas, unpacked."""
    from erase_core.flux.flow import euler
    from erase_core.flux.packing import unpack_latents

    backend, cond, uncond = world.backend(), world.encode([prompt]), world.encode([""])

    def velocity(x, t):
        v_u = backend.velocity(x, t, uncond)
        return v_u + cfg_scale * (backend.velocity(x, t, cond) - v_u)

    return unpack_latents(euler(velocity, world.noise(1, seed), sigmas), *world.latent_hw)


def _ksample(nodes, model, clip, vae, prompt: str, seed: int, size: int, steps: int, cfg: float):
    from comfy_extras.nodes_sd3 import EmptySD3LatentImage

    empty = EmptySD3LatentImage.execute(width=size, height=size, batch_size=1).result[0]
    pos = nodes.CLIPTextEncode().encode(clip, prompt)[0]
    neg = nodes.CLIPTextEncode().encode(clip, "")[0]
    latent = nodes.KSampler().sample(model, seed, steps, cfg, "euler", "simple", pos, neg, empty)[0]
    return latent["samples"], nodes.VAEDecode().decode(vae, latent)[0]


def _measure_sampler(nodes, world, model, clip, vae) -> dict:
    import torch
    import comfy.samplers

    steps, cfg = world.sampler.steps, world.sampler.cfg  # the world's sampler.json (24 steps, CFG 3.5, shift 3)
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", steps)
    latent, image = _ksample(nodes, model, clip, vae, "a red circle", 0, world.cfg.image_size, steps, cfg)
    with torch.no_grad():
        engine = _engine_latents(world, "a red circle", 0, sigmas.float(), cfg)
    colours = []
    for seed in range(8):
        _, img = _ksample(nodes, model, clip, vae, "a red circle", seed, world.cfg.image_size, steps, cfg)
        colours.append(world.classify(img.movedim(-1, 1))["colour"][0])
    big_latent, big_image = _ksample(nodes, model, clip, vae, "a red circle", 0, 2 * world.cfg.image_size, steps, cfg)
    return {"steps": steps, "shift": world.sampler.shift, "sigmas": [round(float(s), 6) for s in sigmas], "latent_shape": list(latent.shape),
            "image_shape": list(image.shape), "image_std": float(image.std()), "engine_diff": _max_diff(latent, engine),
            "colours": colours, "big_latent_shape": list(big_latent.shape), "big_image_shape": list(big_image.shape)}


def _index_case(fn, *args):
    try:
        return fn(*args)
    except ValueError as err:
        return f"ValueError: {err}"


def _measure_tokens(world, clip) -> dict:
    import random

    import comfy.sd
    from comfy.text_encoders.flux import FluxTokenizer

    from erase_core.comfy.sandbox import comfy_token_indices
    from erase_core.tokens import shuffle_words, word_token_indices

    cases = list(TOKEN_CASES)
    rng = random.Random(0)
    for prompt, word in TOKEN_CASES[1:4]:
        cases.append((shuffle_words(prompt, rng), word))
    sandbox = [{"prompt": p, "word": w, "comfy": _index_case(comfy_token_indices, clip, p, w),
                "engine": _index_case(world.token_indices, p, w)} for p, w in cases]
    word_ids = [row[2] for row in clip.tokenize("a red circle", return_word_ids=True)["t5xxl"][0]]
    flux_clip = comfy.sd.CLIP(no_init=True)  # ComfyUI's Flux tokenizers without the 4.7 B-parameter T5 weights
    flux_clip.tokenizer, flux_clip.tokenizer_options = FluxTokenizer(), {}
    hf_t5 = flux_clip.tokenizer.t5xxl.tokenizer
    t5 = [{"prompt": p, "word": w, "comfy": _index_case(comfy_token_indices, flux_clip, p, w),
           "engine": _index_case(word_token_indices, hf_t5, p, w)} for p, w in T5_CASES]
    weighted = _index_case(comfy_token_indices, flux_clip, "a (red:1.3) circle and a red disc", "red")
    return {"sandbox": sandbox, "t5": t5, "weighted_t5": weighted, "word_ids": word_ids,
            "missing": _index_case(comfy_token_indices, clip, "a red circle", "blue")}


def child_main(comfy_dir: str, out_path: str) -> int:
    try:
        nodes = _import_comfy(comfy_dir)
    except ImportError as err:
        print(f"cannot import ComfyUI from {comfy_dir} with {sys.executable}: {err}; "
              "run the test with ComfyUI's venv python", file=sys.stderr)
        return SKIP_EXIT
    import torch

    torch.set_num_threads(1)
    from erase_core.comfy.sandbox import load_sandbox_model, sandbox_clip, sandbox_vae
    from erase_core.sandbox.pipeline import SandboxWorld

    world = SandboxWorld.load()
    model, clip, vae = load_sandbox_model(world), sandbox_clip(world), sandbox_vae(world)
    result = {"velocity": _measure_velocity(world, model), "clip": _measure_clip(nodes, world, clip),
              "vae": _measure_vae(nodes, world, vae), "sampler": _measure_sampler(nodes, world, model, clip, vae),
              "tokens": _measure_tokens(world, clip)}
    Path(out_path).write_text(json.dumps(result, indent=1))
    return 0


# =====================================================================================================================
# Pytest side
# =====================================================================================================================
if __name__ != "__main__":
    import pytest

    COMFY_DIR = os.environ.get(ENV)
    if not COMFY_DIR:
        pytest.skip(f"{ENV} is not set: point it to a ComfyUI checkout and run with ComfyUI's venv python",
                    allow_module_level=True)
    if not (Path(COMFY_DIR) / "comfy" / "sd.py").exists():
        pytest.skip(f"{ENV}={COMFY_DIR} is not a ComfyUI checkout (no comfy/sd.py)", allow_module_level=True)

    def child_measurements(script: str, comfy_dir: str, out: Path) -> dict:
        """Run ``script`` as the ComfyUI child process (``script COMFY_DIR OUT``) and read the JSON it writes."""
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.run([sys.executable, script, comfy_dir, str(out)], capture_output=True, text=True,
                              env=env, timeout=900)
        if proc.returncode == SKIP_EXIT:
            pytest.skip(proc.stderr.strip().splitlines()[-1])
        if proc.returncode != 0:
            pytest.fail(f"ComfyUI child process failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        return json.loads(out.read_text())

    @pytest.fixture(scope="module")
    def measured(tmp_path_factory) -> dict:
        return child_measurements(__file__, COMFY_DIR, tmp_path_factory.mktemp("comfy_sandbox") / "measured.json")

    def test_native_flux_velocity_matches_diffusers(measured):
        v = measured["velocity"]
        assert v["detected"] == "FluxSchnell"
        assert v["latent_identity"] and v["latent_channels"] == 16
        assert v["scale"] > 1.0  # a real velocity, not zeros
        assert v["max_diff"] <= VELOCITY_ATOL, v

    def test_clip_text_encode_equals_world_encode(measured):
        for prompt, c in measured["clip"].items():
            assert c["entries"] == 1 and c["seq_shape"] == [1, 32, 128] and c["pooled_shape"] == [1, 64], prompt
            assert c["seq_diff"] == 0.0 and c["pooled_diff"] == 0.0, (prompt, c)

    def test_vae_decode_and_encode_equal_the_autoencoder(measured):
        v = measured["vae"]
        assert v["decoded_shape"] == [2, 32, 32, 3] and v["encoded_shape"] == [2, 16, 8, 8]
        assert v["decode_diff"] == 0.0 and v["encode_diff"] == 0.0, v

    def test_stock_ksampler_graph_draws_the_prompt(measured):
        s = measured["sampler"]
        # FluxSchnell = ModelSamplingDiscreteFlow(multiplier 1) with the world's shift (3): 'simple' steps down a
        # 1000-entry table of shifted times σ' = 3σ / (1 + 2σ)
        assert (s["steps"], s["shift"]) == (24, 3.0)
        times = [1.0 - int(i * 1000 / 24) / 1000 for i in range(24)]
        expected = [3 * t / (1 + 2 * t) for t in times] + [0.0]
        assert s["sigmas"] == pytest.approx(expected, abs=1e-6)
        assert s["latent_shape"] == [1, 16, 8, 8] and s["image_shape"] == [1, 32, 32, 3]
        assert s["image_std"] > 0.05
        assert s["engine_diff"] <= SAMPLER_ATOL, s["engine_diff"]
        assert s["colours"].count("red") >= RED_CIRCLE_MIN, s["colours"]
        # the latent format's 4 px/cell ratio: a 64×64 empty latent is sampled at 16×16 and decodes to 64×64
        assert s["big_latent_shape"] == [1, 16, 16, 16] and s["big_image_shape"] == [1, 64, 64, 3]

    def test_comfy_token_indices_match_the_engine(measured):
        t = measured["tokens"]
        for case in t["sandbox"] + t["t5"]:
            assert isinstance(case["comfy"], list) and case["comfy"] == case["engine"], case
        assert any(len(c["comfy"]) > 1 for c in t["sandbox"] if c["word"] == "cruciform")
        assert t["weighted_t5"] == [2, 7]  # "(red:1.3)" parsed by ComfyUI: ▁ a ▁red ▁circle ▁and ▁ a ▁red
        assert t["word_ids"][:5] == [1] * 5 and set(t["word_ids"][5:]) == {0}  # one segment, then </s> and padding
        assert t["missing"].startswith("ValueError") and "'blue'" in t["missing"] and "'a red circle'" in t["missing"]


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1], sys.argv[2]))
