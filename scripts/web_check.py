"""Drive a headless Chromium against a running ComfyUI and exercise the pack's front end (web/erase_flux.js).

Run it with ComfyUI's own Python (it needs only aiohttp, which ComfyUI requires):

    /path/to/comfy/venv/bin/python scripts/web_check.py http://127.0.0.1:8193 --screenshot out.png

It speaks Chromium's DevTools protocol directly (no Playwright, no browser download): it starts Chromium with
``--remote-debugging-port=0``, opens the UI, adds an Attention Map Inspector and a Merge Erase LoRAs node, types a
prompt, clicks word chips with real mouse events, sets merge weights and modes, saves a screenshot and prints one
JSON object with what it observed (tests/test_web_frontend.py asserts on it). Chromium is stopped by its PID.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import base64
import itertools
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import aiohttp

EXT_URL = "/extensions/comfyui-erase-flux/erase_flux.js"
VIEW_W, VIEW_H = 1280, 820
PROMPT = "a red circle, on a blue square (photo)"


class Page:
    """A minimal DevTools-protocol client for one page target."""

    def __init__(self, ws):
        self.ws, self.ids = ws, itertools.count(1)

    async def send(self, method: str, **params):
        i = next(self.ids)
        await self.ws.send_json({"id": i, "method": method, "params": params})
        while True:
            msg = await self.ws.receive_json(timeout=120)
            if msg.get("id") == i:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})

    async def js(self, expr: str):
        """Evaluate an expression (awaited if it is a promise) and return its JSON value."""
        res = await self.send("Runtime.evaluate", expression=expr, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in res:
            d = res["exceptionDetails"]
            raise RuntimeError(f"page error: {d.get('exception', {}).get('description') or d.get('text')}")
        return res.get("result", {}).get("value")

    async def wait_for(self, expr: str, timeout: float, what: str):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                if await self.js(expr):
                    return
            except RuntimeError:
                pass
            await asyncio.sleep(0.5)
        raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}")

    async def click(self, x: float, y: float, shift: bool = False):
        mods = 8 if shift else 0
        await self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y, modifiers=mods)
        for kind in ("mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1, modifiers=mods)


# Page-side helpers, installed once as window.__ef.
HELPERS = r"""
window.__ef = {
  app: () => window.app ?? window.comfyAPI.app.app,
  node: (type) => window.__ef.app().graph._nodes.find((n) => n.type === type),
  widget: (node, name) => node.widgets.find((w) => w.name === name),
  frame: () => new Promise((r) => requestAnimationFrame(() => requestAnimationFrame(() => r()))),
  async redraw() { const a = window.__ef.app(); a.graph.setDirtyCanvas(true, true); a.canvas.draw(true, true); await window.__ef.frame(); },
  center(el) { const r = el.getBoundingClientRect(); return r.width > 0 ? { x: r.x + r.width / 2, y: r.y + r.height / 2 } : null; },
  chipAt(word) {
    const w = window.__ef.widget(window.__ef.node("EraseFlux_AttentionInspect"), "erase_flux_words");
    const chip = [...w.element.querySelectorAll("button")].find((b) => b.dataset.word === word);
    return chip ? window.__ef.center(chip) : null;
  },
  inspectState() {
    const n = window.__ef.node("EraseFlux_AttentionInspect");
    return { word: window.__ef.widget(n, "word").value, prompt: window.__ef.widget(n, "prompt").value,
             chips: n.__eraseFluxWords };
  },
};
true
"""

# Collects uncaught errors and console.error lines of the page (installed before any page script runs).
CATCH_ERRORS = r"""
window.__efErrors = [];
addEventListener("error", (e) => window.__efErrors.push({ msg: `error: ${e.message} @ ${e.filename}:${e.lineno}`,
  ours: String(e.filename).includes("erase_flux") || String(e.error?.stack).includes("erase_flux") }));
