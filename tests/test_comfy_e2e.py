"""End to end in a real ComfyUI server: the pack's example workflows (``workflows/api``) run through ``POST /prompt``.

Skipped unless ``ERASE_FLUX_COMFYUI`` names a ComfyUI checkout and ``ERASE_FLUX_COMFY_PYTHON`` its venv's python
(e.g. the kit in ``shared/comfyui``)::

    ERASE_FLUX_COMFYUI=/work/comfy/ComfyUI ERASE_FLUX_COMFY_PYTHON=/work/comfy/venv/bin/python \\
        python -m pytest -q -s tests/test_comfy_e2e.py

The test itself needs only the standard library and pytest; the server (and a PIL/numpy look at the saved PNGs) runs
in ComfyUI's venv. It links the pack into ``custom_nodes/comfyui-erase-flux`` (removed again if the test created it),
starts ComfyUI on a free loopback port (``--cpu``, API nodes off, in-memory database, ``OMP_NUM_THREADS=1``, outputs in the pytest tmp dir),
runs every ``workflows/api/sandbox_*.json``, checks the images and LoRA files, loads the erase-LoRA with the stock
``LoraLoaderModelOnly``, checks that the real-Flux workflows fail validation only for their missing model files, and
stops the server by its PID. Per-workflow timings go to ``<tmp>/e2e_timings.json`` and are printed at the end.

LoRAs are written where the nodes write them, ``models/loras/erase_flux/`` of the checkout, under names unique to
this run (``e2e<pid>_...``), and deleted afterwards.
"""
from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COMFY = os.environ.get("ERASE_FLUX_COMFYUI", "")
PYTHON = os.environ.get("ERASE_FLUX_COMFY_PYTHON", "")
LINK_NAME = "comfyui-erase-flux"
NODE_IDS = ("EraseFlux_SandboxLoader", "EraseFlux_AttentionInspect", "EraseFlux_AttentionSuppress",
            "EraseFlux_EraseConcept", "EraseFlux_MergeLoras", "EraseFlux_NeighbourPreview")
SANDBOX_WORKFLOWS = sorted((ROOT / "workflows" / "api").glob("sandbox_*.json"))
FLUX_WORKFLOWS = sorted((ROOT / "workflows" / "api").glob("flux_*.json"))
MODEL_FILE_INPUTS = {"unet_name", "clip_name1", "clip_name2", "vae_name"}
E2E_ERASE_STEPS = 8  # the workflows' EraseConcept steps (200; 20 in the merge) lowered for speed
START_TIMEOUT, PROMPT_TIMEOUT = 300, 600
RUN = f"e2e{os.getpid()}"

if not COMFY or not PYTHON:
    pytest.skip("set ERASE_FLUX_COMFYUI to a ComfyUI checkout and ERASE_FLUX_COMFY_PYTHON to its venv's python "
                "to run the ComfyUI end-to-end test", allow_module_level=True)
if not (Path(COMFY) / "main.py").is_file():
    pytest.skip(f"ERASE_FLUX_COMFYUI={COMFY} has no main.py (not a ComfyUI checkout)", allow_module_level=True)
if not os.access(PYTHON, os.X_OK):
    pytest.skip(f"ERASE_FLUX_COMFY_PYTHON={PYTHON} is not an executable python", allow_module_level=True)


# --- helpers ---------------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


STATS_SCRIPT = """
import json, sys
import numpy as np
from PIL import Image
out = {}
for path in sys.argv[1:]:
    a = np.asarray(Image.open(path).convert("RGB"))
    out[path] = {"width": a.shape[1], "height": a.shape[0], "std": round(float(a.std()), 2),
                 "distinct": int(len(np.unique(a.reshape(-1, 3), axis=0)))}
print(json.dumps(out))
"""


