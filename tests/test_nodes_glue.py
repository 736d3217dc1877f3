"""The node glue and the ComfyUI backend pieces that run without ComfyUI (the rest: test_comfy_*.py with a checkout)."""
import ast
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from torch import nn

from erase_core.comfy.jobs import concept_set, split_list
from erase_core.flux.attention import PatchCore, image_text_probs
from erase_core.flux.comfy import SliceLora, attn1_patch, lora_layout
from erase_core.lora_file import LoraModule
from nodes import NODE_IDS
from nodes.common import check_name, chw_to_image, latent_hw, pil_to_image

ROOT = Path(__file__).resolve().parents[1]


def test_node_ids_are_pinned_and_match_the_schemas():
    """Node ids are a public API: shared workflows break when they change."""
    assert NODE_IDS == ("EraseFlux_SandboxLoader", "EraseFlux_AttentionInspect", "EraseFlux_AttentionSuppress",
                        "EraseFlux_EraseConcept", "EraseFlux_MergeLoras", "EraseFlux_NeighbourPreview")
    found = set()
    for path in (ROOT / "nodes").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.keyword) and node.arg == "node_id":
                found.add(node.value.value)
    assert found == set(NODE_IDS)


def test_every_node_input_has_a_tooltip():
    for path in (ROOT / "nodes").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "Input":
                assert any(k.arg == "tooltip" for k in node.keywords), f"{path.name}:{node.lineno} has no tooltip"


def test_names_and_sizes_are_checked_with_the_fix_named():
    assert check_name("erase_red") == "erase_red" and check_name("erase_red.safetensors") == "erase_red"
    for bad in ("../x", "a/b", "", " "):
        with pytest.raises(ValueError, match="lora_name="):
            check_name(bad)

    class Vae:
        downscale_ratio = 4

    assert latent_hw(32, 32, Vae()) == (8, 8) and latent_hw(512, 768) == (96, 64)
    with pytest.raises(ValueError, match="multiples of 16"):
        latent_hw(40, 32)


def test_image_conversions():
    img = pil_to_image(Image.new("RGB", (5, 3), (255, 0, 0)))
    assert img.shape == (1, 3, 5, 3) and img[0, 0, 0].tolist() == [1.0, 0.0, 0.0]
    assert chw_to_image(torch.rand(2, 3, 4, 6)).shape == (2, 4, 6, 3)


def test_text_fields_and_concept_sets():
    assert split_list("a, b\nc,, ") == ["a", "b", "c"]
    cs = concept_set("red", [], "crimson, scarlet", "tree, car", ["a blue square"])
    assert cs.synonyms == ("crimson", "scarlet") and cs.irrelevant == ("tree", "car")
    assert all("red" in p for p in cs.prompts) and cs.preserve_prompts == ("a blue square",)
    auto = concept_set("red", [], "crimson", "tree, car", [])  # no preserve prompts typed: the irrelevant ones
    assert len(auto.preserve_prompts) == 2 and "tree" in auto.preserve_prompts[0] and "red" not in auto.preserve_prompts[0]
    with pytest.raises(ValueError, match="concept is empty"):
        concept_set("  ", [], "auto", "auto")


