"""Inspection and the demo on the shipped sandbox (few samples; the README's demo runs 64 per prompt)."""
import json

import pytest

from erase_core.demo import attack_prompts, run_demo, suppressed_rate
from erase_core.inspect import inspect_sandbox, inspection_grid


def test_inspection_maps_cover_blocks_steps_and_tokens(world):
    ins = inspect_sandbox(world, "a red circle in the northwest", "northwest", steps=[0, 5, 11], seed=3)
    assert len(ins.indices) > 1  # a multi-token word
    assert ins.blocks == ["double.0", "double.1", "double.2"]
    m = ins.captured.mean(ins.blocks, ins.steps)
    assert m.shape == (1, len(ins.indices), 4, 4)
    assert 0 < ins.mass() < 1
    assert inspection_grid(ins).height > 4 * 128


def test_suppression_removes_the_word_attention(world):
    plain = inspect_sandbox(world, "a red circle", "red", seed=3)
    suppressed = inspect_sandbox(world, "a red circle", "red", seed=3, suppress=0.0)
    assert plain.mass() > 0.01
    assert suppressed.mass() == 0.0


def test_attack_prompts_obfuscate_without_naming():
    kinds = {a.kind: a.prompt for a in attack_prompts("circle")}
    assert kinds["plain"] == "a circle"
    assert "circle" not in kinds["synonym"].split() and "circle" not in kinds["misspelling"].split()
    assert kinds["repeated word"].split().count("circle") == 2
    assert kinds["associated"] in ("the sun", "a coin")


def test_suppression_works_on_the_plain_word_only(world):
    blocks = [f"double.{i}" for i in range(3)] + [f"single.{i}" for i in range(3)]
    base = world.classify(world.sample(["a red shape"] * 24, seed=9))["colour"].count("red") / 24
    sup, idx, _ = suppressed_rate(world, "a red shape", "red", 24, 9, blocks)
    syn, syn_idx, _ = suppressed_rate(world, "a crimson shape", "red", 24, 9, blocks)
    assert idx and not syn_idx
    assert base >= 0.8 and sup <= base - 0.5, (base, sup)
    assert syn >= 0.8


@pytest.mark.slow
def test_full_demo(tmp_path):
    report = run_demo(tmp_path, samples=64)
    data = json.loads((tmp_path / "suppression.json").read_text())
    assert data["red/plain"]["suppressed"] < data["red/plain"]["base"] - 0.5
    assert data["red/synonym"]["suppressed"] >= 0.8  # suppression cannot touch a synonym...
    learned = json.loads((tmp_path / "erasure.json").read_text())["prompts"]
    assert learned["plain"]["erased"] <= 0.2
    assert learned["synonym"]["erased"] <= data["red/synonym"]["suppressed"] - 0.5  # ...the learned eraser does
    assert report.exists() and (tmp_path / "erase_red.png").exists()


def test_demo_runs_end_to_end_with_few_samples(tmp_path):
    report = run_demo(tmp_path, samples=4, concepts=("red",), learned=None)
    text = report.read_text()
    assert "| plain |" in text and "![sandbox](sandbox_grid.png)" in text
    for name in ("sandbox_grid.png", "inspect_red.png", "suppress_red.png", "suppression.json"):
        assert (tmp_path / name).exists(), name
    assert not list(tmp_path.glob('*.tmp'))


def test_demo_reads_steps_spread_over_the_worlds_sampler():
    """The demo's heatmap columns follow the world's sampler: first, last and evenly between, never past the end."""
    from erase_core.demo import spread_steps

    assert spread_steps(24) == [0, 6, 12, 17, 23]
    assert spread_steps(12) == [0, 3, 6, 8, 11]
    assert spread_steps(3) == [0, 1, 2] and spread_steps(1) == [0]
