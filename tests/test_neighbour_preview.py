"""The neighbour preview on the sandbox: the concept row reproduces the plain prompt, rows are labelled."""
import json

from erase_core.neighbour_preview import preview, preview_grid
from erase_core.neighbours import NeighbourConfig


def test_preview_rows_and_grid(world):
    rows = preview(world, "red", NeighbourConfig(m=2, n=1, seed=3), erased=world.transformer, samples=4)
    assert [r.kind for r in rows] == ["concept", "neighbour", "neighbour", "beyond"]
    assert rows[0].distance == 0.0 and rows[0].labels[0][0] in ("red", "crimson", "scarlet")
    assert rows[0].base_rate == rows[0].erased_rate  # the "erased" model here is the base itself
    assert all(0 < r.distance <= 0.8 + 1e-5 for r in rows[1:3]) and 0.8 <= rows[3].distance <= 1.6 + 1e-5
    img = preview_grid(rows, "red")
    assert img.width > 8 * 64 and img.height > 4 * 64


def test_neighbors_command(tmp_path, capsys):
    from erase_core.cli import main

    assert main(["neighbors", "--concept", "crimson", "--m", "1", "--n", "1", "--samples", "2",
                 "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "neighbors.json").read_text())
    assert data["concept"] == "red" and len(data["rows"]) == 3 and (tmp_path / "neighbors.png").exists()
    assert main(["neighbors", "--concept", "red", "--d1", "2", "--d2", "1", "--out", str(tmp_path)]) == 2
    assert "d1 < d2" in capsys.readouterr().err
