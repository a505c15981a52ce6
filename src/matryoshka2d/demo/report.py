"""REPORT.md and figures from a ``results.json`` written by the demo (``m2d report`` re-runs this).

``results.json`` layout::

    {
      "title": "...", "created": "...", "machine": "...", "setup": {...},   # free-form description
      "models": {
        "<key>": {
          "label": "plain MNRL",                      # legend text
          "grid": {"model", "layers", "dims", "spearman"},            # eval-sts JSON, test split
                                                      # (NaN: Spearman undefined in that cell)
          "validation_grid": {...},                   # optional, same format, validation split
          "speed": {"layers": [1, ...], "sentences_per_s": [...]},    # optional
          "training_time_s": 123.4                    # optional (null for untouched models)
        }, ...
      }
    }

Figures (PNG): Spearman vs layers, performance relative to full vs layers, speedup vs layers,
Spearman vs dims, relative performance vs dims, and a layers x dims heatmap per model.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import numpy as np

from matryoshka2d.errors import DataFileError
from matryoshka2d.evaluation.grid import GridResult
from matryoshka2d.persistence import atomic_write


def load_results(path: str | os.PathLike) -> dict:
    """Read and check a results.json file (layout in the module docstring).

    Raises:
        DataFileError: naming the file and the bad entry, for a missing file, invalid JSON, no models, a
            grid without ``layers``/``dims``/``spearman`` or whose ``spearman`` is not a layers x dims
            table of numbers (finite, or NaN for an undefined cell), or a malformed ``speed`` entry. A
            grid's ``model`` key is optional.
    """
    path = Path(path)
    if not path.is_file():
        raise DataFileError(f"results file not found: {path}")
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise DataFileError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise DataFileError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    models = results.get("models") if isinstance(results, dict) else None
    if not isinstance(models, dict) or not models:
        raise DataFileError(f"{path}: expected a 'models' object with at least one model")
    for key, entry in models.items():
        where = f"{path}: model {key!r}"
        if not isinstance(entry, dict) or "grid" not in entry:
            raise DataFileError(f"{where} has no grid with layers, dims and spearman")
        for which in ("grid", "validation_grid"):
            if entry.get(which) is not None:
                _check_grid(entry[which], f"{where}: {which}")
        _check_speed(entry.get("speed"), where)
        time = entry.get("training_time_s")
        if time is not None and not _is_number(time):
            raise DataFileError(f"{where}: training_time_s is {time!r}, expected a number or null")
    return results


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_ints(value: object, where: str) -> list[int]:
    if (
        not isinstance(value, list)
        or not value
        or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in value)
    ):
        raise DataFileError(f"{where} is {value!r}, expected a non-empty list of positive integers")
    if len(set(value)) != len(value):
        raise DataFileError(f"{where} lists a value twice: {value}")
    return list(value)


def _check_grid(grid: object, where: str) -> GridResult:
    """A grid in the ``eval-sts --json`` format as a :class:`GridResult`; DataFileError naming any flaw."""
    if not isinstance(grid, dict):
        raise DataFileError(
            f"{where} is {type(grid).__name__}, expected an object with layers, dims, spearman"
        )
    missing = [k for k in ("layers", "dims", "spearman") if k not in grid]
    if missing:
        raise DataFileError(f"{where} has no {', '.join(missing)} (expected layers, dims and spearman)")
    layers = _positive_ints(grid["layers"], f"{where}: layers")
    dims = _positive_ints(grid["dims"], f"{where}: dims")
    table = grid["spearman"]
    if (
        not isinstance(table, list)
        or len(table) != len(layers)
        or any(not isinstance(row, list) or len(row) != len(dims) for row in table)
    ):
        raise DataFileError(
            f"{where}: spearman is not a layers x dims table ({len(layers)} rows of {len(dims)} numbers)"
        )
    for i, row in enumerate(table):
        for j, value in enumerate(row):
            undefined = isinstance(value, float) and math.isnan(value)  # NaN: an undefined Spearman
            if not (_is_number(value) or undefined):
                raise DataFileError(
                    f"{where}: spearman[{i}][{j}] is {value!r}, not a finite number (or NaN for undefined)"
                )
    spearman = [[float(v) for v in row] for row in table]
    return GridResult(str(grid.get("model") or ""), layers, dims, {"spearman": spearman})


def _check_speed(speed: object, where: str) -> None:
    if not speed:
        return
    if not isinstance(speed, dict) or not {"layers", "sentences_per_s"} <= speed.keys():
        raise DataFileError(f"{where}: speed must be an object with layers and sentences_per_s")
    layers = _positive_ints(speed["layers"], f"{where}: speed.layers")
    rates = speed["sentences_per_s"]
    if (
        not isinstance(rates, list)
        or len(rates) != len(layers)
        or not all(_is_number(v) and v > 0 for v in rates)
    ):
        raise DataFileError(
            f"{where}: speed.sentences_per_s must be {len(layers)} positive numbers (one per layer count), "
            f"got {rates!r}"
        )


def _percent(value: float, full: float) -> float:
    """``value`` as a percentage of ``full`` (nan when ``full`` is 0)."""
    return 100 * value / full if full else math.nan


def _grid(entry: dict, which: str = "grid") -> GridResult:
    return _check_grid(entry[which], which)


def _label(key: str, entry: dict) -> str:
    return entry.get("label", key)


def _speed(entry: dict) -> dict[int, float] | None:
    speed = entry.get("speed")
    if not speed:
        return None
    return dict(zip(speed["layers"], speed["sentences_per_s"]))


# ---------------------------------------------------------------------------------------------- figures
def write_figures(results: dict, out: Path) -> list[Path]:
    """Draw every figure into ``out``; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    written: list[Path] = []
    markers = "osD^vP*X"

    def save(fig, name: str) -> None:
        path = out / name
        fig.tight_layout()
        png = io.BytesIO()
        try:
            fig.savefig(png, format="png", dpi=120)
        finally:
            plt.close(fig)
        atomic_write(path, png.getvalue(), "figure", overwrite=True)  # never left half-written
        written.append(path)

    def line_plot(name, title, xlabel, ylabel, series, xlog=False, hline=None, reference=None):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, (label, xs, ys) in enumerate(series):
            ax.plot(xs, ys, marker=markers[i % len(markers)], label=label)
        if reference is not None:  # (label, xs, ys) drawn as a thin dotted line, e.g. an ideal
            ax.plot(reference[1], reference[2], color="grey", lw=1, ls=":", label=reference[0])
        if hline is not None:
            ax.axhline(hline, color="grey", lw=0.8, ls="--")
        if xlog:
            ax.set_xscale("log", base=2)
        xs_all = sorted({x for _, xs, _ in series for x in xs})
        ax.set_xticks(xs_all)
        ax.set_xticklabels([str(x) for x in xs_all])
        ax.set(title=title, xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        save(fig, name)

    full_dim = {key: max(_grid(e).dims) for key, e in models.items()}
    by_layers, rel_layers, by_dims, rel_dims, speedups = [], [], [], [], []
    for key, entry in models.items():
        g, label = _grid(entry), _label(key, entry)
        d, k = full_dim[key], max(g.layers)
        col = [g.cell(layers, d) for layers in g.layers]
        by_layers.append((label, g.layers, col))
        rel_layers.append((label, g.layers, [_percent(v, g.cell(k, d)) for v in col]))
        row = [g.cell(k, dim) for dim in g.dims]
        by_dims.append((label, g.dims, row))
        rel_dims.append((label, g.dims, [_percent(v, g.cell(k, d)) for v in row]))
        speed = _speed(entry)
        if speed:
            layers = sorted(speed)
            speedups.append((label, layers, [speed[x] / speed[max(layers)] for x in layers]))

    line_plot(
        "spearman_vs_layers.png",
        "STS Benchmark (test) at full embedding size",
        "transformer layers used",
        "Spearman x 100",
        by_layers,
    )
    line_plot(
        "relative_vs_layers.png",
        "Performance relative to the full model, by layers",
        "transformer layers used",
        "% of full-size Spearman",
        rel_layers,
        hline=100,
    )
    if speedups:
        line_plot(
            "speedup_vs_layers.png",
            "Encode speedup on CPU, by layers",
            "transformer layers used",
            "speedup vs all layers (x)",
            speedups,
            hline=1,
            reference=(
                "ideal: n / k layers",
                speedups[0][1],
                [max(speedups[0][1]) / x for x in speedups[0][1]],
            ),
        )
    line_plot(
        "spearman_vs_dims.png",
        "STS Benchmark (test) with all layers",
        "embedding dimensions",
        "Spearman x 100",
        by_dims,
        xlog=True,
    )
    line_plot(
        "relative_vs_dims.png",
        "Performance relative to the full model, by embedding size",
        "embedding dimensions",
        "% of full-size Spearman",
        rel_dims,
        xlog=True,
        hline=100,
    )

    values = np.array([v for e in models.values() for row in _grid(e).spearman for v in row])
    finite = values[np.isfinite(values)]  # undefined (NaN) cells are left blank in the heatmaps
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 100.0)
    for key, entry in models.items():
        g = _grid(entry)
        fig, ax = plt.subplots(figsize=(6, 4.5))
        image = ax.imshow(
            np.array(g.spearman), cmap="viridis", vmin=lo, vmax=hi, aspect="auto", origin="lower"
        )
        ax.set_xticks(range(len(g.dims)), [str(d) for d in g.dims])
        ax.set_yticks(range(len(g.layers)), [str(k) for k in g.layers])
        for i in range(len(g.layers)):
            for j in range(len(g.dims)):
                value = g.spearman[i][j]
                ax.text(
                    j,
                    i,
                    "nan" if math.isnan(value) else f"{value:.1f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if value < (lo + hi) / 2 else "black",
                )
        ax.set(
            title=f"{_label(key, entry)}: Spearman x 100 (STSB test)",
            xlabel="embedding dimensions",
            ylabel="transformer layers used",
        )
        fig.colorbar(image, ax=ax, label="Spearman x 100")
        save(fig, f"heatmap_{key}.png")
    return written


