import sys
from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def tiny_flux(seed: int = 0, in_channels: int = 64, double: int = 2, single: int = 2, guidance: bool = False):
    """A random tiny Flux (2 heads × 16, text dim 32), enough to test map maths and gradients."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(seed)
    return FluxTransformer2DModel(patch_size=1, in_channels=in_channels, num_layers=double, num_single_layers=single,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                  pooled_projection_dim=32, guidance_embeds=guidance, axes_dims_rope=(4, 6, 6)).eval()


@pytest.fixture
def flux():
    return tiny_flux()


@pytest.fixture
def flux_inputs():
    from erase_core.flux.backend import TextCond

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 16, 64, generator=g)
    t = torch.tensor([0.3, 0.8])
    text = TextCond(torch.randn(2, 8, 32, generator=g), torch.randn(2, 32, generator=g))
    return x, t, text


@pytest.fixture(scope="session")
def world():
    from erase_core.sandbox.pipeline import SandboxWorld

    return SandboxWorld.load()
