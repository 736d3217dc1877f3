#!/usr/bin/env python3
"""Build UI-format ComfyUI workflows (what the frontend saves and loads) from API-format ones.

The pack's example workflows are written once, in API format (``workflows/api/<stem>.json``, what ``POST /prompt``
takes); the UI twin (``workflows/<stem>.json``, what ComfyUI serves as a template and the frontend opens) is
generated from it with a running ComfyUI's ``/object_info``, so the two never drift::

    python scripts/workflow_ui.py --url http://127.0.0.1:8188            # every workflows/api/*.json
    python scripts/workflow_ui.py --url http://127.0.0.1:8188 --check    # exit 1 if a UI file is stale
    python scripts/workflow_ui.py --object-info object_info.json workflows/api/sandbox_erase.json

The server must have this pack loaded (its node definitions come from ``/object_info``). Standard library only.

Conversion rules (as ComfyUI's frontend lays out a node):

* inputs are taken in ``/object_info`` order, ``required`` then ``optional``;
* an input whose type is a widget type (INT, FLOAT, STRING, BOOLEAN, COMBO or an options list) and that is not
  ``forceInput`` is a widget: it gets a ``widgets_values`` entry, its value from the API file (or the default when
  the API file links it or leaves it out); an INT/FLOAT/COMBO with ``control_after_generate`` (and an INT named
  ``seed`` or ``noise_seed``, which the frontend treats the same) is followed by an extra ``"fixed"`` entry;
* every other input is a socket in the node's ``inputs`` list; a linked widget also gets an ``inputs`` entry
  (with ``"widget": {"name": ...}``, after the sockets) and keeps its ``widgets_values`` slot, as the frontend does;
* nodes are laid out left to right by depth (longest path from a source node), stacked top to bottom per column;
  ``order`` is a topological order; API ``_meta.title`` becomes the node's title.
"""
from __future__ import annotations

import argparse
import json
import sys
import urllib.parse
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
SEED_NAMES = {"seed", "noise_seed"}
COLUMN_WIDTH, NODE_WIDTH, GAP = 400, 340, 40
SOCKET_H, WIDGET_H, TITLE_H, MULTILINE_H = 22, 26, 30, 90


def fetch_object_info(url: str) -> dict:
    parsed = urllib.parse.urlparse(url)
    if parsed.hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit(f"--url {url!r}: only a local ComfyUI (127.0.0.1 / localhost) is queried")
    with urllib.request.urlopen(url.rstrip("/") + "/object_info", timeout=60) as r:
        return json.load(r)


def is_link(value) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def input_specs(info: dict) -> list[tuple[str, str, dict]]:
    """``(name, type, options)`` per input, required then optional (hidden inputs are not on the node)."""
    out = []
    for section in ("required", "optional"):
        specs = info["input"].get(section, {})
        order = info.get("input_order", {}).get(section, list(specs))
        for name in order:
            spec = specs[name]
            kind = spec[0]
            opts = dict(spec[1]) if len(spec) > 1 and isinstance(spec[1], dict) else {}
            if isinstance(kind, list):
                opts.setdefault("options", kind)
                kind = "COMBO"
            out.append((name, kind, opts))
    return out


def is_widget(kind: str, opts: dict) -> bool:
    return kind in WIDGET_TYPES and not opts.get("forceInput")


def has_control(name: str, kind: str, opts: dict) -> bool:
    flag = opts.get("control_after_generate")
    if flag is None and kind == "INT":
        return name in SEED_NAMES
    return bool(flag) and kind in ("INT", "FLOAT", "COMBO")


def default_value(kind: str, opts: dict):
    if "default" in opts:
        return opts["default"]
    if kind == "COMBO":
        options = opts.get("options") or []
        return options[0] if options else ""
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(kind)


def depths(api: dict) -> dict[str, int]:
    memo: dict[str, int] = {}

    def depth(nid: str, stack: tuple = ()) -> int:
        if nid in stack:
            raise ValueError(f"the graph has a cycle through node {nid}")
        if nid not in memo:
            parents = [v[0] for v in api[nid]["inputs"].values() if is_link(v)]
            for p in parents:
                if p not in api:
                    raise ValueError(f"node {nid} links to missing node {p}")
            memo[nid] = 1 + max((depth(p, stack + (nid,)) for p in parents), default=-1)
        return memo[nid]

    for nid in api:
        depth(nid)
    return memo


def node_height(n_sockets: int, n_outputs: int, widgets: list[tuple[str, str, dict]]) -> int:
    h = TITLE_H + SOCKET_H * max(n_sockets, n_outputs, 1)
    for _, kind, opts in widgets:
        h += MULTILINE_H if kind == "STRING" and opts.get("multiline") else WIDGET_H
    return h