# ---------------------------------------------------------------------------------------------- markdown
def _grid_table(g: GridResult) -> list[str]:
    lines = [
        "| layers \\ dims | " + " | ".join(str(d) for d in g.dims) + " | mean |",
        "|---" * (len(g.dims) + 2) + "|",
    ]
    for k, row in zip(g.layers, g.spearman):
        lines.append(f"| {k} | " + " | ".join(f"{v:.2f}" for v in row) + f" | {np.mean(row):.2f} |")
    return lines


def seed_statements(results: dict) -> list[str]:
    """The 2DMSE / Matryoshka seed statements, recomputed from our numbers for every model."""
    lines = []
    for key, entry in results["models"].items():
        g, label = _grid(entry), _label(key, entry)
        k_full, d_full = max(g.layers), max(g.dims)
        full = g.cell(k_full, d_full)
        half = k_full // 2
        speed = _speed(entry)
        if half in g.layers:
            cost = 100 - _percent(g.cell(half, d_full), full)
            speedup = (
                f"{speed[half] / speed[k_full]:.2f}x speedup"
                if speed and half in speed
                else "(speed not measured)"
            )
            lines.append(
                f"- **{label}**: removing half of the layers ({k_full} → {half}) gives {speedup} at a cost "
                f"of {cost:.1f}% of the STS performance ({full:.2f} → {g.cell(half, d_full):.2f})."
            )
        small = min(g.dims)
        share = 100 * small / d_full
        kept = _percent(g.cell(k_full, small), full)
        lines.append(
            f"- **{label}**: at {share:.1f}% of the embedding size ({small} of {d_full} dims) the model "
            f"preserves {kept:.1f}% of its full-size STS performance ({g.cell(k_full, small):.2f})."
        )
    lines.extend(_pooled_speedup(results))
    return lines