class _Attn(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.qkv = nn.Linear(h, 3 * h)
        self.proj = nn.Linear(h, h)


class _Double(nn.Module):
    def __init__(self, h):
        super().__init__()
        self.txt_attn, self.img_attn = _Attn(h), _Attn(h)


class _Vec(nn.Module):
    def __init__(self, d, h):
        super().__init__()
        self.in_layer, self.out_layer = nn.Linear(d, h), nn.Linear(h, h)


class _FakeFlux(nn.Module):
    def __init__(self, h=8, blocks=2):
        super().__init__()
        self.double_blocks = nn.ModuleList(_Double(h) for _ in range(blocks))
        self.vector_in = _Vec(4, h)


def test_fused_slice_lora_puts_each_target_on_its_rows():
    """add_q/add_k/add_v of diffusers are the q/k/v row thirds of ComfyUI's fused txt_attn.qkv; the exported module
    is exactly the delta the wrapper adds there."""
    dm = _FakeFlux()
    layout = lora_layout(dm, ("add_k_proj", "pooled"))
    assert layout["double_blocks.1.txt_attn.qkv"] == {"transformer_blocks.1.attn.add_k_proj": (8, 8)}
    assert set(layout["vector_in.in_layer"]) == {"time_text_embed.text_embedder.linear_1"}
    lora = SliceLora((24, 8), {"transformer_blocks.0.attn.add_q_proj": (0, 8),
                               "transformer_blocks.0.attn.add_v_proj": (16, 8)}, rank=2, alpha=4.0,
                     generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        for p in lora.up.values():
            p.normal_()
    w = torch.randn(24, 8)
    delta = lora(w) - w
    assert delta[8:16].abs().max() == 0  # the k rows are untouched
    q = LoraModule(lora.down["transformer_blocks__0__attn__add_q_proj"], lora.up["transformer_blocks__0__attn__add_q_proj"], 4.0)
    assert torch.allclose(delta[:8], q.delta().float(), atol=1e-6)
    lora.enabled = False
    assert torch.equal(lora(w), w)
    with pytest.raises(ValueError, match="to_qq"):
        lora_layout(dm, ("to_qq",))


def test_attn1_patch_captures_and_suppresses_like_the_diffusers_patch():
    """The ComfyUI hook computes the same maps as image_text_probs on the same q/k, and returns a mask only when
    it suppresses."""
    torch.manual_seed(0)
    b, h, n_txt, n_img, d = 2, 1, 4, 9, 8
    q, k = torch.randn(b, h, n_txt + n_img, d), torch.randn(b, h, n_txt + n_img, d)
    known = ["double.0", "single.0"]
    core = PatchCore(known, 1, [1, 2], blocks=["double.0"])
    hook = attn1_patch([core])
    extra = {"img_slice": [n_txt, n_txt + n_img], "block_type": "double", "block_index": 0}
    assert hook(q, k, q, pe=None, attn_mask=None, extra_options=extra) == {}
    want = image_text_probs(q[:, :, n_txt:].transpose(1, 2), k.transpose(1, 2), torch.tensor([[1, 2]] * b), None,
                            n_txt, 16)
    got = core.result.maps[("double.0", 0)].flatten(2)
    assert torch.allclose(got, want, atol=1e-6)
    sup = PatchCore(known, 1, [1], blocks=[], capture=False, suppress=0.0, suppress_blocks=["double.0"])
    out = attn1_patch([sup])(q, k, q, pe=None, attn_mask=None, extra_options=extra)
    assert out["attn_mask"].shape == (b, 1, n_txt + n_img, n_txt + n_img)
    assert math.isinf(out["attn_mask"][0, 0, n_txt, 1].item())  # image query → the word's column is deleted
    assert attn1_patch([sup])(q, k, q, attn_mask=None, extra_options={**extra, "block_type": "single"}) == {}


def test_comfy_world_caches_recent_prompt_encodings_within_a_bound():
    """The trainer re-encodes its fixed prompts every step: they are cached, but only the most recent
    CACHE_PROMPTS (a Flux T5 encoding is megabytes; shuffled prompts rarely repeat)."""
    from types import SimpleNamespace

    from erase_core.comfy.world import CACHE_PROMPTS, ComfyWorld

    calls = []

    class Clip:
        def tokenize(self, prompt):
            return prompt

        def encode_from_tokens(self, tokens, return_pooled=True):
            calls.append(tokens)
            return torch.zeros(1, 4, 8), torch.zeros(1, 3)

    dm = SimpleNamespace(img_in=nn.Linear(64, 8))
    world = ComfyWorld(SimpleNamespace(model=SimpleNamespace(diffusion_model=dm)), Clip(), (8, 8))
    world.encode(["fixed"])
    for i in range(CACHE_PROMPTS - 1):
        world.encode([f"p{i}", "fixed"])
    assert calls.count("fixed") == 1  # kept while in use
    for i in range(CACHE_PROMPTS):
        world.encode([f"q{i}"])
    world.encode(["fixed"])
    assert calls.count("fixed") == 2 and len(world._cache) == CACHE_PROMPTS  # evicted once unused, bounded
