"""Run the sandbox example workflows in a real ComfyUI through its web UI and screenshot them for the docs.

Run it with ComfyUI's own Python (it needs aiohttp, and PIL/numpy for the blank-image check), e.g.::

    /work/comfy/venv/bin/python scripts/screenshot_workflows.py --comfy /work/comfy/ComfyUI

It starts ComfyUI on 127.0.0.1 (port 8195 or the first free one above; ``--cpu``, API nodes off, in-memory database,
a throw-away user / output / temp / input directory, ``OMP_NUM_THREADS=1``), opens the UI in a headless Chromium
(driven over the DevTools protocol with the helpers of ``scripts/web_check.py``) and, for every
``workflows/sandbox_<name>.json``:

* loads the UI-format workflow into the page (``app.loadGraphData``);
* lowers every Erase Concept's ``steps`` to ``--erase-steps`` (30; the shipped 200 take ~6× longer on a CPU), sets
  its ``synonyms`` where ``--synonyms concept=list`` asks, and, only if a LoRA of that name already exists under
  ``models/loras/erase_flux/``, renames the LoRA this run saves;
* queues it from the page (``app.queuePrompt(0)``, as the Run button does) and waits for its ``/history`` entry;
* waits for the image previews on the SaveImage / PreviewImage nodes, fits the graph to the view, switches to focus
  mode (no menus or side bars) and saves ``docs/img/workflow_<name>.png`` (1400×900);
* copies the run's main output images to ``docs/img/out_<what>.png``.

Every screenshot is checked for a non-blank picture (grey-level std). The server and Chromium are stopped by their
PIDs; the LoRA files this run created (and only those) are deleted, and the output folder (a temp directory) removed.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from web_check import launch_chromium, open_comfy_page  # noqa: E402

VIEW_W, VIEW_H = 1400, 900
NAMES = ("sandbox_inspect", "sandbox_suppress", "sandbox_erase", "sandbox_merge", "sandbox_neighbours")
MIN_SHOT_STD = 10.0
# SaveImage filename_prefix (last part) → docs/img/out_<what>.png; the heatmap grid comes from sandbox_erase's A/B
# inspector when that workflow ran, else from sandbox_inspect.
OUTPUTS = {
    "sandbox_inspect": {"inspect_heatmaps": "heatmaps"},
    "sandbox_suppress": {"suppress_before": "suppress_before", "suppress_after": "suppress_after"},
    "sandbox_erase": {"erase_attention_ab": "heatmaps", "erase_loss": "loss_curves"},
    "sandbox_merge": {"merge_interference": "merge_interference"},
    "sandbox_neighbours": {"neighbours": "neighbours"},
}
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False, "Comfy.Graph.CanvasInfo": False,
            "LiteGraph.Canvas.MinFontSizeForLOD": 0,  # keep text and widgets drawn when zoomed out
            "Comfy.VueNodes.Enabled": False}

# Load a workflow, make Erase Concept quick, rename LoRAs that would overwrite existing files. Returns the LoRA stems.
LOAD = r"""(async (data, name, steps, taken, synonyms) => {
  const app = window.app ?? window.comfyAPI.app.app;
  await app.loadGraphData(data, true, true, name);
  const w = (n, k) => n.widgets?.find((x) => x.name === k);
  const loras = [];
  for (const n of app.graph._nodes) {
    if (n.type === "EraseFlux_EraseConcept") {
      const s = w(n, "steps"); if (s.value > steps) s.value = steps;
      const syn = synonyms[w(n, "concept").value.trim()]; if (syn !== undefined) w(n, "synonyms").value = syn;
    }
    const key = n.type === "EraseFlux_EraseConcept" ? "lora_name" : n.type === "EraseFlux_MergeLoras" ? "name" : null;
    if (key) {
      const x = w(n, key);
      while (taken.includes(x.value)) x.value = `shot_${x.value}`;
      loras.push(x.value);
    }
  }
  app.graph.setDirtyCanvas(true, true);
  return loras;
})"""

# Image previews present and decoded on every node that got images.
IMAGES_READY = r"""(() => {
  const app = window.app ?? window.comfyAPI.app.app;
  const ids = %s;
  app.graph.setDirtyCanvas(true, true); app.canvas.draw(true, true);
  return ids.every((id) => { const n = app.graph.getNodeById(id);
    return n && n.imgs?.length && n.imgs.every((i) => i.complete && i.naturalWidth > 0)
      && n.widgets?.some((w) => w.name === "$$canvas-image-preview"); });
})()"""

# Position, size and loaded previews of the nodes that got images (for the report).
NODE_STATE = r"""(() => {
  const app = window.app ?? window.comfyAPI.app.app;
  return %s.map((id) => { const n = app.graph.getNodeById(id);
    return { id, type: n?.type, pos: n?.pos && [...n.pos], size: n?.size && [...n.size],
             imgs: (n?.imgs ?? []).map((i) => [i.naturalWidth, i.naturalHeight, i.src.split("?")[1]]) }; });
})()"""

# Make room for the image previews, which the workflow's layout (from scripts/workflow_ui.py) does not leave:
# every image node gets the height that shows its first image at the node's width (the frontend never enlarges an
# image, so a 32×32 sample needs little; the preview's 220-unit minimum is lowered to that), at most `cap`; nodes
# below it in its column move down; then an image node may grow into free space below it, up to what it needs.
LAYOUT = r"""(async (gap, cap) => {
  const app = window.app ?? window.comfyAPI.app.app, th = LiteGraph.NODE_TITLE_HEIGHT, nodes = app.graph._nodes;
  const want = new Map();
  for (const n of nodes) {
    const img = n.imgs?.[0], pw = n.widgets?.find((w) => w.name === "$$canvas-image-preview");
    if (!img || !pw) continue;
    const h = Math.min(img.naturalHeight, (n.size[0] - 20) * img.naturalHeight / img.naturalWidth) + 30;
    pw.computeLayoutSize = () => ({ minHeight: Math.min(220, h), minWidth: 1 });
    want.set(n, pw.y + h);
    n.setSize([n.size[0], Math.max(n.computeSize()[1], Math.min(pw.y + h, cap))]);
  }
  const over = (a, b) => a.pos[0] < b.pos[0] + b.size[0] && b.pos[0] < a.pos[0] + a.size[0];
  const done = [];
  for (const b of [...nodes].sort((a, b) => a.pos[1] - b.pos[1])) {
    for (const a of done) if (over(a, b)) b.pos[1] = Math.max(b.pos[1], a.pos[1] + a.size[1] + th + gap);
    done.push(b);
  }
  const bottom = Math.max(...nodes.map((n) => n.pos[1] + n.size[1]));
  for (const [n, w] of want) {
    const below = nodes.filter((m) => m !== n && m.pos[1] > n.pos[1] && over(m, n));
    const limit = Math.min(n.pos[1] + w, below.length ? Math.min(...below.map((m) => m.pos[1] - th - gap)) : bottom);
    if (limit > n.pos[1] + n.size[1]) n.setSize([n.size[0], limit - n.pos[1]]);
  }
  app.graph.setDirtyCanvas(true, true);
  return [...want].map(([n, w]) => [n.id, Math.round(w), [...n.size]]);
})"""

# Fit every node (title bar included) into the canvas, centred, zoom capped at `maxScale`.
FIT = r"""(async (maxScale, margin) => {
  const app = window.app ?? window.comfyAPI.app.app, c = app.canvas, th = LiteGraph.NODE_TITLE_HEIGHT;
  c.deselectAll?.();
  let [x0, y0, x1, y1] = [Infinity, Infinity, -Infinity, -Infinity];
  for (const n of app.graph._nodes) {
    x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - th);
    x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
  }
  const r = c.canvas.getBoundingClientRect(), W = r.width, H = r.height;
  const s = Math.min(maxScale, (W - 2 * margin) / (x1 - x0), (H - 2 * margin) / (y1 - y0));
  c.ds.scale = s;
  c.ds.offset = [(W / s - (x1 - x0)) / 2 - x0, (H / s - (y1 - y0)) / 2 - y0];
  app.graph.setDirtyCanvas(true, true); c.draw(true, true);
  await new Promise((res) => requestAnimationFrame(() => requestAnimationFrame(res)));
  return { scale: s, bounds: [x0, y0, x1, y1], canvas: [W, H] };
})"""


def free_port() -> int:
    """A port the OS says is free now (bind to 0)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def grey_std(png: Path) -> float:
    import numpy as np
    from PIL import Image

    return float(np.asarray(Image.open(png).convert("L"), dtype=np.float32).std())


