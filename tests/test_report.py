"""Report generation from results.json: figures, tables and the recomputed seed statements."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from matryoshka2d.cli import main
from matryoshka2d.demo.report import load_results, seed_statements, write_report
from matryoshka2d.errors import DataFileError


def fake_results() -> dict:
    layers, dims = [1, 2, 3, 4, 5, 6], [384, 256, 128, 64, 32]

    def grid(offset: float) -> dict:
        table = [[offset + 5 * k - (384 / d) * 0.5 for d in dims] for k in layers]
        return {"model": "m", "layers": layers, "dims": dims, "spearman": table}

    speed = {"layers": layers, "sentences_per_s": [600.0, 400.0, 300.0, 240.0, 190.0, 160.0]}
    return {
        "title": "test",
        "models": {
            "untouched": {"label": "untouched", "grid": grid(50), "speed": speed, "training_time_s": None},
            "two_d": {
                "label": "2D",
                "grid": grid(55),
                "validation_grid": grid(56),
                "speed": speed,
                "training_time_s": 120.0,
            },
        },
    }


def test_report_writes_markdown_and_figures(tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps(fake_results()))
    report = write_report(results, tmp_path / "out")
    text = report.read_text()
    pngs = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert pngs == sorted(
        [
            "spearman_vs_layers.png",
            "relative_vs_layers.png",
            "speedup_vs_layers.png",
            "spearman_vs_dims.png",
            "relative_vs_dims.png",
            "heatmap_untouched.png",
            "heatmap_two_d.png",
        ]
    )
    assert all((tmp_path / "out" / p).stat().st_size > 10_000 for p in pngs)
    assert "STSB validation" in text and "![heatmap_two_d](heatmap_two_d.png)" in text
    assert "| 6 | 84.50 | 84.25 |" in text  # 2D grid, 6 layers: 55 + 30 - 0.5 at 384, - 0.75 at 256


def test_seed_statements_are_computed_from_the_numbers():
    lines = seed_statements(fake_results())
    # untouched: full = 50 + 30 - 0.5 = 79.5; 3 layers = 50 + 15 - 0.5 = 64.5 -> cost 18.9%; speedup 300/160
    assert "removing half of the layers (6 → 3) gives 1.88x speedup at a cost of 18.9%" in lines[0]
    # 32 dims = 8.3% of 384: 50 + 30 - 6 = 74 -> 74 / 79.5 = 93.1%
    assert "at 8.3% of the embedding size (32 of 384 dims) the model preserves 93.1%" in lines[1]


def test_pooled_speedup_averages_the_models_and_gives_the_range():
    results = fake_results()
    results["models"]["two_d"]["speed"] = {
        "layers": [1, 2, 3, 4, 5, 6],
        "sentences_per_s": [600.0, 400.0, 340.0, 240.0, 190.0, 160.0],
    }
    pooled = [line for line in seed_statements(results) if "speed, all" in line]
    # 300/160 = 1.875 and 340/160 = 2.125 -> mean 2.00
    assert pooled == [
        "- **speed, all 2 models** (same architecture, so they differ only by measurement noise): "
        "3 of 6 layers runs 2.00x faster on average (range 1.88x-2.12x)."
    ]
    del results["models"]["two_d"]["speed"]
    assert not [line for line in seed_statements(results) if "speed, all" in line]


def test_cli_report_and_bad_results(tmp_path, capsys):
    results = tmp_path / "results.json"
    results.write_text(json.dumps(fake_results()))
    assert main(["report", str(results), "--out", str(tmp_path / "r")]) == 0
    assert (tmp_path / "r" / "REPORT.md").is_file()
    results.write_text(
        json.dumps({"models": {"x": {"grid": {"layers": [1], "dims": [2], "spearman": [[1, 2]]}}}})
    )
    with pytest.raises(DataFileError, match="not a layers x dims table"):
        load_results(results)
    assert main(["report", str(tmp_path / "missing.json"), "--out", str(tmp_path / "r2")]) == 2
    assert "results file not found" in capsys.readouterr().err


def without_model_key(results: dict) -> dict:
    for entry in results["models"].values():
        for which in ("grid", "validation_grid"):
            entry.get(which, {}).pop("model", None)
    return results


def test_grid_without_model_key_is_fine(tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps(without_model_key(fake_results())))
    assert "| 6 | 84.50 | 84.25 |" in write_report(results, tmp_path / "out").read_text()


def bad_grid(**changes) -> dict:
    results = fake_results()
    results["models"]["two_d"]["grid"].update(changes)
    return results


@pytest.mark.parametrize(
    "results,message",
    [
        ({"models": {"x": {"label": "no grid"}}}, "model 'x' has no grid"),
        ({"models": {"x": {"grid": {"layers": [1], "dims": [2]}}}}, "grid has no spearman"),
        (bad_grid(spearman=[[1.0] * 5] * 5 + [[1.0] * 4]), "spearman is not a layers x dims table"),
        (bad_grid(spearman=[[1.0] * 5] * 5 + [[1.0, 2.0, "x", 3.0, 4.0]]), r"spearman\[5\]\[2\] is 'x'"),
        (bad_grid(spearman=[[1.0] * 5] * 5 + [[1.0, 2.0, None, 3.0, 4.0]]), "not a finite number"),
        (bad_grid(layers="1,2"), "layers is '1,2', expected a non-empty list of positive integers"),
        (bad_grid(dims=[384, 384, 128, 64, 32]), "dims lists a value twice"),
        ({"models": []}, "expected a 'models' object"),
        (
            {"models": {"x": {"grid": fake_results()["models"]["two_d"]["grid"], "speed": {"layers": [1]}}}},
            "speed must be an object with layers and sentences_per_s",
        ),
    ],
)
def test_bad_results_files_give_data_file_errors(tmp_path, capsys, results, message):
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    with pytest.raises(DataFileError, match=message):
        load_results(path)
    assert main(["report", str(path), "--out", str(tmp_path / "r")]) == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_not_utf8_results_file(tmp_path):
    path = tmp_path / "results.json"
    path.write_bytes(b'{"title": "\xff"}')
    with pytest.raises(DataFileError, match="not UTF-8"):
        load_results(path)


def test_report_files_are_replaced_atomically_and_other_files_kept(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    out = tmp_path / "out"
    out.mkdir()
    results = out / "results.json"  # the demo keeps results.json in the report folder
    results.write_text(json.dumps(fake_results()))
    (out / "REPORT.md").write_text("old report")
    (out / "spearman_vs_layers.png").write_bytes(b"old figure")

    def failing_savefig(self, target, **kwargs):
        (target.write if hasattr(target, "write") else Path(target).write_bytes)(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", failing_savefig)
    with pytest.raises(OSError, match="disk full"):
        write_report(results, out)
    assert (out / "spearman_vs_layers.png").read_bytes() == b"old figure"
    assert (out / "REPORT.md").read_text() == "old report"
    assert sorted(p.name for p in out.iterdir()) == ["REPORT.md", "results.json", "spearman_vs_layers.png"]

    monkeypatch.undo()
    write_report(results, out)
    assert (out / "spearman_vs_layers.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "REPORT.md").read_text().startswith("# test")
    assert json.loads(results.read_text()) == fake_results()
    assert not [p for p in out.iterdir() if ".tmp" in p.name]


def test_undefined_cells_are_read_and_shown_as_nan(tmp_path):
    results = fake_results()
    results["models"]["two_d"]["grid"]["spearman"][0][4] = float("nan")  # an undefined Spearman
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))  # json writes NaN
    assert "NaN" in path.read_text()
    text = write_report(path, tmp_path / "out").read_text()
    assert "| 1 | 59.50 | 59.25 | 58.50 | 57.00 | nan | nan |" in text  # the row mean is undefined too
    results["models"]["two_d"]["grid"]["spearman"][0][4] = float("inf")
    path.write_text(json.dumps(results))
    with pytest.raises(DataFileError, match=r"spearman\[0\]\[4\] is inf, not a finite number"):
        load_results(path)
