"""Tests of matryoshka2d.training: config parsing, loss building, the training loop, checkpoints, exact
resume across processes, the model card, and a two-process (gloo) run under torchrun."""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from matryoshka2d import EmbeddingModel
from matryoshka2d.cli import main
from matryoshka2d.errors import InvalidDimError, InvalidInputError, InvalidLayersError, Matryoshka2dError
from matryoshka2d.evaluation.sts import GridResult
from matryoshka2d.losses import (
    CosineSimilarityLoss,
    Matryoshka2dLoss,
    MatryoshkaLoss,
    MultipleNegativesRankingLoss,
)
from matryoshka2d.training.trainer import (
    TrainConfig,
    Trainer,
    add_train_arguments,
    build_loss,
    config_from_args,
    default_dims,
    list_checkpoints,
)

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
WORDS = (
    "a the man woman dog cat runs sits on mat park red blue big small plays ball eats food near two".split()
)
NUM_LAYERS, HIDDEN = 4, 32


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest single-threaded (and the CPU is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_model(tmp: Path, dropout: float = 0.1) -> EmbeddingModel:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    # transformers 5 takes the vocabulary as `vocab`; a `vocab_file=` keyword is silently ignored (all [UNK])
    tokenizer = BertTokenizerFast(vocab={w: i for i, w in enumerate(vocab)}, model_max_length=32)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=HIDDEN,
        num_hidden_layers=NUM_LAYERS,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
    )
    return EmbeddingModel(BertModel(config), tokenizer, name_or_path="tiny-bert")


