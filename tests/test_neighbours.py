"""RealEra neighbour mining: bounds, determinism, labels."""
import pytest
import torch

from erase_core.neighbours import NeighbourConfig, mine, nearest_labels


def test_samples_respect_the_distance_and_cosine_bounds():
    e = torch.randn(3, 64) * 0.2  # three concept tokens, T5-like small norms
    cfg = NeighbourConfig(m=40, n=30, seed=1)
    near, far = mine(e, cfg)
    assert near.shape == (40, 3, 64) and far.shape == (30, 3, 64)
    flat, scale = e.flatten(), e.norm()
    for s, (lo, hi) in ((near, (0.0, cfg.d1)), (far, (cfg.d1, cfg.d2))):
        d = (s.flatten(1) - flat).norm(dim=1) / scale
        assert (d >= lo - 1e-5).all() and (d <= hi + 1e-5).all()
    cos_near = torch.nn.functional.cosine_similarity(near.flatten(1), flat[None], dim=1)
    cos_far = torch.nn.functional.cosine_similarity(far.flatten(1), flat[None], dim=1)
    assert (cos_near >= cfg.s2 - 1e-6).all() and (cos_near <= cfg.s1 + 1e-6).all()
    assert (cos_far < cfg.s2).all()
    again = mine(e, cfg)
    assert torch.equal(again[0], near) and torch.equal(again[1], far)
    assert not torch.equal(mine(e, NeighbourConfig(m=40, n=30, seed=2))[0], near)


def test_impossible_bounds_and_bad_config_are_named():
    with pytest.raises(ValueError, match="need 0 < d1 < d2"):
        NeighbourConfig(d1=2.0, d2=1.0)
    with pytest.raises(ValueError, match="s2 < s1"):
        NeighbourConfig(s1=0.5, s2=0.9)
    with pytest.raises(ValueError, match="widen the cosine bounds"):
        mine(torch.randn(64), NeighbourConfig(d1=0.01, s1=0.9, s2=0.8, max_draws=2000))  # r ≤ 0.01‖e‖ ⇒ cos > 0.99


def test_labels_are_nearest_vocabulary_words():
    table = torch.eye(4)
    words = ["red", "orange", "blue", "green"]
    samples = torch.tensor([[[1.0, 0.2, 0, 0]], [[0, 0, 0.1, 1.0]]])
    labels = nearest_labels(samples, table, words, k=2)
    assert [w for w, _ in labels[0]] == ["red", "orange"] and labels[1][0][0] == "green"


def test_perturb_rows_moves_only_the_given_rows():
    from erase_core.neighbours import perturb_rows

    seq = torch.randn(3, 6, 16)
    gen = torch.Generator().manual_seed(0)
    out = perturb_rows(seq, [[1, 2], [], [4]], "near", NeighbourConfig(), gen)
    changed = (out != seq).any(-1)
    assert changed.tolist() == [[False, True, True, False, False, False], [False] * 6,
                                [False, False, False, False, True, False]]
    far = perturb_rows(seq, [[1, 2], [], [4]], "far", NeighbourConfig(), gen)
    d = (far[0, 1:3] - seq[0, 1:3]).flatten().norm() / seq[0, 1:3].flatten().norm()
    assert 0.8 <= d <= 1.6 + 1e-5


def test_eraseanything_with_neighbours_trains(world):
    from erase_core.sandbox.erase_sets import sandbox_concept_set
    from erase_core.train import EraseConfig, erase

    res = erase(world, sandbox_concept_set("red"), EraseConfig(method="eraseanything+neighbors", steps=2, batch=4,
                                                                 base_samples=4, preserve_images=1))
    assert {"esd", "attn", "preserve", "beyond", "rsc"} <= set(res.history[-1].losses)