addEventListener("unhandledrejection", (e) => window.__efErrors.push({ msg: `rejection: ${e.reason}`,
  ours: String(e.reason?.stack ?? e.reason).includes("erase_flux") }));
const __efConsoleError = console.error;
console.error = function (...args) { window.__efErrors.push({ msg: `console.error: ${args.map(String).join(" ")}`,
  ours: String(new Error().stack).includes("erase_flux") });
  return __efConsoleError.apply(this, args); };
"""

SETUP_GRAPH = r"""(async () => {
  const ef = window.__ef, app = ef.app();
  app.graph.clear();
  const a = LiteGraph.createNode("EraseFlux_AttentionInspect"); a.pos = [30, 30]; app.graph.add(a);
  const m = LiteGraph.createNode("EraseFlux_MergeLoras"); m.pos = [560, 30]; app.graph.add(m);
  a.setSize([480, a.size[1]]); m.setSize([420, m.size[1]]);
  app.canvas.ds.offset = [70, 90]; app.canvas.ds.scale = 1;
  await ef.redraw(); await ef.redraw();
  return { inspect: !!a.widgets.find((w) => w.name === "erase_flux_words"),
           merge: !!m.widgets.find((w) => w.name === "erase_flux_weights"),
           sizes: [a.size, m.size] };
})()"""

SET_MERGE = r"""(async (vals, mode) => {
  const ef = window.__ef, m = ef.node("EraseFlux_MergeLoras");
  vals.forEach(([lora, weight], i) => {
    ef.widget(m, `lora_${i + 1}`).value = lora; ef.widget(m, `weight_${i + 1}`).value = weight;
  });
  ef.widget(m, "mode").value = mode;
  await ef.redraw();
  const rows = [...ef.widget(m, "erase_flux_weights").element.querySelectorAll("[data-value]")].map((r) => r.dataset.value);
  return { ...m.__eraseFluxNormalized, rows, text: ef.widget(m, "erase_flux_weights").element.innerText };
})"""

# Where the screenshot should show our UI: a selected chip's centre and the weights panel's box (CSS pixels).
SHOT_PROBE = r"""(() => {
  const ef = window.__ef, a = ef.node("EraseFlux_AttentionInspect"), m = ef.node("EraseFlux_MergeLoras");
  const chip = ef.widget(a, "erase_flux_words").element.querySelector("button[data-selected]");
  const box = (e) => { const r = e.getBoundingClientRect(); return [r.x, r.y, r.width, r.height]; };
  return { selected_chip: chip ? box(chip) : null, weights_box: box(ef.widget(m, "erase_flux_weights").element) };
})()"""

# The module's pure helpers, imported from the served file (the same module instance the app loaded).
PURE = r"""import("%s").then((m) => ({
  words: m.promptWords("Van Gogh's sci-fi café_2, (8k)!").map((w) => w.text),
  spans: [m.phraseSpans("a Red red-ish RED disc", "red"), m.phraseSpans("a red  circle, red disc", "Red circle"),
          m.phraseSpans("a (red) circle", "(red)")],
  linked: m.effectiveWeights([{lora: "a", weight: 1}, {lora: "none", weight: 9}], "normalized", 2),
  negative: m.effectiveWeights([{lora: "a", weight: 2}, {lora: "b", weight: -1}], "normalized"),
  negative_distill: m.effectiveWeights([{lora: "a", weight: 2}, {lora: "b", weight: -1}], "distill"),
  negative_sum: m.effectiveWeights([{lora: "a", weight: 2}, {lora: "b", weight: -1}], "sum"),
  single: m.effectiveWeights([{lora: "a", weight: 2}, {lora: "none", weight: 1}], "concat"),
}))""" % EXT_URL

# Save the workflow and load it again: values survive, our panels are not serialised, chips/weights are rebuilt.
ROUNDTRIP = r"""(async () => {
  const ef = window.__ef, app = ef.app();
  const data = JSON.parse(JSON.stringify(app.graph.serialize()));
  const saved = Object.fromEntries(data.nodes.map((n) => [n.type, n.widgets_values]));
  await app.loadGraphData(data);
  app.canvas.ds.offset = [70, 90]; app.canvas.ds.scale = 1;
  await ef.redraw(); await ef.redraw();
  const a = ef.node("EraseFlux_AttentionInspect"), m = ef.node("EraseFlux_MergeLoras");
  return { saved, word: ef.widget(a, "word").value, chips: a.__eraseFluxWords,
           panels: [a, m].map((n) => n.widgets.filter((w) => w.name.startsWith("erase_flux_")).length),
           weights: m.__eraseFluxNormalized.values };
})()"""


def launch_chromium(binary: str, profile: str) -> tuple[subprocess.Popen, int]:
    args = [binary, "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
            "--no-default-browser-check", "--disable-extensions", "--mute-audio", f"--user-data-dir={profile}",
            "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0", f"--window-size={VIEW_W},{VIEW_H}",
            "about:blank"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    port_file = os.path.join(profile, "DevToolsActivePort")
    end = time.monotonic() + 60
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"chromium exited with status {proc.returncode}")
        if os.path.exists(port_file):
            lines = open(port_file).read().split()
            if lines:
                return proc, int(lines[0])
        time.sleep(0.2)
    proc.kill()
    raise TimeoutError("chromium did not open its DevTools port within 60 s")


@contextlib.asynccontextmanager
async def open_comfy_page(http, dev_port: int, url: str, node_type: str, timeout: float, settle: float = 1.0,
                          width: int = VIEW_W, height: int = VIEW_H):
    """The first page of the Chromium at ``dev_port`` sized ``width``×``height``, browser errors caught, ComfyUI at
    ``url`` loaded until ``node_type`` is registered (then ``settle`` seconds more); yields (page, seconds it took)."""
    async with http.get(f"http://127.0.0.1:{dev_port}/json/list") as r:
        target = next(t for t in await r.json() if t.get("type") == "page")
    async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
        page = Page(ws)
        await page.send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                        mobile=False)
        await page.send("Page.enable")
        await page.send("Page.addScriptToEvaluateOnNewDocument", source=CATCH_ERRORS)
        t0 = time.monotonic()
        await page.send("Page.navigate", url=url)
        await page.wait_for("!!((window.app ?? window.comfyAPI?.app?.app)?.graph && window.LiteGraph"
                            f" && LiteGraph.registered_node_types['{node_type}'])", timeout, "the ComfyUI app")
        await asyncio.sleep(settle)
        yield page, round(time.monotonic() - t0, 1)


async def scenario(url: str, dev_port: int, screenshot: str | None) -> dict:
    out: dict = {}
    async with aiohttp.ClientSession() as http:
        async with http.get(url + EXT_URL) as r:
            body = await r.text()
            out["served"] = {"status": r.status, "has_register": "registerExtension" in body}
        async with open_comfy_page(http, dev_port, url, "EraseFlux_MergeLoras", 180, settle=1.0) as (page, load_s):
            out["load_s"] = load_s
            await page.js(HELPERS)
            out["extension_registered"] = await page.js(
                "[...document.querySelectorAll('script')].length >= 0 && "
                "performance.getEntriesByType('resource').some((e) => e.name.endsWith('" + EXT_URL + "'))")
            await page.js("document.dispatchEvent(new KeyboardEvent('keydown', {key: 'Escape'})); true")
            out["setup"] = await page.js(SETUP_GRAPH)

            # Word chips: the default prompt, then live typing into the prompt textarea.
            out["chips_default"] = (await page.js("__ef.inspectState()"))["chips"]
            await page.js("(() => { const t = __ef.widget(__ef.node('EraseFlux_AttentionInspect'), 'prompt').element;"
                          " t.focus(); t.select(); return true; })()")
            await page.send("Input.insertText", text=PROMPT)
            await page.js("__ef.redraw().then(() => true)")
            out["after_typing"] = await page.js("__ef.inspectState()")
            await page.js("document.activeElement?.blur(); __ef.redraw().then(() => true)")

            clicks = []
            for word, shift in (("circle", False), ("blue", False), ("square", True)):
                pos = await page.js(f"__ef.chipAt({json.dumps(word)})")
                if pos is None:
                    clicks.append({"chip": word, "error": "chip not visible"})
                    continue
                hit = await page.js(f"document.elementFromPoint({pos['x']}, {pos['y']})?.dataset?.word ?? null")
                await page.click(pos["x"], pos["y"], shift=shift)
                await page.js("__ef.redraw().then(() => true)")
                st = await page.js("__ef.inspectState()")
                clicks.append({"chip": word, "shift": shift, "hit_test": hit, "word": st["word"],
                               "selected": [c["text"] for c in st["chips"] if c["selected"]]})
            out["clicks"] = clicks

            # Effective weights: normalized, a zero sum, then sum mode.
            merge = lambda vals, mode: page.js(f"{SET_MERGE}({json.dumps(vals)}, {json.dumps(mode)})")
            out["merge_sum"] = await merge([["a.safetensors", 0.5], ["b.safetensors", 1.5], ["none", 1.0],
                                            ["none", 1.0]], "sum")
            out["merge_zero"] = await merge([["a.safetensors", 0.0], ["b.safetensors", 0.0], ["none", 1.0],
                                             ["none", 1.0]], "normalized")
            out["merge_normalized"] = await merge([["a.safetensors", 1.0], ["b.safetensors", 3.0], ["none", 5.0],
                                                   ["none", 1.0]], "normalized")
            # A user edit through the widget API (callback path) must refresh without a redraw.
            out["merge_callback"] = await page.js(
                "(() => { const ef = __ef, m = ef.node('EraseFlux_MergeLoras'), w = ef.widget(m, 'weight_2');"
                " w.setValue(1.0, {e: undefined, node: m, canvas: ef.app().canvas});"
                " return m.__eraseFluxNormalized.values; })()")
            await merge([["a.safetensors", 1.0], ["b.safetensors", 3.0], ["none", 5.0], ["none", 1.0]], "normalized")
            out["workflow_values"] = await page.js(
                "(() => { const n = __ef.node('EraseFlux_MergeLoras').serialize();"
                " return {values: n.widgets_values, named: Object.keys(n.widgets_values_named ?? {})}; })()")

            if screenshot:  # before the round trip, whose missing-LoRA check would pop up a toast
                await page.js("__ef.app().canvas.deselectAll(); __ef.redraw().then(() => true)")
                await asyncio.sleep(0.5)
                out["shot_probe"] = await page.js(SHOT_PROBE)
                shot = await page.send("Page.captureScreenshot", format="png")
                os.makedirs(os.path.dirname(os.path.abspath(screenshot)), exist_ok=True)
                with open(screenshot, "wb") as f:
                    f.write(base64.b64decode(shot["data"]))
                out["screenshot"] = screenshot

            out["pure"] = await page.js(PURE)
            out["roundtrip"] = await page.js(ROUNDTRIP)
            out["console_errors"] = await page.js("window.__efErrors ?? []")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("url", help="the ComfyUI server, e.g. http://127.0.0.1:8193")
    ap.add_argument("--chromium", default=shutil.which("chromium") or shutil.which("chromium-browser") or "chromium")
    ap.add_argument("--screenshot", help="where to write a PNG of the two nodes")
    a = ap.parse_args(argv)
    profile = tempfile.mkdtemp(prefix="erase_flux_chromium_")
    proc = None
    try:
        proc, port = launch_chromium(a.chromium, profile)
        result = asyncio.run(scenario(a.url.rstrip("/"), port, a.screenshot))
    finally:
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        shutil.rmtree(profile, ignore_errors=True)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
