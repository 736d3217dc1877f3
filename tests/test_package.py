"""The pack's ComfyUI entry imports outside ComfyUI and keeps its layers apart."""
import ast
import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_root_package_imports_outside_comfyui():
    spec = importlib.util.spec_from_file_location("erase_flux_pack", ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["erase_flux_pack"] = mod
    try:
        spec.loader.exec_module(mod)
        assert callable(mod.comfy_entrypoint) and mod.WEB_DIRECTORY == "./web"
        assert "comfy" not in sys.modules and "comfy_api" not in sys.modules
    finally:
        sys.modules.pop("erase_flux_pack", None)


def test_engine_never_imports_comfy_at_module_level():
    for path in (ROOT / "erase_core").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in tree.body:  # module level only
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not any(n.split(".")[0] in {"comfy", "comfy_api", "folder_paths", "server"} for n in names), path


def test_no_python_file_over_600_lines():
    for path in ROOT.rglob("*.py"):
        if ".git" not in path.parts:
            assert len(path.read_text().splitlines()) <= 600, path


def test_shipped_weights_stay_within_20_mb():
    """The sandbox weights live in the repository (issue 2: ≤ 20 MB in all, both weight sets counted)."""
    folders = sorted((ROOT / "erase_core" / "sandbox").glob("weights*"))
    assert {f.name for f in folders} >= {"weights", "weights_22k"}
    total = sum(p.stat().st_size for f in folders for p in f.rglob("*") if p.is_file())
    assert total <= 20e6, f"sandbox weights take {total / 1e6:.1f} MB"