def image_stats(paths: list[Path]) -> dict[Path, dict]:
    """Size, pixel std and number of distinct colours of PNGs, read with PIL/numpy in ComfyUI's venv."""
    proc = subprocess.run([PYTHON, "-c", STATS_SCRIPT, *map(str, paths)], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr
    return {Path(k): v for k, v in json.loads(proc.stdout).items()}


class Server:
    def __init__(self, proc: subprocess.Popen, url: str, log: Path, output: Path):
        self.proc, self.url, self.log, self.output = proc, url, log, output

    def get(self, route: str):
        with urllib.request.urlopen(self.url + route, timeout=60) as r:
            return json.load(r)

    def post_prompt(self, graph: dict) -> tuple[int, dict]:
        body = json.dumps({"prompt": graph, "client_id": str(uuid.uuid4())}).encode()
        req = urllib.request.Request(self.url + "/prompt", data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=60) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as exc:
            return exc.code, json.load(exc)

    def run(self, graph: dict, timeout: float = PROMPT_TIMEOUT) -> tuple[dict, float]:
        """Queue a graph and wait for its /history entry; returns (entry, wall seconds)."""
        t0 = time.monotonic()
        code, reply = self.post_prompt(graph)
        assert code == 200 and not reply.get("node_errors"), f"/prompt refused the graph: {json.dumps(reply)[:3000]}"
        pid = reply["prompt_id"]
        while time.monotonic() - t0 < timeout:
            assert self.proc.poll() is None, f"ComfyUI exited (rc {self.proc.returncode}):\n{self.log_tail()}"
            entry = self.get(f"/history/{pid}").get(pid)
            if entry and entry.get("status", {}).get("completed") is not None and (
                    entry["status"]["status_str"] in ("success", "error")):
                return entry, time.monotonic() - t0
            time.sleep(0.25)
        raise AssertionError(f"prompt {pid} did not finish in {timeout} s:\n{self.log_tail()}")

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])


def error_of(entry: dict) -> str:
    for kind, msg in entry.get("status", {}).get("messages", []):
        if kind in ("execution_error", "execution_interrupted"):
            return (f"{kind} in node {msg.get('node_id')} ({msg.get('node_type')}): {msg.get('exception_message')}\n"
                    + "".join(msg.get("traceback", [])))
    return json.dumps(entry.get("status"))[:2000]


def output_images(entry: dict, server: Server) -> dict[str, list[Path]]:
    """Saved images (type "output") per node id."""
    found = {}
    for nid, out in entry.get("outputs", {}).items():
        paths = [server.output / im.get("subfolder", "") / im["filename"] for im in out.get("images", [])
                 if im.get("type") == "output"]
        if paths:
            found[nid] = paths
    return found


def loras_dir() -> Path:
    return Path(COMFY) / "models" / "loras" / "erase_flux"


# --- fixtures --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Per-workflow outcomes shared by the tests; timings written to <tmp>/e2e_timings.json and printed at the end."""
    store = {"timings": {}, "entries": {}, "loras": []}
    yield store
    path = tmp_path_factory.getbasetemp() / "e2e_timings.json"
    path.write_text(json.dumps(store["timings"], indent=2) + "\n")
    total = sum(store["timings"].values())
    print(f"\n\nComfyUI e2e timings (s), written to {path}:")
    for name, secs in store["timings"].items():
        print(f"  {name:<28} {secs:8.2f}")
    print(f"  {'total':<28} {total:8.2f}")
    for name in store["loras"]:
        (loras_dir() / name).unlink(missing_ok=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory, results):
    comfy = Path(COMFY)
    link = comfy / "custom_nodes" / LINK_NAME
    created = False
    if link.is_symlink() and link.resolve() != ROOT.resolve():
        link.unlink()
    if not link.exists():
        link.symlink_to(ROOT, target_is_directory=True)
        created = True
    assert link.resolve() == ROOT.resolve(), f"{link} exists and is not a link to {ROOT}; move it away"

    tmp = tmp_path_factory.mktemp("comfyui")
    output = tmp / "output"
    for d in ("output", "temp", "user", "input"):
        (tmp / d).mkdir()
    port = free_port()
    log = tmp / "comfyui.log"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    cmd = [PYTHON, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port), "--disable-api-nodes",
           "--database-url", "sqlite:///:memory:", "--output-directory", str(output),
           "--temp-directory", str(tmp / "temp"), "--user-directory", str(tmp / "user"),
           "--input-directory", str(tmp / "input")]
    t0 = time.monotonic()
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, cwd=comfy, env=env, stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)
    srv = Server(proc, f"http://127.0.0.1:{port}", log, output)
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"ComfyUI exited during start-up (rc {proc.returncode}):\n{srv.log_tail()}")
            try:
                srv.get("/system_stats")
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() - t0 > START_TIMEOUT:
                    pytest.fail(f"ComfyUI did not answer /system_stats in {START_TIMEOUT} s:\n{srv.log_tail()}")
                time.sleep(0.5)
        results["timings"]["server start"] = round(time.monotonic() - t0, 2)
        yield srv
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        if created and link.is_symlink():
            link.unlink()