def start_server(comfy: Path, python: str, tmp: Path, port: int) -> subprocess.Popen:
    for d in ("output", "temp", "input", "user/default"):
        (tmp / d).mkdir(parents=True, exist_ok=True)
    (tmp / "user" / "default" / "comfy.settings.json").write_text(json.dumps(SETTINGS))
    cmd = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-api-nodes",
           "--database-url", "sqlite:///:memory:", "--user-directory", str(tmp / "user"),
           "--output-directory", str(tmp / "output"), "--temp-directory", str(tmp / "temp"),
           "--input-directory", str(tmp / "input")]
    with open(tmp / "comfyui.log", "wb") as log:
        return subprocess.Popen(cmd, cwd=comfy, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})


def stop(proc: subprocess.Popen | None, sig=signal.SIGTERM) -> None:
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(sig)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)


async def wait_server(http: aiohttp.ClientSession, url: str, proc: subprocess.Popen, log: Path, timeout=300):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"ComfyUI exited ({proc.returncode}):\n{log.read_text(errors='replace')[-3000:]}")
        try:
            async with http.get(url + "/system_stats") as r:
                if r.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        await asyncio.sleep(1)
    raise TimeoutError(f"ComfyUI did not answer in {timeout} s")


async def run_all(args, url: str, dev_port: int, tmp: Path, loras_dir: Path, created: list[Path]) -> dict:
    report: dict = {"workflows": {}}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    copies: dict[str, Path] = {}
    synonyms = dict(x.split("=", 1) for x in args.synonyms)
    async with aiohttp.ClientSession() as http:
        async with open_comfy_page(http, dev_port, url, "EraseFlux_EraseConcept", 240, settle=1.5,
                                   width=VIEW_W, height=VIEW_H) as (page, load_s):
            report["ui_load_s"] = load_s
            await page.js("document.dispatchEvent(new KeyboardEvent('keydown', {key: 'Escape'})); true")
            await page.js("(window.app ?? window.comfyAPI.app.app).extensionManager.command"
                          ".execute('Workspace.ToggleFocusMode').then(() => true)")

            for name in args.only or NAMES:
                t1 = time.monotonic()
                data = json.loads((ROOT / "workflows" / f"{name}.json").read_text())
                taken = sorted(p.stem for p in loras_dir.glob("*.safetensors"))
                loras = await page.js(f"{LOAD}({json.dumps(data)}, {json.dumps(name)}, {args.erase_steps},"
                                      f" {json.dumps(taken)}, {json.dumps(synonyms)})")
                for stem in loras:
                    for p in (loras_dir / f"{stem}.safetensors", loras_dir / "checkpoints" / f"{stem}.pt"):
                        if not p.exists() and p not in created:
                            created.append(p)
                async with http.get(url + "/history") as r:
                    before = set(await r.json())
                await page.js(f"{FIT}({args.max_scale}, 16)")
                await page.js("(window.app ?? window.comfyAPI.app.app).queuePrompt(0, 1).then(() => true)")
                entry = None
                end = time.monotonic() + args.timeout
                while time.monotonic() < end:
                    async with http.get(url + "/history") as r:
                        hist = await r.json()
                    new = [v for k, v in hist.items() if k not in before]
                    if new and new[0].get("status", {}).get("completed") is not None:
                        entry = new[0]
                        break
                    await asyncio.sleep(1)
                if entry is None:
                    raise TimeoutError(f"{name}: no finished /history entry after {args.timeout} s")
                status = entry["status"]["status_str"]
                run_s = round(time.monotonic() - t1, 1)
                outputs = entry.get("outputs", {})
                img_nodes = [int(k) for k, v in outputs.items() if v.get("images")]
                ready = IMAGES_READY % json.dumps(img_nodes)
                try:  # previews load when their node is drawn: every node is on screen since the fit
                    await page.wait_for(ready, 30, f"{name}'s image previews")
                except TimeoutError:
                    pass
                await page.js(f"{LAYOUT}(40, {args.max_image_h})")
                fit = await page.js(f"{FIT}({args.max_scale}, 16)")
                await asyncio.sleep(1.0)
                previews = bool(await page.js(ready))
                nodes_state = await page.js(NODE_STATE % json.dumps(img_nodes))
                shot = await page.send("Page.captureScreenshot", format="png")
                path = out_dir / f"workflow_{name.removeprefix('sandbox_')}.png"
                path.write_bytes(base64.b64decode(shot["data"]))
                std = grey_std(path)
                # Main output images: the first image of each wanted SaveImage node.
                for nid, out in outputs.items():
                    for im in out.get("images", [])[:1]:
                        stem = im["filename"].rsplit("_", 2)[0]  # <prefix>_00001_.png
                        what = OUTPUTS.get(name, {}).get(stem)
                        if what and im.get("type") == "output":
                            src = tmp / "output" / im.get("subfolder", "") / im["filename"]
                            if what not in copies or name == "sandbox_erase":
                                copies[what] = src
                report["workflows"][name] = {"status": status, "run_s": run_s, "previews": previews,
                                             "scale": round(fit["scale"], 3), "shot": str(path),
                                             "shot_std": round(std, 1), "loras": loras,
                                             "image_nodes": nodes_state}
                print(f"[{name}] {status} in {run_s} s, previews {previews}, zoom {fit['scale']:.2f}, "
                      f"screenshot std {std:.1f}", file=sys.stderr, flush=True)
                if status != "success":
                    msgs = [m for m in entry["status"].get("messages", []) if m[0] == "execution_error"]
                    print(json.dumps(msgs)[:3000], file=sys.stderr)
            report["console_errors"] = await page.js("window.__efErrors ?? []")
    for what, src in copies.items():
        dst = out_dir / f"out_{what}.png"
        shutil.copyfile(src, dst)
        report.setdefault("outputs", {})[what] = str(dst)
    return report


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--comfy", default=os.environ.get("ERASE_FLUX_COMFYUI", "/work/comfy/ComfyUI"))
    ap.add_argument("--python", default=sys.executable, help="ComfyUI's python (default: this one)")
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium")
    ap.add_argument("--out", default=str(ROOT / "docs" / "img"))
    ap.add_argument("--only", nargs="*", choices=NAMES, help="workflows to run (default: all five)")
    ap.add_argument("--erase-steps", type=int, default=30, help="cap on Erase Concept's steps (default 30)")
    ap.add_argument("--synonyms", action="append", default=[], metavar="CONCEPT=LIST",
                    help="set Erase Concept's synonyms for that concept instead of the workflow's (repeatable)")
    ap.add_argument("--max-scale", type=float, default=1.25, help="largest canvas zoom when fitting")
    ap.add_argument("--max-image-h", type=int, default=520, help="image node height cap (graph units) when laying out")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per workflow run")
    ap.add_argument("--keep-temp", action="store_true", help="keep the temp dir (log, outputs)")
    a = ap.parse_args(argv)
    comfy = Path(a.comfy)
    link = comfy / "custom_nodes" / "comfyui-erase-flux"
    if not link.resolve() == ROOT.resolve():
        raise SystemExit(f"{link} is not a link to {ROOT}")
    loras_dir = comfy / "models" / "loras" / "erase_flux"
    tmp = Path(tempfile.mkdtemp(prefix="erase_flux_shots_"))
    profile = tempfile.mkdtemp(prefix="erase_flux_chromium_")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = browser = None
    created: list[Path] = []
    t0 = time.monotonic()
    try:
        server = start_server(comfy, a.python, tmp, port)

        async def up():
            async with aiohttp.ClientSession() as http:
                await wait_server(http, url, server, tmp / "comfyui.log")
        asyncio.run(up())
        print(f"[server] {url} up in {time.monotonic() - t0:.1f} s (pid {server.pid})", file=sys.stderr, flush=True)
        browser, dev_port = launch_chromium(a.chromium, profile)
        report = asyncio.run(run_all(a, url, dev_port, tmp, loras_dir, created))
    finally:
        stop(browser)
        stop(server)
        removed = [str(p) for p in created if p.is_file()]
        for p in created:
            p.unlink(missing_ok=True)
        shutil.rmtree(profile, ignore_errors=True)
        if not a.keep_temp:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"[temp] kept {tmp}", file=sys.stderr)
    report["total_s"] = round(time.monotonic() - t0, 1)
    report["removed_loras"] = removed
    print(json.dumps(report, indent=1))
    bad = [n for n, w in report["workflows"].items()
           if w["status"] != "success" or w["shot_std"] < MIN_SHOT_STD or not w["previews"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
