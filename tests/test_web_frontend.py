"""The pack's front end (web/erase_flux.js) in a real ComfyUI, driven by a headless Chromium.

Skipped unless ``ERASE_FLUX_COMFYUI`` names a ComfyUI tree, ``ERASE_FLUX_COMFY_PYTHON`` its venv's python, and a
Chromium is installed (``chromium`` on PATH, or ``ERASE_FLUX_CHROMIUM``; on Debian ``apt-get install chromium``)::

    ERASE_FLUX_COMFYUI=/work/comfy/ComfyUI ERASE_FLUX_COMFY_PYTHON=/work/comfy/venv/bin/python \\
        python -m pytest -q -s tests/test_web_frontend.py

The pack is linked into ``custom_nodes/comfyui-erase-flux``; a ComfyUI server is started on a free loopback port
(8193 and up) with a throw-away user directory, and stopped by its PID. ``scripts/web_check.py`` (run with ComfyUI's
python, for aiohttp) drives Chromium over the DevTools protocol: it adds both nodes, types a prompt, clicks word chips
with real mouse events, sets merge weights and modes, saves a screenshot and reports what it saw as JSON. The
screenshot is kept as ``docs/img/web_extension.png``.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACK_LINK = "comfyui-erase-flux"
SERVER_START_S = 180
SHOT = ROOT / "docs" / "img" / "web_extension.png"
MIN_SHOT_STD = 10.0  # grey-level standard deviation of a screenshot that shows a UI (a blank page is ~0)


def _config():
    comfy, python = os.environ.get("ERASE_FLUX_COMFYUI"), os.environ.get("ERASE_FLUX_COMFY_PYTHON")
    if not comfy or not python:
        pytest.skip("set ERASE_FLUX_COMFYUI (a ComfyUI tree) and ERASE_FLUX_COMFY_PYTHON (its venv's python) "
                    "to run the front-end test")
    if not (Path(comfy) / "main.py").is_file():
        pytest.skip(f"ERASE_FLUX_COMFYUI={comfy} has no main.py")
    if not os.access(python, os.X_OK):
        pytest.skip(f"ERASE_FLUX_COMFY_PYTHON={python} is not an executable")
    chromium = os.environ.get("ERASE_FLUX_CHROMIUM") or next(
        (p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    if not chromium:
        pytest.skip("no Chromium found (install one, e.g. `apt-get install chromium`, or set ERASE_FLUX_CHROMIUM)")
    return Path(comfy), python, chromium


def _link_pack(comfy: Path) -> None:
    link = comfy / "custom_nodes" / PACK_LINK
    if link.is_symlink():
        if link.resolve() == ROOT.resolve():
            return
        link.unlink()
    elif link.exists():
        pytest.fail(f"{link} exists and is not a symlink; remove it or link it to {ROOT}")
    link.symlink_to(ROOT, target_is_directory=True)


def _free_port() -> int:
    """A port the OS says is free now (bind to 0), as test_comfy_e2e picks its server's."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str, timeout: float = 5):
    with urllib.request.urlopen(url, timeout=timeout) as r:
        return r.status, r.read()


def _wait_up(proc: subprocess.Popen, url: str, log: Path) -> None:
    end = time.monotonic() + SERVER_START_S
    while time.monotonic() < end:
        if proc.poll() is not None:
            pytest.fail(f"ComfyUI exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            _get(url + "/system_stats", 2)
            return
        except OSError:
            time.sleep(1)
    pytest.fail(f"ComfyUI did not answer within {SERVER_START_S} s:\n{log.read_text()[-3000:]}")


def _grey_std(png: Path) -> float:
    import numpy as np
    from PIL import Image

    return float(np.asarray(Image.open(png).convert("L"), dtype=np.float32).std())


def _median_rgb(png: Path, box) -> tuple[int, ...]:
    """Median colour inside an (x, y, width, height) box: a chip's background rather than its letters."""
    import numpy as np
    from PIL import Image

    x, y, w, h = (int(round(v)) for v in box)
    px = np.asarray(Image.open(png).convert("RGB"))[y:y + h, x:x + w].reshape(-1, 3)
    return tuple(int(v) for v in np.median(px, axis=0))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    comfy, python, chromium = _config()
    _link_pack(comfy)
    tmp = tmp_path_factory.mktemp("web")
    user = tmp / "user"
    (user / "default").mkdir(parents=True)
    # No first-run template browser or minimap over the nodes; kept out of the tree's own user/ folder.
    (user / "default" / "comfy.settings.json").write_text(json.dumps(
        {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False}))
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp / "comfyui.log"
    t0 = time.monotonic()
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-api-nodes",
             "--database-url", "sqlite:///:memory:", "--user-directory", str(user)],
            cwd=comfy, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        _wait_up(proc, url, log)
        started = time.monotonic() - t0
        text = log.read_text(errors="replace")
        assert not any("IMPORT FAILED" in ln and PACK_LINK in ln for ln in text.splitlines()), text[-3000:]
        status, body = _get(url + "/object_info/EraseFlux_MergeLoras")
        assert status == 200 and b"EraseFlux_MergeLoras" in body
        shot = tmp / "web_extension.png"
        run = subprocess.run([python, str(ROOT / "scripts" / "web_check.py"), url, "--chromium", chromium,
                              "--screenshot", str(shot)], capture_output=True, text=True, timeout=400)
        assert run.returncode == 0, f"web_check failed:\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
        data = json.loads(run.stdout.strip().splitlines()[-1])
        print(f"\n[web] server up in {started:.1f} s, UI loaded in {data['load_s']} s, "
              f"browser run {time.monotonic() - t0 - started:.1f} s")
        data["shot_path"] = shot
        return data
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(15)