# --- tests -----------------------------------------------------------------------------------------------------------
def test_pack_imports_and_registers_its_nodes(server):
    log = server.log_text()
    assert "IMPORT FAILED" not in log, f"a custom node failed to import:\n{server.log_tail()}"
    info = server.get("/object_info")
    missing = [n for n in NODE_IDS if n not in info]
    assert not missing, f"node ids missing from /object_info: {missing}"
    assert any(LINK_NAME in line and "seconds" in line for line in log.splitlines()), "pack not in the import list"


def test_ui_workflows_match_their_api_twins(server):
    """workflows/<stem>.json is exactly what scripts/workflow_ui.py makes of workflows/api/<stem>.json."""
    spec = importlib.util.spec_from_file_location("workflow_ui", ROOT / "scripts" / "workflow_ui.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    info = server.get("/object_info")
    apis = sorted((ROOT / "workflows" / "api").glob("*.json"))
    assert {p.stem for p in apis} == {p.stem for p in (ROOT / "workflows").glob("*.json")}
    for path in apis:
        expected = mod.dump(mod.convert(json.loads(path.read_text()), info))
        assert (ROOT / "workflows" / path.name).read_text() == expected, (
            f"workflows/{path.name} is stale: run python scripts/workflow_ui.py --url {server.url}")


def _e2e_graph(path: Path, results: dict) -> dict:
    """The workflow as shipped, with EraseConcept made quick (E2E_ERASE_STEPS steps, previews every 4 steps where a
    VAE is linked) and its LoRA names made unique to this run (so parallel runs and user files are never touched)."""
    graph = json.loads(path.read_text())
    for node in graph.values():
        inputs = node["inputs"]
        if node["class_type"] == "EraseFlux_EraseConcept":
            inputs["steps"] = E2E_ERASE_STEPS
            if inputs.get("preview_every"):
                inputs["preview_every"] = 4
            if path.stem == "sandbox_merge" and "blue" in inputs["lora_name"]:
                inputs["low_memory"] = True  # the optional switch, exercised once (rsc_chunk=1)
            inputs["lora_name"] = f"{RUN}_{inputs['lora_name']}"
            results["loras"].append(f"{inputs['lora_name']}.safetensors")
        elif node["class_type"] == "EraseFlux_MergeLoras":
            inputs["name"] = f"{RUN}_{inputs['name']}"
            results["loras"].append(f"{inputs['name']}.safetensors")
        elif node["class_type"] == "SaveImage":
            inputs["filename_prefix"] = f"{RUN}/{path.stem}/{inputs['filename_prefix'].rsplit('/', 1)[-1]}"
    return graph


@pytest.mark.parametrize("path", SANDBOX_WORKFLOWS, ids=[p.stem for p in SANDBOX_WORKFLOWS])
def test_sandbox_workflow(server, results, path):
    graph = _e2e_graph(path, results)
    entry, secs = server.run(graph)
    results["timings"][path.stem] = round(secs, 2)
    assert entry["status"]["status_str"] == "success", error_of(entry)
    results["entries"][path.stem] = (graph, entry)

    saved = output_images(entry, server)
    wanted = {nid for nid, n in graph.items() if n["class_type"] == "SaveImage"}
    assert set(saved) == wanted, f"SaveImage nodes {sorted(wanted)} saved images in {sorted(saved)}"
    stats = image_stats([p for paths in saved.values() for p in paths])
    for nid, paths in saved.items():
        for p in paths:
            assert p.is_file(), f"node {nid}: {p} was reported but not written"
            st = stats[p]
            assert st["std"] > 2.0 and st["distinct"] > 4, f"{p.name} looks constant: {st}"
            if graph[graph[nid]["inputs"]["images"][0]]["class_type"] == "VAEDecode":
                assert (st["width"], st["height"]) == (32, 32), f"{p.name}: sandbox sample is not 32×32: {st}"

    for nid, node in graph.items():
        if node["class_type"] == "EraseFlux_EraseConcept":
            lora = loras_dir() / f"{node['inputs']['lora_name']}.safetensors"
            assert lora.is_file() and lora.stat().st_size > 1000, f"EraseConcept did not save {lora}"
            assert not (server.output / "erase_flux" / "checkpoints" / f"{node['inputs']['lora_name']}.pt").exists()
            from erase_core.lora_file import read_lora_file

            config = read_lora_file(lora).meta["config"]
            assert config["rsc_chunk"] == (1 if node["inputs"].get("low_memory") else 0), config
        if node["class_type"] == "EraseFlux_MergeLoras":
            merged = loras_dir() / f"{node['inputs']['name']}.safetensors"
            assert merged.is_file(), f"MergeLoras did not save {merged}"
            text = entry["outputs"].get(next((i for i, n in graph.items() if n["class_type"] == "PreviewAny"), ""))
            if text:
                assert text["text"] == [f"erase_flux/{merged.name}"]


def test_saved_loras_load_with_the_stock_lora_loader(server, results):
    """The erase-LoRA and the merged LoRA through LoraLoaderModelOnly → KSampler: every key maps onto the model."""
    names = [n for n in results["loras"] if (loras_dir() / n).is_file()]
    erase = next((n for n in names if "erase_red" in n and "merge" not in n), None)
    merged = next((n for n in names if "merged" in n), None)
    if erase is None or merged is None:
        pytest.fail(f"the erase / merge workflows left no LoRA to load (found {names})")
    lines_before = server.log_text().count("lora key not loaded")
    graph = {
        "1": {"class_type": "EraseFlux_SandboxLoader", "inputs": {}},
        "2": {"class_type": "LoraLoaderModelOnly",
              "inputs": {"model": ["1", 0], "lora_name": f"erase_flux/{erase}", "strength_model": 1.0}},
        "3": {"class_type": "LoraLoaderModelOnly",
              "inputs": {"model": ["2", 0], "lora_name": f"erase_flux/{merged}", "strength_model": 1.0}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["1", 1]}},
        "5": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "6": {"class_type": "EmptySD3LatentImage", "inputs": {"width": 32, "height": 32, "batch_size": 1}},
        "7": {"class_type": "KSampler", "inputs": {"model": ["3", 0], "seed": 0, "steps": 12, "cfg": 3.0,
                                                   "sampler_name": "euler", "scheduler": "simple",
                                                   "positive": ["4", 0], "negative": ["5", 0],
                                                   "latent_image": ["6", 0], "denoise": 1.0}},
        "8": {"class_type": "VAEDecode", "inputs": {"samples": ["7", 0], "vae": ["1", 2]}},
        "9": {"class_type": "SaveImage", "inputs": {"images": ["8", 0], "filename_prefix": f"{RUN}/lora/stock"}},
    }
    entry, secs = server.run(graph)
    results["timings"]["stock LoraLoaderModelOnly"] = round(secs, 2)
    assert entry["status"]["status_str"] == "success", error_of(entry)
    (path,) = output_images(entry, server)["9"]
    st = image_stats([path])[path]
    assert (st["width"], st["height"]) == (32, 32) and st["std"] > 2.0, st
    not_loaded = server.log_text().count("lora key not loaded") - lines_before
    assert not_loaded == 0, f"{not_loaded} 'lora key not loaded' lines:\n{server.log_tail()}"


