"""Merging erase-LoRAs: exactness, dilution, order invariance, the closed form, interference, bad input, CLI."""
import json

import pytest
import torch

from erase_core.lora_file import LoraFile, LoraModule, read_lora_file, write_lora_file
from erase_core.merge import (MergeConfig, closed_form_lora, interference, interference_summary, low_rank, merge,
                              refactor)

D = 24
KEYS = ("transformer_blocks.0.attn.add_q_proj", "transformer_blocks.0.attn.add_k_proj",
        "transformer_blocks.1.attn.add_k_proj")


def _lora(seed, rank=3, alpha=None, concept=None):
    g = torch.Generator().manual_seed(seed)
    mods = {k: LoraModule(torch.randn(rank, D, generator=g), torch.randn(D, rank, generator=g),
                          float(alpha if alpha is not None else rank)) for k in KEYS}
    return LoraFile(mods, {"concept": concept or f"c{seed}", "geometry": {"num_layers": 2}})


def _deltas(lf):
    return {k: m.delta() for k, m in lf.modules.items()}


def _close(a, b, tol=1e-9):
    for k in a:
        assert torch.allclose(a[k], b[k], atol=tol * max(1.0, b[k].abs().max().item()), rtol=0), k


def test_concat_is_the_exact_weighted_sum_of_deltas():
    loras = [_lora(i, rank=2 + i, alpha=1.5 * (i + 1)) for i in range(3)]
    w = (1.0, -0.5, 2.0)
    out = merge(loras, MergeConfig(mode="concat", weights=w))
    want = {k: sum(wi * lf.modules[k].delta() for wi, lf in zip(w, loras)) for k in KEYS}
    _close(_deltas(out), want, 1e-6)
    assert {m.rank for m in out.modules.values()} == {2 + 3 + 4}


def test_normalized_of_one_lora_is_that_lora_and_dilutes_with_n():
    one = _lora(0, alpha=7.0)
    _close(_deltas(merge([one], MergeConfig(mode="normalized", weights=(3.0,)))), _deltas(one), 1e-6)
    loras = [_lora(i) for i in range(4)]
    out = merge(loras, MergeConfig(mode="normalized"))
    _close(_deltas(out), {k: sum(lf.modules[k].delta() for lf in loras) / 4 for k in KEYS}, 1e-6)
    assert out.meta["merge"]["weights"] == [0.25] * 4


@pytest.mark.parametrize("mode", ["normalized", "sum", "concat"])
def test_order_does_not_matter(mode):
    loras = [_lora(i, rank=3) for i in range(4)]
    w = (0.5, 1.0, 2.0, 1.5)
    a = merge(loras, MergeConfig(mode=mode, weights=w))
    b = merge(loras[::-1], MergeConfig(mode=mode, weights=w[::-1]))
    _close(_deltas(a), _deltas(b), 1e-5)


def test_sum_keeps_the_input_rank_as_the_best_approximation():
    loras = [_lora(i, rank=3) for i in range(3)]
    out = merge(loras, MergeConfig(mode="sum"))
    assert {m.rank for m in out.modules.values()} == {3}
    exact = merge(loras, MergeConfig(mode="concat"))
    for k in KEYS:
        s = torch.linalg.svdvals(exact.modules[k].delta())
        err = torch.linalg.matrix_norm(out.modules[k].delta() - exact.modules[k].delta())
        assert err == pytest.approx(s[3:].square().sum().sqrt().item(), rel=1e-5)  # Eckart–Young
    full = merge(loras, MergeConfig(mode="sum", rank=9))
    _close(_deltas(full), _deltas(exact), 1e-5)


def test_refactor_equals_truncated_svd_of_the_delta():
    m = LoraModule(torch.randn(6, 40), torch.randn(30, 6), 3.0)
    assert torch.allclose(refactor(m, 2).delta(), low_rank(m.delta(), 2).delta(), atol=1e-4)


def test_closed_form_reproduces_each_lora_on_its_inputs_and_spares_preserved_ones():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64))[0].float()
    xa, xb, xp = basis[:, :6].T.repeat(3, 1), basis[:, 6:12].T.repeat(3, 1), basis[:, 12:20].T.repeat(3, 1)
    la, lb = (LoraModule(torch.randn(D, D, generator=g), torch.randn(D, D, generator=g), 12.0) for _ in range(2))
    da, db = la.delta().float(), lb.delta().float()
    delta = closed_form_lora([la, lb], [1.0, 1.0], [xa, xb], xp, preserve_weight=1.0, ridge=1e-8).delta().float()
    assert torch.allclose(xa @ delta.T, xa @ da.T, atol=1e-4)
    assert torch.allclose(xb @ delta.T, xb @ db.T, atol=1e-4)
    assert (xp @ delta.T).abs().max() < 1e-4
    # whereas the exact sum leaks each LoRA onto the other's and the preserved inputs
    assert (xp @ (da + db).T).abs().max() > 0.1
    # one LoRA with inputs spanning the whole space: the closed form is the LoRA itself
    full = basis.T.repeat(2, 1)
    assert torch.allclose(closed_form_lora([la], [1.0], [full], None, 1.0, 1e-9).delta().float(), da, atol=1e-4)