def test_extension_is_served_and_loaded(report):
    assert report["served"] == {"status": 200, "has_register": True}
    assert report["extension_registered"], "the page never requested erase_flux.js"
    assert report["setup"]["inspect"] and report["setup"]["merge"], "our panels were not added to the nodes"
    ours = [e["msg"] for e in report["console_errors"] if e["ours"]]
    assert not ours, ours


def test_word_chips_follow_the_prompt_and_set_word(report):
    assert [c["text"] for c in report["chips_default"]] == ["a", "red", "circle"]
    assert [c["text"] for c in report["chips_default"] if c["selected"]] == ["red"]  # the default word
    typed = report["after_typing"]  # live: typed into the textarea, punctuation dropped
    assert typed["prompt"] == "a red circle, on a blue square (photo)"
    assert [c["text"] for c in typed["chips"]] == ["a", "red", "circle", "on", "a", "blue", "square", "photo"]
    click, other, shift = report["clicks"]
    for c in report["clicks"]:
        assert c.get("hit_test") == c["chip"], f"chip {c['chip']!r} is not clickable on screen: {c}"
    assert click["word"] == "circle" and click["selected"] == ["circle"]
    assert other["word"] == "blue" and other["selected"] == ["blue"]
    assert shift["word"] == "blue square" and shift["selected"] == ["blue", "square"]  # shift-click appends


def test_effective_weights(report):
    norm = report["merge_normalized"]  # slots 3 and 4 are 'none': their weights (5, 1) do not count
    assert norm["values"] == [0.25, 0.75, None, None] and norm["sum"] == 4 and norm["warnings"] == []
    assert norm["rows"] == ["×0.250", "×0.750"]
    zero = report["merge_zero"]
    assert zero["sum"] == 0 and any("sum to 0" in w for w in zero["warnings"]) and "⚠" in zero["text"]
    plain = report["merge_sum"]  # sum/concat: the weights as given
    assert plain["values"] == [0.5, 1.5, None, None] and plain["rows"] == ["×0.500", "×1.500"]
    assert report["merge_callback"] == [0.5, 0.5, None, None]  # a widget edit updates at once


def test_pure_helpers(report):
    pure = report["pure"]
    assert pure["words"] == ["Van", "Gogh", "s", "sci", "fi", "café_2", "8k"]  # \\w runs, like the node's match
    # the chips highlight exactly what the node will inspect: same spans as erase_core.tokens.word_spans
    from erase_core.tokens import word_spans

    cases = [("a Red red-ish RED disc", "red"), ("a red  circle, red disc", "Red circle"), ("a (red) circle", "(red)")]
    assert pure["spans"] == [[list(sp) for sp in word_spans(p, w)] for p, w in cases]
    assert pure["linked"]["values"] == [pytest.approx(1 / 3), None]  # linked lora_a / lora_b count with weight 1
    assert pure["linked"]["linked"] == [pytest.approx(1 / 3)] * 2 and pure["linked"]["warnings"] == []
    assert any("≥ 0" in w for w in pure["negative"]["warnings"])
    assert any("distill needs weights ≥ 0" in w for w in pure["negative_distill"]["warnings"])  # as merge.py refuses
    assert pure["negative_sum"]["warnings"] == []  # sum and concat take signed weights
    assert pure["single"]["values"] == [2, None] and any("two" in w for w in pure["single"]["warnings"])


def test_workflow_round_trip(report):
    rt = report["roundtrip"]
    # Our panels are not serialised: the saved values are exactly the nodes' own widgets (after the name: the
    # closed_form mode's optional preserve, preserve_weight, width, height, then distill's steps, batch, images, cfg,
    # noisings, at their defaults).
    assert rt["saved"]["EraseFlux_MergeLoras"] == ["a.safetensors", 1, "b.safetensors", 3, "none", 5, "none", 1,
                                                   "normalized", 0, "merged_erase", "", 1000, 32, 32, 1500, 16, 64, 1,
                                                   8]
    assert rt["saved"]["EraseFlux_AttentionInspect"][:2] == ["a red circle, on a blue square (photo)", "blue square"]
    assert rt["panels"] == [1, 1] and rt["word"] == "blue square"
    assert [c["text"] for c in rt["chips"] if c["selected"]] == ["blue", "square"]
    assert rt["weights"] == [0.25, 0.75, None, None]


def test_screenshot(report):
    shot = report["shot_path"]
    std = _grey_std(shot)
    assert std > MIN_SHOT_STD, f"screenshot looks blank (grey std {std:.1f})"
    probe = report["shot_probe"]
    r, g, b = _median_rgb(shot, probe["selected_chip"])
    assert b > r + 40, f"the selected chip is not highlighted in the screenshot: rgb {(r, g, b)}"
    assert probe["weights_box"][3] > 20, probe
    SHOT.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(shot, SHOT)