@pytest.mark.parametrize("path", FLUX_WORKFLOWS, ids=[p.stem for p in FLUX_WORKFLOWS])
def test_flux_workflow_validates_but_for_missing_model_files(server, path):
    """The real-Flux examples need flux1-dev / t5xxl / clip_l / ae files this machine lacks: /prompt must refuse
    them for those file names only (every other widget value, link type and custom validation passes)."""
    code, reply = server.post_prompt(json.loads(path.read_text()))
    if code == 200:  # this ComfyUI has the real weights: the graph is valid; take it off the queue, do not run it
        for route, body in (("/queue", {"delete": [reply["prompt_id"]]}), ("/interrupt", {})):
            req = urllib.request.Request(server.url + route, data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
            urllib.request.urlopen(req, timeout=60).close()
        return
    assert code == 400 and reply["error"]["type"] == "prompt_outputs_failed_validation", reply
    problems = [(nid, e["type"], e.get("extra_info", {}).get("input_name"))
                for nid, ne in reply["node_errors"].items() for e in ne["errors"]
                if not (e["type"] == "value_not_in_list"
                        and e.get("extra_info", {}).get("input_name") in MODEL_FILE_INPUTS)]
    assert not problems, f"{path.name}: validation errors besides missing model files: {problems}\n{reply}"
    assert reply["node_errors"], reply


def test_cancel_keeps_a_checkpoint_and_resume_finishes(server, results):
    """Pressing Cancel (POST /interrupt) during Erase Concept leaves a resumable checkpoint and no LoRA; queueing the
    same node with resume on continues from it and saves the LoRA (the checkpoint is then removed)."""
    graph = json.loads((ROOT / "workflows" / "api" / "sandbox_erase.json").read_text())
    nid = next(i for i, n in graph.items() if n["class_type"] == "EraseFlux_EraseConcept")
    name = f"{RUN}_cancel"
    erase = {**graph[nid], "inputs": {**graph[nid]["inputs"], "steps": 400, "lora_name": name, "preview_every": 0}}
    erase["inputs"].pop("vae", None)
    mini = {nid: erase, **{i: n for i, n in graph.items() if n["class_type"] == "EraseFlux_SandboxLoader"}}
    mini["900"] = {"class_type": "PreviewAny", "inputs": {"source": [nid, 1]}}
    ckpt = server.output / "erase_flux" / "checkpoints" / f"{name}.pt"
    results["loras"].append(f"{name}.safetensors")
    code, reply = server.post_prompt(mini)
    assert code == 200, reply
    pid = reply["prompt_id"]
    t0 = time.monotonic()
    while "erase step 10 " not in server.log_text():  # the trainer logs every 10th step
        assert time.monotonic() - t0 < PROMPT_TIMEOUT, server.log_tail()
        time.sleep(0.5)
    urllib.request.urlopen(urllib.request.Request(server.url + "/interrupt", data=b"", method="POST"), timeout=30)
    while not (entry := server.get(f"/history/{pid}").get(pid)):
        assert time.monotonic() - t0 < PROMPT_TIMEOUT, server.log_tail()
        time.sleep(0.25)
    assert entry["status"]["status_str"] == "error" and any(
        kind == "execution_interrupted" for kind, _ in entry["status"]["messages"]), error_of(entry)
    assert ckpt.is_file(), f"no resumable checkpoint at {ckpt}"
    assert not (loras_dir() / f"{name}.safetensors").exists()
    import torch  # noqa: PLC0415 — only for reading our own checkpoint (weights_only)

    stopped_at = torch.load(ckpt, weights_only=True)["step"]
    assert 10 <= stopped_at < 400
    erase["inputs"].update(resume=True, steps=stopped_at + 5)  # 5 more steps than the interrupted run reached
    entry, secs = server.run(mini)
    assert entry["status"]["status_str"] == "success", error_of(entry)
    assert (loras_dir() / f"{name}.safetensors").is_file() and not ckpt.exists()
    results["timings"]["cancel_then_resume"] = round(secs, 2)


def _merge_graph(results: dict, name: str, **inputs) -> dict:
    """Merge Erase LoRAs on two erase LoRAs the merge workflow left, with the linked sandbox MODEL and CLIP."""
    names = [n for n in results["loras"] if (loras_dir() / n).is_file() and "merge_erase" in n]
    if len(names) < 2:
        pytest.fail(f"the merge workflow left no two erase LoRAs to merge (found {results['loras']})")
    results["loras"].append(f"{name}.safetensors")
    return {
        "1": {"class_type": "EraseFlux_SandboxLoader", "inputs": {}},
        "2": {"class_type": "EraseFlux_MergeLoras", "inputs": {
            "lora_1": f"erase_flux/{names[0]}", "weight_1": 1.0, "lora_2": f"erase_flux/{names[1]}", "weight_2": 1.0,
            "lora_3": "none", "weight_3": 1.0, "lora_4": "none", "weight_4": 1.0, "rank": 0, "name": name,
            "preserve_weight": 1000.0, "width": 32, "height": 32, "model": ["1", 0], "clip": ["1", 1], **inputs}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 0]}},
    }


