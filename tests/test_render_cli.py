"""Pictures and the command line."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from erase_core import render
from erase_core.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]


def test_overlay_mask_and_colormap():
    img = torch.zeros(3, 32, 32)
    m = torch.zeros(4, 4)
    m[0, 3] = 1.0
    out = render.overlay(img, m)
    assert out.shape == (3, 32, 32)
    assert out[:, :8, 24:].mean() > out[:, 24:, :8].mean()  # hot corner is brighter
    mk = render.mask(m, (32, 32), threshold=0.5)
    assert mk[2, 29] == 1 and mk[30, 2] == 0
    assert torch.allclose(render.colormap(torch.zeros(2, 2))[:, 0, 0], render._RAMP[0])
    assert render.normalise(torch.zeros(3)).sum() == 0


def test_grid_and_bar_chart_sizes():
    tiles = [render.to_pil(torch.rand(3, 8, 8), 2) for _ in range(5)]
    g = render.grid(tiles, cols=2, labels=[str(i) for i in range(5)], row_labels=["a", "b", "c"], title="t")
    assert g.width > 2 * 16 and g.height > 3 * 16
    chart = render.bar_chart({"x": 1.0, "yy": 0.5}, "mass")
    assert chart.height >= 24 + 2 * 18
    with pytest.raises(ValueError, match="at least one tile"):
        render.grid([], cols=1)


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "erase_core", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0
    for cmd in ("sandbox", "inspect", "demo"):
        assert cmd in out.stdout
    sub = subprocess.run([sys.executable, "-m", "erase_core", "sandbox", "--help"], capture_output=True, text=True,
                         cwd=ROOT)
    for cmd in ("train", "check", "generate"):
        assert cmd in sub.stdout


@pytest.mark.parametrize("argv, needle", [
    (["inspect", "--prompt", "a red circle", "--out", "x"], "--word"),
    (["inspect", "--prompt", "p", "--word", "w", "--out", "x", "--blocks", "triple.1"], "--blocks"),
    (["inspect", "--prompt", "p", "--word", "w", "--out", "x", "--steps", "a,b"], "--steps"),
    (["sandbox", "generate", "--prompt", "a", "--n", "0", "--out", "x.png"], "--n"),
    (["sandbox", "dance"], "action"),
    (["sandbox", "check", "--shift", "0"], "--shift"),
    (["evaluate", "--concept", "red", "--device", "xyz"], "--device"),
])
def test_bad_arguments_give_one_line_and_exit_2(argv, needle, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and needle in err


def test_engine_errors_exit_2_with_the_reason(tmp_path, capsys, world):
    code = main(["inspect", "--prompt", "a red circle", "--word", "blue", "--out", str(tmp_path)])
    assert code == 2
    assert "'blue' does not occur" in capsys.readouterr().err


def test_inspect_writes_grid_mask_and_json(tmp_path, world):
    import json

    code = main(["inspect", "--prompt", "a red circle in the west", "--word", "circle", "--steps", "0,6,11",
                 "--out", str(tmp_path)])
    assert code == 0
    data = json.loads((tmp_path / "inspect.json").read_text())
    assert data["steps"] == [0, 6, 11] and data["attention_mass"] > 0
    assert set(data["attention_mass_per_block_step"]) == {"double.0", "double.1", "double.2"}
    from PIL import Image

    assert Image.open(tmp_path / "inspect.png").width > 100
    assert Image.open(tmp_path / "mask.png").size == (128, 128)


def test_sandbox_check_takes_the_sampler_settings(tmp_path, capsys, monkeypatch):
    """`sandbox check --steps/--cfg/--shift` reach the sampler and are recorded with the table."""
    from erase_core.sandbox.pipeline import SandboxWorld

    seen = []
    original = SandboxWorld.sample

    def spy(self, prompts, seed=0, **kw):
        seen.append((kw.get("steps"), kw.get("cfg_scale"), kw.get("shift")))
        return original(self, prompts, seed, **kw)

    monkeypatch.setattr(SandboxWorld, "sample", spy)
    out = tmp_path / "q"
    main(["sandbox", "check", "--concepts", "north", "--samples", "2", "--steps", "3", "--cfg", "1.5", "--shift", "3",
          "--out", str(out)])
    report = json.loads(out.with_suffix(".json").read_text())
    assert (report["euler_steps"], report["cfg"], report["shift"], report["device"]) == (3, 1.5, 3.0, "cpu")
    assert seen and set(seen) == {(3, 1.5, 3.0)}