def test_closed_form_merge_is_order_invariant_and_factored():
    loras = [_lora(i, rank=2) for i in range(3)]
    g = torch.Generator().manual_seed(5)
    inputs = [{k: torch.randn(10, D, generator=g) for k in KEYS} for _ in loras]
    preserve = {k: torch.randn(20, D, generator=g) for k in KEYS}
    a = merge(loras, MergeConfig(mode="closed_form", rank=6), inputs, preserve)
    b = merge(loras[::-1], MergeConfig(mode="closed_form", rank=6), inputs[::-1], preserve)
    _close(_deltas(a), _deltas(b), 1e-4)
    assert {m.rank for m in a.modules.values()} == {6}
    with pytest.raises(ValueError, match="needs the concepts' module inputs"):
        merge(loras, MergeConfig(mode="closed_form"))


def test_bad_input_is_named():
    loras = [_lora(0), _lora(1)]
    with pytest.raises(ValueError, match="all zero"):
        merge(loras, MergeConfig(mode="sum", weights=(0.0, 0.0)))
    with pytest.raises(ValueError, match="needs weights ≥ 0"):
        merge(loras, MergeConfig(mode="normalized", weights=(1.0, -1.0)))
    with pytest.raises(ValueError, match="3 given for 2 LoRAs"):
        merge(loras, MergeConfig(mode="concat", weights=(1.0, 1.0, 1.0)))
    with pytest.raises(ValueError, match="merge mode 'avg' is unknown"):
        MergeConfig(mode="avg")
    other = _lora(2)
    other.meta["geometry"] = {"num_layers": 19}
    with pytest.raises(ValueError, match="num_layers = 19 vs 2"):
        merge([loras[0], other], MergeConfig())
    fewer = _lora(3)
    del fewer.modules[KEYS[2]]
    with pytest.raises(ValueError, match="targets other modules"):
        merge([loras[0], fewer], MergeConfig())
    wide = _lora(4)
    wide.modules[KEYS[0]] = LoraModule(torch.zeros(3, 48), torch.zeros(48, 3), 3.0)
    with pytest.raises(ValueError, match="different geometry"):
        merge([loras[0], wide], MergeConfig())


def test_interference_cosines():
    a, b = _lora(0), _lora(1)
    neg = LoraFile({k: LoraModule(m.down, -2 * m.up, m.alpha) for k, m in a.modules.items()}, {})
    cos = interference([a, a, neg, b])
    for block, c in cos.items():
        assert c[0, 1].item() == pytest.approx(1.0, abs=1e-6)
        assert c[0, 2].item() == pytest.approx(-1.0, abs=1e-6)
        assert abs(c[0, 3].item()) < 0.3  # independent random edits are nearly orthogonal
        want = torch.nn.functional.cosine_similarity(
            torch.cat([a.modules[k].delta().flatten() for k in KEYS if k.startswith(block)]),
            torch.cat([b.modules[k].delta().flatten() for k in KEYS if k.startswith(block)]), dim=0)
        assert c[0, 3].item() == pytest.approx(want.item(), abs=1e-6)
    summary = interference_summary(cos)
    assert set(summary) == {"transformer_blocks.0", "transformer_blocks.1"}
    assert summary["transformer_blocks.0"]["max_abs_cos"] == pytest.approx(1.0, abs=1e-6)


def test_merge_command(tmp_path, capsys):
    from erase_core.cli import main

    paths = [write_lora_file(_lora(i), tmp_path / f"l{i}.safetensors") for i in range(3)]
    out = tmp_path / "m.safetensors"
    assert main(["merge", *map(str, paths), "--mode", "normalized", "--weights", "1", "1", "2", "--out", str(out),
                 "--report", str(tmp_path / "rep")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["weights"] == [0.25, 0.25, 0.5] and (tmp_path / "rep.png").exists()
    merged = read_lora_file(out)
    assert merged.meta["merge"]["mode"] == "normalized" and merged.meta["concept"] == ["c0", "c1", "c2"]
    assert main(["merge", *map(str, paths), "--out", str(out)]) == 2  # exists, not overwritten
    assert "exists" in capsys.readouterr().err
    assert main(["merge", str(paths[0]), "--weights", "0", "--mode", "sum", "--out", str(tmp_path / "z.safetensors")]) == 2
    assert "all zero" in capsys.readouterr().err


def test_merge_command_measures_survival_on_the_sandbox(tmp_path, capsys, world):
    from erase_core.cli import main
    from erase_core.lora_file import LoraFile
    from erase_core.kv_edit import closed_form_erase
    from erase_core.sandbox.erase_sets import sandbox_concept_set

    paths = []
    for name in ("west", "east"):
        lf = closed_form_erase(world, sandbox_concept_set(name), n_prompts=4)
        paths.append(write_lora_file(LoraFile(lf.modules, {"concept": name}), tmp_path / f"{name}.safetensors"))
    assert main(["merge", *map(str, paths), "--mode", "concat", "--evaluate", "8",
                 "--out", str(tmp_path / "m.safetensors")]) == 0
    survival = json.loads(capsys.readouterr().out)["survival"]
    assert set(survival) == {"west", "east"}
    for r in survival.values():
        assert r["base"] >= 75 and r["single"] <= r["base"] and 0 <= r["merged"] <= 100