def test_closed_form_merge_in_comfyui(server, results):
    """Merge Erase LoRAs in closed_form mode reads each LoRA's concept from its metadata, collects the inputs on the
    linked sandbox MODEL, and saves the merged LoRA."""
    name = f"{RUN}_closed_form"
    entry, secs = server.run(_merge_graph(results, name, mode="closed_form", preserve="green, north"))
    results["timings"]["closed_form_merge"] = round(secs, 2)
    assert entry["status"]["status_str"] == "success", error_of(entry)
    assert (loras_dir() / f"{name}.safetensors").is_file()


def test_distill_merge_in_comfyui(server, results):
    """Merge Erase LoRAs in distill mode trains the closed-form merge through the linked sandbox MODEL (ComfyUI's
    own Flux, the deltas hooked onto the fused txt_attn.qkv rows) and saves it with the distillation's metadata."""
    from erase_core.lora_file import read_lora_file

    name = f"{RUN}_distill"
    entry, secs = server.run(_merge_graph(results, name, mode="distill", preserve="green", distill_steps=3,
                                          distill_batch=2, distill_images=4, cfg=3.0))
    results["timings"]["distill_merge"] = round(secs, 2)
    assert entry["status"]["status_str"] == "success", error_of(entry)
    merged = read_lora_file(loras_dir() / f"{name}.safetensors")
    assert merged.meta["merge"]["mode"] == "distill" and merged.meta["merge"]["distill"]["steps"] == 3