def _pooled_speedup(results: dict) -> list[str]:
    """Half-layer speed-up over all models with the same layer counts (they share one architecture).

    Fine-tuning does not change the architecture, so the models' speed-ups differ only by measurement
    noise; their spread shows how large that noise is.
    """
    speeds = [_speed(entry) for entry in results["models"].values()]
    speeds = [s for s in speeds if s]
    if len(speeds) < 2 or len({tuple(sorted(s)) for s in speeds}) != 1:
        return []
    k_full = max(speeds[0])
    half = k_full // 2
    if half not in speeds[0]:
        return []
    ratios = [s[half] / s[k_full] for s in speeds]
    return [
        f"- **speed, all {len(ratios)} models** (same architecture, so they differ only by measurement "
        f"noise): {half} of {k_full} layers runs {np.mean(ratios):.2f}x faster on average "
        f"(range {min(ratios):.2f}x-{max(ratios):.2f}x)."
    ]


def write_markdown(results: dict, out: Path, figures: list[Path]) -> Path:
    models = results["models"]
    lines = [f"# {results.get('title', 'matryoshka2d results')}", ""]
    for field in ("created", "machine", "command"):
        if results.get(field):
            lines.append(f"- {field}: {results[field]}")
    setup = results.get("setup")
    if setup:
        lines += ["", "## Setup", ""] + [f"- {k}: {v}" for k, v in setup.items()]

    lines += [
        "",
        "## Summary (STSB test, Spearman x 100)",
        "",
        "| model | full size | mean of all cells | mean of reduced-layer cells | training time |",
        "|---|---|---|---|---|",
    ]
    for key, entry in models.items():
        g = _grid(entry)
        k, d = max(g.layers), max(g.dims)
        train = entry.get("training_time_s")
        means = f"{g.mean():.2f} | {g.mean(max_layers=k - 1):.2f}"
        train_text = f"{train / 60:.1f} min" if train else "—"
        lines.append(f"| {_label(key, entry)} | {g.cell(k, d):.2f} | {means} | {train_text} |")
    lines += ["", "## What the seeds claim, recomputed from these numbers", "", *seed_statements(results)]

    for key, entry in models.items():
        lines += ["", f"## {_label(key, entry)}", "", "STSB test:", "", *_grid_table(_grid(entry))]
        if entry.get("validation_grid"):
            lines += ["", "STSB validation:", "", *_grid_table(_grid(entry, "validation_grid"))]
        speed = _speed(entry)
        if speed:
            layers = sorted(speed)
            lines += [
                "",
                "Encode speed (sentences/s, CPU): "
                + ", ".join(
                    f"{k} layers {speed[k]:.0f} ({speed[k] / speed[max(layers)]:.2f}x)" for k in layers
                ),
            ]
    if figures:
        lines += ["", "## Figures", ""] + [f"![{p.stem}]({p.name})" for p in figures]
    for note in results.get("notes", []):
        lines += ["", note]
    path = out / "REPORT.md"
    atomic_write(path, "\n".join(lines) + "\n", "report", overwrite=True)
    return path


def write_report(results_path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Regenerate REPORT.md and the figures in ``out`` from ``results_path``.

    ``out`` may hold other files (the demo keeps ``results.json`` there); they are left alone. Each file
    written is first written under a temporary name and then renamed into place, so an interrupted run
    never leaves a half-written REPORT.md or figure (it may leave a mix of new and old files).
    """
    results = load_results(results_path)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    figures = write_figures(results, out)
    return write_markdown(results, out, figures)
