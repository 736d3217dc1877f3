"""The example workflows without ComfyUI: every UI file has an API twin describing the same graph, consistently linked.

(The e2e test, with a server, checks the stronger property: each UI file is exactly ``scripts/workflow_ui.py``'s
conversion of its API twin; and it runs the sandbox ones.)
"""
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
WF = ROOT / "workflows"
STEMS = sorted(p.stem for p in (WF / "api").glob("*.json"))
SANDBOX_SAMPLER = json.loads((ROOT / "erase_core" / "sandbox" / "weights_22k" / "sampler.json").read_text())
EXPECTED = {"sandbox_inspect", "sandbox_suppress", "sandbox_erase", "sandbox_merge", "sandbox_neighbours",
            "flux_inspect", "flux_erase"}


def test_every_workflow_has_both_formats():
    assert set(STEMS) == EXPECTED
    assert {p.stem for p in WF.glob("*.json")} == EXPECTED


def _is_link(v):
    return isinstance(v, list) and len(v) == 2 and isinstance(v[0], str) and isinstance(v[1], int)


@pytest.mark.parametrize("stem", STEMS)
def test_ui_and_api_describe_the_same_graph(stem):
    api = json.loads((WF / "api" / f"{stem}.json").read_text())
    ui = json.loads((WF / f"{stem}.json").read_text())
    assert ui["version"] == 0.4 and {"last_node_id", "last_link_id", "nodes", "links", "groups", "config",
                                      "extra"} <= set(ui)
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert {str(i) for i in nodes} == set(api) and ui["last_node_id"] == max(nodes)
    assert ui["last_link_id"] == len(ui["links"]) == len({link[0] for link in ui["links"]})
    for nid, node in api.items():
        assert nodes[int(nid)]["type"] == node["class_type"]
        assert nodes[int(nid)]["properties"]["Node name for S&R"] == node["class_type"]
        if stem.startswith("sandbox_") and not any(_is_link(v) for v in node["inputs"].values()):
            assert node["class_type"] in ("EraseFlux_SandboxLoader", "EmptySD3LatentImage"), nid

    api_links = sorted((v[0], v[1], nid, name) for nid, n in api.items() for name, v in n["inputs"].items()
                       if _is_link(v))
    ui_links = []
    for link_id, src, src_slot, dst, dst_slot, kind in ui["links"]:
        target = nodes[dst]["inputs"][dst_slot]
        assert target["link"] == link_id
        out = nodes[src]["outputs"][src_slot]
        assert link_id in out["links"] and out["type"] == kind and out["slot_index"] == src_slot
        ui_links.append((str(src), src_slot, str(dst), target["name"]))
    assert sorted(ui_links) == api_links
    for node in ui["nodes"]:  # no dangling link ids
        assert all(i["link"] is None or any(link[0] == i["link"] for link in ui["links"]) for i in node["inputs"])

    # every literal widget value of the API file appears among the UI node's widgets_values
    for nid, node in api.items():
        values = nodes[int(nid)]["widgets_values"]
        missing = [k for k, v in node["inputs"].items() if not _is_link(v) and v not in values]
        assert not missing and len(values) >= sum(not _is_link(v) for v in node["inputs"].values()), (stem, nid)


def test_sandbox_workflows_start_from_the_sandbox_loader_at_32px():
    for stem in STEMS:
        if not stem.startswith("sandbox_"):
            continue
        api = json.loads((WF / "api" / f"{stem}.json").read_text())
        types = [n["class_type"] for n in api.values()]
        assert types.count("EraseFlux_SandboxLoader") == 1, stem
        for n in api.values():
            for key in ("width", "height"):
                if key in n["inputs"]:
                    assert n["inputs"][key] == 32, (stem, n["class_type"])
            i = n["inputs"]
            if n["class_type"] == "KSampler":  # the default world's sampler.json (its loader sets the shift)
                assert (i["sampler_name"], i["scheduler"], i["steps"], i["cfg"]) == \
                    ("euler", "simple", SANDBOX_SAMPLER["steps"], SANDBOX_SAMPLER["cfg"])
            if "sample_steps" in i:
                assert (i["sample_steps"], i["cfg"]) == (SANDBOX_SAMPLER["steps"], SANDBOX_SAMPLER["cfg"]), stem