def convert(api: dict, object_info: dict) -> dict:
    """The UI-format workflow of an API-format graph (node ids must be integers written as strings)."""
    for nid, node in api.items():
        if not nid.isdigit():
            raise ValueError(f"node id {nid!r}: use integer ids (as strings) so UI and API ids agree")
        if node["class_type"] not in object_info:
            raise ValueError(f"node {nid}: type {node['class_type']!r} is not in /object_info (pack not loaded?)")
    depth = depths(api)
    ids = sorted(api, key=int)
    topo = sorted(ids, key=lambda n: (depth[n], int(n)))
    order = {nid: i for i, nid in enumerate(topo)}

    nodes, links = {}, []
    pending = []  # (from_id, from_slot, to_id, to_slot, type)
    for nid in ids:
        node, info = api[nid], object_info[api[nid]["class_type"]]
        specs = input_specs(info)
        known = {name for name, _, _ in specs}
        extra = set(node["inputs"]) - known
        if extra:
            raise ValueError(f"node {nid} ({node['class_type']}): inputs {sorted(extra)} are not in /object_info")
        sockets, linked_widgets, widgets, values = [], [], [], []
        for name, kind, opts in specs:
            value = node["inputs"].get(name)
            linked = is_link(value)
            if is_widget(kind, opts):
                widgets.append((name, kind, opts))
                values.append(default_value(kind, opts) if linked or name not in node["inputs"] else value)
                if has_control(name, kind, opts):
                    values.append("fixed")
                if linked:
                    linked_widgets.append((name, kind, value))
            else:
                sockets.append((name, kind, value if linked else None))
                if name in node["inputs"] and not linked:
                    raise ValueError(f"node {nid}: socket input {name!r} ({kind}) needs a link, got {value!r}")
        inputs = []
        for name, kind, value in sockets:
            inputs.append({"name": name, "localized_name": name, "type": kind, "link": None})
            if value is not None:
                pending.append((value[0], value[1], nid, len(inputs) - 1, None))
        for name, kind, value in linked_widgets:
            inputs.append({"name": name, "localized_name": name, "type": kind, "widget": {"name": name},
                           "link": None})
            pending.append((value[0], value[1], nid, len(inputs) - 1, None))
        out_types, out_names = info["output"], info.get("output_name") or info["output"]
        outputs = [{"name": out_names[i], "localized_name": out_names[i],
                    "type": "COMBO" if isinstance(t, list) else t, "links": [], "slot_index": i}
                   for i, t in enumerate(out_types)]
        ui = {"id": int(nid), "type": node["class_type"], "pos": [0, 0],
              "size": [NODE_WIDTH, node_height(len(inputs), len(outputs), widgets)], "flags": {},
              "order": order[nid], "mode": 0, "inputs": inputs, "outputs": outputs,
              "properties": {"Node name for S&R": node["class_type"]}, "widgets_values": values}
        title = node.get("_meta", {}).get("title")
        if title and title not in (info.get("display_name"), node["class_type"]):
            ui["title"] = title
        nodes[nid] = ui

    for link_id, (src, slot, dst, dst_slot, _) in enumerate(
            sorted(pending, key=lambda p: (int(p[2]), p[3])), start=1):
        outs = nodes[src]["outputs"]
        if slot >= len(outs):
            raise ValueError(f"node {dst} links to output {slot} of node {src}, which has {len(outs)} outputs")
        kind = outs[slot]["type"]
        nodes[dst]["inputs"][dst_slot]["link"] = link_id
        outs[slot]["links"].append(link_id)
        links.append([link_id, int(src), slot, int(dst), dst_slot, kind])

    columns: dict[int, list[str]] = {}
    for nid in topo:
        columns.setdefault(depth[nid], []).append(nid)
    for col, members in columns.items():
        y = 0
        for nid in members:
            nodes[nid]["pos"] = [col * COLUMN_WIDTH, y]
            y += nodes[nid]["size"][1] + GAP + TITLE_H

    return {"last_node_id": max(int(n) for n in ids), "last_link_id": len(links),
            "nodes": [nodes[n] for n in ids], "links": links, "groups": [], "config": {},
            "extra": {"ds": {"scale": 1.0, "offset": [0, 0]}}, "version": 0.4}


def dump(workflow: dict) -> str:
    return json.dumps(workflow, indent=2, ensure_ascii=False) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--url", help="a running local ComfyUI with this pack loaded, e.g. http://127.0.0.1:8188")
    src.add_argument("--object-info", type=Path, help="a saved /object_info JSON instead of --url")
    ap.add_argument("api", nargs="*", type=Path, help="API-format workflows (default: workflows/api/*.json)")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "workflows", help="where the UI files go (same stem)")
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if a UI file differs")
    args = ap.parse_args(argv)

    info = fetch_object_info(args.url) if args.url else json.loads(args.object_info.read_text())
    files = args.api or sorted((ROOT / "workflows" / "api").glob("*.json"))
    stale = []
    for path in files:
        text = dump(convert(json.loads(path.read_text()), info))
        target = args.out_dir / path.name
        if args.check:
            if not target.exists() or target.read_text() != text:
                stale.append(target)
        else:
            target.write_text(text)
            print(f"{path} -> {target}")
    if stale:
        print("stale UI workflows (regenerate with scripts/workflow_ui.py):", *map(str, stale), sep="\n  ")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