def sentence(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 7)))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A saved tiny model, a triplet file, a scored-pair file and an STS eval file."""
    return make_workdir(tmp_path_factory.mktemp("train"))


def make_workdir(tmp: Path) -> Path:
    """Write the files of :func:`workdir` into ``tmp``."""
    tiny_model(tmp).save(tmp / "model")
    rng = random.Random(0)
    lines = ["anchor\tpositive\tnegative"]
    for _ in range(40):  # learnable: the positive reuses the anchor's words, the negative is random
        anchor = sentence(rng)
        positive = " ".join([*reversed(anchor.split()), rng.choice(WORDS)])
        lines.append(f"{anchor}\t{positive}\t{sentence(rng)}")
    (tmp / "triplets.tsv").write_text("\n".join(lines) + "\n")
    scored = ["sentence1\tsentence2\tscore"] + [
        f"{sentence(rng)}\t{sentence(rng)}\t{rng.uniform(0, 5):.2f}" for _ in range(24)
    ]
    (tmp / "sts.tsv").write_text("\n".join(scored) + "\n")
    return tmp


def config(workdir: Path, out: Path, **options) -> TrainConfig:
    values = dict(
        model=str(workdir / "model"),
        train_data=[str(workdir / "triplets.tsv")],
        output_dir=str(out),
        batch_size=4,
        steps=8,
        learning_rate=1e-3,
        save_steps=0,
        progress=False,
    )
    values.update(options)
    return TrainConfig.from_dict(values)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def max_abs_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def subprocess_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def run_train_cli(*args: str, launcher: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", *launcher, "matryoshka2d.cli", "train", *args]
    result = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


# ---------------------------------------------------------------------------------------- config
def test_config_parses_strings_and_lists(tmp_path):
    cfg = TrainConfig.from_dict(
        {
            "model": "m",
            "train-data": "a.tsv, b.tsv",
            "output_dir": "out",
            "learning_rate": "2e-5",  # YAML reads this as a string
            "dims": "384,128 64",
            "schedule": "2:32,4:64",
            "loss_args": '{"scale": 10}',
            "columns": '{"anchor": "premise", "positive": "hypothesis"}',
            "progress": "no",
            "max_grad_norm": "none",
        }
    )
    assert cfg.train_data == ["a.tsv", "b.tsv"]
    assert cfg.learning_rate == 2e-5 and cfg.dims == [384, 128, 64] and cfg.schedule == [[2, 32], [4, 64]]
    assert cfg.loss_args == {"scale": 10} and cfg.columns == {"anchor": "premise", "positive": "hypothesis"}
    assert cfg.progress is False and cfg.max_grad_norm is None
    assert TrainConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"batch_sise": 4}, r"unknown training option 'batch_sise'; did you mean \['batch_size'\]"),
        ({"batch_size": 0}, "'batch_size' must be >= 1"),
        ({"batch_size": "four"}, "'batch_size': expected an integer"),
        ({"warmup_ratio": 1.5}, "warmup_ratio"),
        ({"mixed_precision": "fp8"}, "mixed_precision"),
        ({"steps": 5, "stop_at": 9}, "beyond 'steps'"),
        ({"dims": [64, 0]}, "'dims' must be a non-empty list of positive integers"),
        ({"schedule": "2:32,4"}, "pairs like 2:32"),
        ({"loss_args": "[1]"}, "expected a JSON dict"),
        ({"batch_size": None}, "cannot be none"),
        ({"output_dir": ""}, "'output_dir' is required"),
        (
            {"label_range": 5},
            r"'label_range' must be a list of two numbers \[low, high\] \(e.g. \[0, 5\]\), got 5",
        ),
        ({"label_range": "5"}, "'label_range' must be a list of two numbers"),
        ({"label_range": [0, 1, 2]}, "'label_range' must be a list of two numbers"),
        ({"label_range": [0, "5"]}, "'label_range' must be a list of two numbers"),
        ({"label_range": [0, float("inf")]}, "'label_range' must be a list of two numbers"),
        ({"label_range": "[5, 0]"}, r"'label_range' must have low < high, got \[5, 0\]"),
    ],
)
def test_config_errors_name_the_option(options, message):
    with pytest.raises(InvalidInputError, match=message):
        TrainConfig.from_dict({"model": "m", "train_data": ["a.tsv"], "output_dir": "out", **options})


def test_label_range_flag(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    base = ["--model", "m", "--train-data", "a.tsv", "--output-dir", "o"]
    assert config_from_args(parser.parse_args([*base, "--label-range", "[0, 5]"])).label_range == [0, 5]
    assert main(["train", *base, "--label-range", "5"]) == 2
    assert "'label_range' must be a list of two numbers" in capsys.readouterr().err


def test_yaml_with_flags_overriding(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text(
        yaml.safe_dump(
            {"model": "m", "train_data": ["a.tsv"], "output_dir": "o", "batch_size": 16, "dims": [32, 8]}
        )
    )
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args(
        [
            "--config",
            str(path),
            "--batch-size",
            "8",
            "--no-progress",
            "--dims",
            "16",
            "4",
            "--schedule",
            "1:8",
            "2:16",
        ]
    )
    cfg = config_from_args(args)
    assert (cfg.model, cfg.batch_size, cfg.progress, cfg.dims) == ("m", 8, False, [16, 4])
    assert cfg.schedule == [[1, 8], [2, 16]]
    assert config_from_args(parser.parse_args(["--config", str(path)])).batch_size == 16
    (tmp_path / "bad.yaml").write_text("- a list\n")
    with pytest.raises(InvalidInputError, match="expected a mapping"):
        TrainConfig.from_yaml(tmp_path / "bad.yaml")
    with pytest.raises(InvalidInputError, match="config file not found"):
        TrainConfig.from_yaml(tmp_path / "missing.yaml")


def test_every_option_has_a_flag():
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    flags = {a.dest for a in parser._actions}
    assert {f for f in TrainConfig.__dataclass_fields__} <= flags


def test_default_dims():
    assert default_dims(384) == [384, 256, 128, 64, 32]
    assert default_dims(768) == [768, 512, 256, 128, 64]
    assert default_dims(32) == [32, 16, 8]


# ---------------------------------------------------------------------------------------- losses
def test_build_loss_from_names(workdir, tmp_path):
    model = EmbeddingModel.load(workdir / "model")
    loss = build_loss(config(workdir, tmp_path, loss="mnrl", wrapper="2d"), model)
    assert isinstance(loss, Matryoshka2dLoss) and isinstance(loss.base, MultipleNegativesRankingLoss)
    assert loss.config()["dims"] == [32, 16, 8]
    loss = build_loss(config(workdir, tmp_path, loss="CoSENTLoss", wrapper="matryoshka", dims=[32, 4]), model)
    assert isinstance(loss, MatryoshkaLoss) and loss.config()["dims"] == [32, 4] and loss.needs_labels
    starbucks = build_loss(config(workdir, tmp_path, schedule="1:8,2:16,4:32"), model)
    assert starbucks.config()["schedule"] == [[1, 8], [2, 16], [4, 32]]
    plain = build_loss(config(workdir, tmp_path, wrapper="none", loss_args={"scale": 10}), model)
    assert isinstance(plain, MultipleNegativesRankingLoss) and plain.config()["scale"] == 10


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"loss": "triplet"}, "unknown loss 'triplet'"),
        ({"wrapper": "3d"}, "unknown wrapper '3d'"),
        ({"loss_args": {"temperature": 1}}, r"has no option\(s\) \['temperature'\]"),
        ({"wrapper": "adaptive", "dims": [16]}, "'dims' does not apply to AdaptiveLayerLoss"),
        ({"wrapper": "matryoshka", "schedule": [[1, 8]]}, "needs wrapper Matryoshka2dLoss"),
        ({"wrapper": "none", "schedule": [[1, 8]]}, "needs wrapper Matryoshka2dLoss"),
        ({"dims": [16], "schedule": [[1, 8]]}, "either 'dims' or 'schedule'"),
    ],
)
def test_build_loss_errors(workdir, tmp_path, options, message):
    model = EmbeddingModel.load(workdir / "model")
    with pytest.raises(InvalidInputError, match=message):
        build_loss(config(workdir, tmp_path, **options), model)


# ---------------------------------------------------------------------------------------- training
def test_train_saves_model_card_checkpoints_and_evaluation(workdir, tmp_path):
    out = tmp_path / "model"
    cfg = config(
        workdir,
        out,
        save_steps=4,
        save_total_limit=1,
        eval_data=str(workdir / "sts.tsv"),
        eval_steps=4,
        eval_dims=[32, 8],
        log_steps=2,
    )
    trainer = Trainer(cfg)
    result = trainer.train()
    assert result.output_dir == out and result.step == 8
    loaded = EmbeddingModel.load(out)
    assert loaded.num_layers == NUM_LAYERS and loaded.encode(["a dog runs"]).shape == (1, HIDDEN)
    assert max_abs_diff(weights(out), weights(workdir / "model")) > 1e-4  # it did train

    checkpoints = list_checkpoints(tmp_path / "model-checkpoints")
    assert [c.name for c in checkpoints] == ["checkpoint-8"]  # save_total_limit=1 removed checkpoint-4
    state = json.loads((checkpoints[0] / "trainer_state.json").read_text())
    assert state["step"] == 8 and state["sampler"]["position"] == 8 and len(state["log_history"]) == 4
    assert [e["step"] for e in state["eval_history"]] == [4, 8]

    assert result.evaluation["layers"] == [1, 2, 4] and result.evaluation["dims"] == [32, 8]
    assert len(result.evaluation["spearman"]) == 3 and all(
        -100 <= v <= 100 for row in result.evaluation["spearman"] for v in row
    )
    meta = json.loads((out / "matryoshka2d.json").read_text())["training"]
    assert meta["base_model"] == str(workdir / "model") and meta["loss"]["name"] == "Matryoshka2dLoss"
    assert meta["trained_dims"] == [32, 16, 8]
    assert meta["trained_layers"][str(NUM_LAYERS)] == 8  # the last layer every step, plus sampled priors
    assert sum(meta["trained_layers"].values()) == 16
    card = (out / "README.md").read_text()
    for expected in (
        str(workdir / "model"),
        "triplets.tsv",
        "40 rows",
        "Matryoshka2dLoss",
        "MultipleNegativesRankingLoss",
        "trained dims: [32, 16, 8]",
        "## Evaluation",
        GridResult.from_dict(result.evaluation).table(),
    ):
        assert expected in card, expected


def test_starbucks_schedule_trains_every_pair(workdir, tmp_path):
    out = tmp_path / "starbucks"
    Trainer(config(workdir, out, schedule=[[1, 8], [2, 16], [4, 32]], steps=3)).train()
    meta = json.loads((out / "matryoshka2d.json").read_text())["training"]
    assert meta["trained_dims"] == [32, 16, 8]
    assert meta["trained_layers"] == {"1": 3, "2": 3, "4": 3}
    assert meta["loss"]["schedule"] == [[1, 8], [2, 16], [4, 32]]


def test_loss_goes_down(workdir, tmp_path):
    cfg = config(workdir, tmp_path / "out", wrapper="none", steps=30, log_steps=5, warmup_ratio=0.0)
    trainer = Trainer(cfg)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.log_history]
    assert len(losses) == 6 and losses[-1] < 0.5 * losses[0], losses


def test_gradient_accumulation_matches_a_bigger_batch(workdir, tmp_path):
    """CosineSimilarityLoss is a mean over rows: 2 x 4 accumulated rows must equal one batch of 8."""
    results = []
    for batch, accum in ((8, 1), (4, 2)):
        cfg = config(
            workdir,
            tmp_path / f"out-{batch}",
            train_data=[str(workdir / "sts.tsv")],
            loss="cosine",
            wrapper="none",
            label_range=[0, 5],
            batch_size=batch,
            gradient_accumulation_steps=accum,
            steps=3,
        )
        trainer = Trainer(cfg, model=tiny_model(tmp_path, dropout=0.0), loss=CosineSimilarityLoss())
        trainer.train()
        results.append({k: v.detach().clone() for k, v in trainer.model.state_dict().items()})
    assert max_abs_diff(*results) < 1e-5


def test_bf16_after_fp32_in_one_process(workdir, tmp_path):
    Trainer(config(workdir, tmp_path / "fp32", steps=2)).train()
    result = Trainer(config(workdir, tmp_path / "bf16", steps=2, mixed_precision="bf16")).train()
    assert result.step == 2 and result.loss is not None and math.isfinite(result.loss)
    assert EmbeddingModel.load(tmp_path / "bf16").encode(["a cat"]).dtype == np.float32


def test_stop_at_leaves_a_checkpoint_and_no_model(workdir, tmp_path):
    out = tmp_path / "out"
    result = Trainer(config(workdir, out, stop_at=3)).train()
    assert result.output_dir is None and result.step == 3
    assert result.checkpoint == tmp_path / "out-checkpoints" / "checkpoint-3"
    assert not out.exists()
    assert (result.checkpoint / "model" / "modules.json").is_file()
    assert EmbeddingModel.load(result.checkpoint / "model").num_layers == NUM_LAYERS


def test_training_errors(workdir, tmp_path):
    with pytest.raises(Matryoshka2dError, match="needs a label per row"):
        Trainer(config(workdir, tmp_path / "o", loss="cosent")).train()
    with pytest.raises(InvalidInputError, match="fp16 needs a GPU"):
        Trainer(config(workdir, tmp_path / "o", mixed_precision="fp16", cpu=True)).train()
    with pytest.raises(InvalidInputError, match="not a checkpoint folder"):
        Trainer(config(workdir, tmp_path / "o", resume=str(tmp_path))).train()
    with pytest.raises(InvalidDimError, match="larger than the model's embedding size"):
        Trainer(config(workdir, tmp_path / "o", dims=[64, 32])).train()
    sts = str(workdir / "sts.tsv")
    with pytest.raises(InvalidLayersError, match="option 'eval_layers': layers=9 is out of range: .* 1..4"):
        Trainer(config(workdir, tmp_path / "o", eval_data=sts, eval_layers=[9])).train()
    with pytest.raises(InvalidDimError, match="option 'eval_dims': dim=64 is out of range: .* 1..32 dims"):
        Trainer(config(workdir, tmp_path / "o", eval_data=sts, eval_dims=[64])).train()
    with pytest.raises(InvalidInputError, match="fewer than one batch"):
        Trainer(config(workdir, tmp_path / "o", batch_size=64)).train()


# ---------------------------------------------------------------------------------------- extra tasks
@pytest.mark.parametrize(
    ("tasks", "message"),
    [
        ({"train_data": "x.tsv"}, "expected a JSON list"),
        (["x.tsv"], r"'extra_tasks' item 0: expected a mapping"),
        ([{"train_data": "x.tsv"}], r"'extra_tasks' item 0: 'loss' is required"),
        ([{"loss": "cosent"}], r"'extra_tasks' item 0: 'train_data' is required"),
        ([{"train_data": "x.tsv", "loss": "cosent", "lr": 1}], r"item 0: unknown key 'lr' \(keys: "),
        ([{"train_data": "x.tsv", "loss": "cosent", "label_range": [5, 0]}], r"item 0: .*low < high"),
        (
            [{"train_data": "x.tsv", "loss": "cosent", "max_rows": 0}],
            r"item 0: option 'max_rows' must be >= 1",
        ),
    ],
)
def test_extra_task_errors_name_the_item(tasks, message):
    with pytest.raises(InvalidInputError, match=message):
        TrainConfig.from_dict(
            {"model": "m", "train_data": ["a.tsv"], "output_dir": "out", "extra_tasks": tasks}
        )


def test_extra_tasks_flag_takes_json(tmp_path):
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    args = parser.parse_args(
        ["--model", "m", "--train-data", "a.tsv", "--output-dir", "o", "--extra-tasks"]
        + ['[{"train_data": "b.tsv", "loss": "cosent", "max_rows": "10"}]']
    )
    cfg = config_from_args(args)
    assert cfg.extra_tasks == [{"train_data": ["b.tsv"], "loss": "cosent", "max_rows": 10}]
    task = cfg.task_config(cfg.extra_tasks[0])
    assert (task.train_data, task.loss, task.max_rows, task.label_range) == (["b.tsv"], "cosent", 10, None)
    assert (task.wrapper, task.extra_tasks) == (cfg.wrapper, [])


def sts_task(workdir: Path, **options) -> dict:
    return {"train_data": str(workdir / "sts.tsv"), "loss": "cosent", "label_range": [0, 5], **options}


def test_extra_task_trains_its_loss_on_its_batches(workdir, tmp_path):
    """Triplets with MNRL plus scored pairs with CoSENT: each batch from one task, every batch of both."""
    out = tmp_path / "model"
    cfg = config(workdir, out, steps=None, epochs=1, wrapper="2d", extra_tasks=[sts_task(workdir)])
    trainer = Trainer(cfg)
    trainer.train()
    per_task = [task.stream.batches_per_epoch() for task in trainer.tasks]
    assert per_task[1] == 6 and trainer.total_steps == sum(per_task)  # 24 scored pairs in batches of 4
    meta = json.loads((out / "matryoshka2d.json").read_text())["training"]
    assert meta["task_batches"] == {"0": per_task[0], "1": per_task[1]}
    assert meta["extra_tasks"][0]["loss"]["base"]["name"] == "CoSENTLoss"
    assert meta["extra_tasks"][0]["loss"]["name"] == "Matryoshka2dLoss"  # the main task's wrapper
    assert meta["extra_tasks"][0]["data"]["label_column"] == "score"
    card = (out / "README.md").read_text()
    assert (
        f"- task 1: `{workdir / 'sts.tsv'}` (24 rows); columns sentence1, sentence2, label score; CoSENTLoss"
        in card
    )
    # The extra task changes the result (its batches are trained, not skipped).
    alone = Trainer(config(workdir, tmp_path / "alone", steps=per_task[0], wrapper="2d"))
    alone.train()
    assert max_abs_diff(weights(out), weights(tmp_path / "alone")) > 1e-4


def test_extra_task_errors_at_start(workdir, tmp_path):
    with pytest.raises(Matryoshka2dError, match="extra_tasks item 0: .*needs a label per row"):
        task = {"train_data": str(workdir / "triplets.tsv"), "loss": "cosent"}
        Trainer(config(workdir, tmp_path / "o", extra_tasks=[task])).train()
    with pytest.raises(InvalidInputError, match="extra_tasks item 0: the training data has 24 rows, fewer"):
        Trainer(config(workdir, tmp_path / "o", batch_size=25, extra_tasks=[sts_task(workdir)])).train()


def test_extra_task_resume_is_exact(workdir, tmp_path):
    """12 steps straight == 5 steps, then resume for 7 more (both tasks' positions and the task order)."""
    options = dict(steps=12, save_steps=5, extra_tasks=[sts_task(workdir)], wrapper="2d")
    straight = Trainer(config(workdir, tmp_path / "straight", **options))
    straight.train()
    Trainer(config(workdir, tmp_path / "split", stop_at=5, **options)).train()
    resumed = Trainer(config(workdir, tmp_path / "split", resume="latest", **options))
    resumed.train()
    assert max_abs_diff(weights(tmp_path / "straight"), weights(tmp_path / "split")) <= 1e-6
    assert resumed.task_counts == straight.task_counts and set(straight.task_counts) == {0, 1}
    # A checkpoint of a run without the extra task is another run's.
    Trainer(config(workdir, tmp_path / "single", stop_at=5, steps=12, save_steps=5, wrapper="2d")).train()
    with pytest.raises(Matryoshka2dError, match="belongs to another run"):
        Trainer(config(workdir, tmp_path / "single", resume="latest", **options)).train()


def test_cli_listed_columns_use_the_score_column(workdir, tmp_path):
    argv = ["train", "--model", str(workdir / "model"), "--train-data", str(workdir / "sts.tsv")]
    argv += ["--columns", "sentence1,sentence2", "--loss", "cosent", "--steps", "1", "--batch-size", "4"]
    assert main([*argv, "--output-dir", str(tmp_path / "o"), "--save-steps", "0", "--no-progress"]) == 0
    meta = json.loads((tmp_path / "o" / "matryoshka2d.json").read_text())["training"]
    assert meta["data"]["label_column"] == "score"


def test_cli_errors_are_one_line_exit_2(workdir, tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"m2d train: error: config file not found: {tmp_path / 'missing.yaml'}"
    bad_loss = ["train", "--model", str(workdir / "model"), "--train-data", str(workdir / "triplets.tsv")]
    assert main([*bad_loss, "--output-dir", str(tmp_path / "o"), "--loss", "cosent"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("m2d train: error: ") and "needs a label per row" in err and err.count("\n") == 0
    with pytest.raises(SystemExit) as exit_info:  # a malformed flag is a usage error, also exit 2
        main(["train", "--batch-size", "four"])
    assert exit_info.value.code == 2
    assert "expected an integer" in capsys.readouterr().err


def test_resume_in_separate_processes_is_exact(workdir, tmp_path):
    """20 steps straight == 15 steps, then resume for 5 more in a new process (weights within 1e-6; the
    same log: the stop falls inside a logging window, whose losses the checkpoint carries)."""
    options = dict(
        steps=20, save_steps=5, batch_size=3, eval_data=str(workdir / "sts.tsv"), eval_steps=10, log_steps=10
    )
    straight = Trainer(config(workdir, tmp_path / "straight", **options))
    straight.train()

    yaml_path = tmp_path / "train.yaml"
    cfg = config(workdir, tmp_path / "split", **options).to_dict()
    yaml_path.write_text(yaml.safe_dump(cfg))
    first = run_train_cli("--config", str(yaml_path), "--stop-at", "15")
    assert first.stdout.strip().endswith("checkpoint-15") and not (tmp_path / "split").exists()
    second = run_train_cli("--config", str(yaml_path), "--resume", "latest")
    assert "resumed from" in second.stderr and second.stdout.strip() == str(tmp_path / "split")

    assert max_abs_diff(weights(tmp_path / "straight"), weights(tmp_path / "split")) <= 1e-6
    meta = [
        json.loads((tmp_path / d / "matryoshka2d.json").read_text())["training"]
        for d in ("straight", "split")
    ]
    assert meta[0]["trained_layers"] == meta[1]["trained_layers"]  # same sampled layers after the resume
    assert meta[0]["evaluation"] == meta[1]["evaluation"]
    assert meta[0]["final_loss"] == meta[1]["final_loss"]
    states = [
        json.loads((tmp_path / f"{d}-checkpoints/checkpoint-20/trainer_state.json").read_text())
        for d in ("straight", "split")
    ]
    assert states[0]["log_history"] == states[1]["log_history"]
    assert [e["step"] for e in states[1]["eval_history"]] == [10, 20]


def test_two_processes_under_torchrun(workdir, tmp_path):
    out = tmp_path / "ddp"
    result = run_train_cli(
        "--model", str(workdir / "model"), "--train-data", str(workdir / "triplets.tsv"),
        "--output-dir", str(out), "--batch-size", "4", "--steps", "4", "--save-steps", "2", "--no-progress",
        launcher=("torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"),
    )  # fmt: skip
    assert "on 2 process(es)" in result.stderr
    model = EmbeddingModel.load(out)
    assert model.encode(["a cat"]).shape == (1, HIDDEN)
    meta = json.loads((out / "matryoshka2d.json").read_text())["training"]
    assert meta["num_processes"] == 2 and meta["total_batch_size"] == 8 and meta["steps"] == 4
    rng = torch.load(tmp_path / "ddp-checkpoints" / "checkpoint-4" / "rng_state.pt", weights_only=False)
    assert len(rng) == 2  # both processes' random states are in the checkpoint

    # stopped and resumed: the same model (a process of a CPU run is on "cpu:N": its checkpoints must load)
    split = tmp_path / "ddp-split"
    argv = ["--model", str(workdir / "model"), "--train-data", str(workdir / "triplets.tsv"),
            "--output-dir", str(split), "--batch-size", "4", "--steps", "4", "--no-progress"]  # fmt: skip
    launcher = ("torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m")
    run_train_cli(*argv, "--stop-at", "2", launcher=launcher)
    resumed = run_train_cli(*argv, "--resume", "latest", launcher=launcher)
    assert "resumed from" in resumed.stderr and "damaged" not in resumed.stderr
    assert max_abs_diff(weights(out), weights(split)) <= 1e-6


# ---------------------------------------------------------------------------------------- examples, docs
@pytest.mark.parametrize(
    "name",
    ["nli-mnrl-2d.yaml", "nli-mnrl-2d-recommended.yaml", "stsb-cosent-matryoshka.yaml", "nli-starbucks.yaml"],
)
def test_example_configs_are_valid(name):
    from types import SimpleNamespace

    cfg = TrainConfig.from_yaml(ROOT / "examples" / name)
    minilm = SimpleNamespace(dim=384, num_layers=6)  # the shape of all-MiniLM-L6-v2
    loss = build_loss(cfg, minilm)
    loss.check_model(minilm)
    extra = [path for task in cfg.extra_tasks for path in task["train_data"]]
    assert all(path.startswith("../shared/data/") for path in cfg.train_data + [cfg.eval_data] + extra)
    for task in cfg.extra_tasks:  # each task's loss is wrapped like the main one
        build_loss(cfg.task_config(task), minilm).check_model(minilm)
    assert loss.config()["name"] in ("Matryoshka2dLoss", "MatryoshkaLoss")


def test_recommended_example_is_the_demo_recipe():
    from matryoshka2d.demo.experiment import COMMON, DIMS, RECOMMENDED_WRAPPER_ARGS, SECOND_TASK, second_task

    cfg = TrainConfig.from_yaml(ROOT / "examples" / "nli-mnrl-2d-recommended.yaml")
    assert cfg.wrapper == "Matryoshka2dLoss" and cfg.dims == DIMS
    assert cfg.wrapper_args == RECOMMENDED_WRAPPER_ARGS
    expected = TrainConfig.from_dict(
        {
            "model": "m",
            "output_dir": "o",
            "train_data": ["t"],
            "extra_tasks": [second_task(Path("../shared/data"))],
        }
    ).extra_tasks
    assert cfg.extra_tasks == expected and SECOND_TASK["train_data"] == "stsb/train.tsv"
    for option in ("batch_size", "epochs", "learning_rate", "warmup_ratio", "seed"):
        assert getattr(cfg, option) == COMMON[option], option


def test_training_docs_list_every_option():
    text = (ROOT / "docs" / "TRAINING.md").read_text()
    missing = [f for f in TrainConfig.__dataclass_fields__ if f"| `{f}` |" not in text]
    assert not missing
    assert "## Multi-GPU training" in text and "torchrun --standalone --nproc_per_node" in text
