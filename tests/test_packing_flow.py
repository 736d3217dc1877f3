import torch

from erase_core.flux.flow import euler, flow_target, noised, shifted_sigmas
from erase_core.flux.packing import pack_latents, unpack_latents


def test_pack_round_trip_and_layout():
    lat = torch.arange(2 * 16 * 8 * 6, dtype=torch.float32).view(2, 16, 8, 6)
    packed = pack_latents(lat)
    assert packed.shape == (2, 12, 64)
    # token (row 1, col 2) holds the 2×2 patch at rows 2-3, cols 4-5, channel-major
    assert packed[0, 1 * 3 + 2, :4].tolist() == lat[0, 0, 2:4, 4:6].flatten().tolist()
    assert torch.equal(unpack_latents(packed, 8, 6), lat)


def test_flow_conventions():
    x0, eps = torch.randn(3, 4), torch.randn(3, 4)
    t = torch.tensor([0.0, 0.5, 1.0])
    xt = noised(x0, eps, t)
    assert torch.allclose(xt[0], x0[0]) and torch.allclose(xt[2], eps[2])
    v = flow_target(x0, eps)
    # integrating the exact velocity from noise recovers x0
    out = euler(lambda x, tt: v, eps, shifted_sigmas(4, shift=3.0))
    assert torch.allclose(out, x0, atol=1e-5)
    s = shifted_sigmas(10, 3.0)
    assert s[0] == 1 and s[-1] == 0 and bool((s[:-1] > s[1:]).all())
