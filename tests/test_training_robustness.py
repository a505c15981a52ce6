"""Training never destroys other data and never mixes runs: the output-folder rule, the run fingerprint, the
run lock, damaged checkpoints, and evaluation during training in eval mode."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
from test_training import config, make_workdir, max_abs_diff, subprocess_env, tiny_model, weights

from matryoshka2d import EmbeddingModel
from matryoshka2d.cli import main
from matryoshka2d.errors import DataFileError, InvalidInputError, OutputPathError
from matryoshka2d.evaluation.sts import evaluate_sts
from matryoshka2d.persistence import mark_output_folder
from matryoshka2d.training import (
    CheckpointError,
    CorruptCheckpointError,
    RunLockedError,
    Trainer,
    list_checkpoints,
)
from matryoshka2d.training.checkpoints import read_state, run_fingerprint, run_identity
from matryoshka2d.training.config import TrainConfig
from matryoshka2d.training.run_guard import LOCK_FILE, RunLock


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A saved tiny model, a triplet file, a scored-pair file and an STS eval file."""
    return make_workdir(tmp_path_factory.mktemp("train"))


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tree(folder):
    """Every file under ``folder`` with its bytes (to show a folder was left untouched)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------- output folder
def test_output_dir_may_not_be_an_input_or_contain_one(workdir, tmp_path):
    model_dir = workdir / "model"
    before = tree(model_dir)
    cases = {
        str(model_dir): "an input of this command",  # the base model itself
        str(workdir): "contains",  # the folder holding the base model and the data
        str(model_dir / "sub"): "inside",  # a path inside the base model
        str(workdir / "triplets.tsv"): "an input of this command",  # a data file
    }
    for out, message in cases.items():
        with pytest.raises(OutputPathError, match=message):
            Trainer(config(workdir, tmp_path / "x", output_dir=out, overwrite=True)).train()
    assert tree(model_dir) == before
    assert not list((workdir).glob("*-checkpoints"))  # refused before anything was written


def test_output_dir_may_not_be_the_current_folder(workdir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "notes.txt").write_text("keep me")
    for out in (".", str(tmp_path), "..", "sub/.."):
        with pytest.raises(OutputPathError, match="current folder|no output path"):
            Trainer(config(workdir, tmp_path, output_dir=out, checkpoint_dir="ck", overwrite=True)).train()
    assert (tmp_path / "notes.txt").read_text() == "keep me"


def test_output_dir_holding_other_files_is_never_replaced(workdir, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    for overwrite in (False, True):
        with pytest.raises(OutputPathError, match="not written by matryoshka2d"):
            Trainer(config(workdir, out, overwrite=overwrite)).train()
    assert (out / "thesis.tex").read_text() == "years of work"
    argv = ["train", "--model", str(workdir / "model"), "--train-data", str(workdir / "triplets.tsv")]
    assert main([*argv, "--output-dir", str(out), "--overwrite", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("m2d train: error: ") and "thesis.tex" in err and err.count("\n") == 1


def test_previous_result_is_replaced_only_with_overwrite(workdir, tmp_path):
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    Trainer(config(workdir, tmp_path / "empty", steps=2)).train()  # an empty folder is fine
    Trainer(config(workdir, out, steps=2)).train()
    first = weights(out)
    with pytest.raises(OutputPathError, match="already holds a model written by matryoshka2d.*--overwrite"):
        Trainer(config(workdir, out, steps=3)).train()
    assert max_abs_diff(weights(out), first) == 0
    Trainer(config(workdir, out, steps=3, overwrite=True)).train()
    assert max_abs_diff(weights(out), first) > 0


def test_checkpoint_dir_inside_output_dir_is_refused(workdir, tmp_path):
    with pytest.raises(OutputPathError, match="inside output_dir"):
        Trainer(config(workdir, tmp_path / "o", checkpoint_dir=str(tmp_path / "o" / "ck"))).train()
    with pytest.raises(OutputPathError, match="contains"):  # a checkpoint folder holding the base model
        Trainer(config(workdir, tmp_path / "o", checkpoint_dir=str(workdir))).train()


def test_output_dir_inside_checkpoint_dir_is_refused_before_training(workdir, tmp_path):
    """It used to train to the end, be refused by the final save, and remove the checkpoints it made."""
    trainer = Trainer(config(workdir, tmp_path / "ck" / "final", checkpoint_dir=str(tmp_path / "ck")))
    with pytest.raises(OutputPathError, match="output_dir .* is inside checkpoint_dir"):
        trainer.train()
    assert getattr(trainer, "step", 0) == 0 and not (tmp_path / "ck").exists()


def test_config_file_is_an_input(workdir, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "train.yaml").write_text(json.dumps(config(workdir, folder).to_dict()))
    with pytest.raises(OutputPathError, match="train.yaml"):
        Trainer(TrainConfig.from_yaml(folder / "train.yaml", overrides={"overwrite": True})).train()


# ---------------------------------------------------------------------------------------- run fingerprint
def test_checkpoints_record_the_run_fingerprint(workdir, tmp_path):
    trainer = Trainer(config(workdir, tmp_path / "o", steps=4, save_steps=2))
    trainer.train()
    state = read_state(list_checkpoints(tmp_path / "o-checkpoints")[-1])
    assert state["run_fingerprint"] == trainer.fingerprint == run_fingerprint(state["run"])
    meta = json.loads((tmp_path / "o" / "matryoshka2d.json").read_text())["training"]
    assert meta["run_fingerprint"] == trainer.fingerprint
    # where the output goes, how often to save or log, and stop_at are not part of the run
    same = config(workdir, tmp_path / "elsewhere", steps=4, save_steps=1, stop_at=2, log_steps=3)
    assert run_fingerprint(run_identity(same)) == trainer.fingerprint
    assert (
        run_fingerprint(run_identity(config(workdir, tmp_path / "o", steps=4, seed=1))) != trainer.fingerprint
    )
    spelled = config(workdir, tmp_path / "o", steps=4, model=str(workdir / "model") + "/")
    assert run_fingerprint(run_identity(spelled)) == trainer.fingerprint


def test_resume_refuses_another_runs_checkpoint(workdir, tmp_path, capsys):
    out = tmp_path / "o"
    Trainer(config(workdir, out, steps=6, stop_at=2, save_steps=2)).train()
    checkpoint = tmp_path / "o-checkpoints" / "checkpoint-2"
    with pytest.raises(
        CheckpointError, match=r"belongs to another run \(learning_rate: 0.001 there, 0.002 now"
    ):
        Trainer(config(workdir, out, steps=6, learning_rate=2e-3, resume="latest")).train()
    with pytest.raises(CheckpointError, match="belongs to another run"):
        Trainer(config(workdir, out, steps=6, dims=[32, 8], resume=str(checkpoint))).train()
    with pytest.raises(CheckpointError, match=r"belongs to another run \(steps: 6 there, 12 now"):
        Trainer(config(workdir, out, steps=12, resume="latest")).train()
    # --model that disagrees with the checkpoint is refused, not ignored
    other = tmp_path / "other-model"
    tiny_model(tmp_path, dropout=0.0).save(other)
    with pytest.raises(CheckpointError, match="continues training of model .* but this run's model is"):
        Trainer(config(workdir, out, steps=6, model=str(other), resume="latest")).train()
    argv = ["train", "--model", str(other), "--train-data", str(workdir / "triplets.tsv"), "--steps", "6"]
    argv += ["--output-dir", str(out), "--resume", "latest", "--batch-size", "4", "--no-progress"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "continues training of model" in err
    # the same run continues (evaluation settings may change)
    result = Trainer(
        config(workdir, out, steps=6, save_steps=2, resume="latest", eval_data=str(workdir / "sts.tsv"))
    ).train()
    assert result.step == 6 and result.output_dir == out


def test_new_run_in_a_folder_with_another_runs_checkpoints(workdir, tmp_path):
    out = tmp_path / "o"
    Trainer(config(workdir, out, steps=6, stop_at=2, save_steps=2)).train()
    with pytest.raises(CheckpointError, match="holds checkpoints of another run .*--overwrite"):
        Trainer(config(workdir, out, steps=4, seed=7, save_steps=2)).train()
    assert [c.name for c in list_checkpoints(tmp_path / "o-checkpoints")] == ["checkpoint-2"]
    with pytest.warns(UserWarning, match="deleting 1 checkpoint"):
        Trainer(config(workdir, out, steps=4, seed=7, save_steps=3, overwrite=True)).train()
    names = [c.name for c in list_checkpoints(tmp_path / "o-checkpoints")]
    assert names == ["checkpoint-3"]
    assert read_state(tmp_path / "o-checkpoints" / "checkpoint-3")["run"]["seed"] == {"seed": 7}
    # the same run started again without resume: a warning, then it starts from step 0
    with pytest.warns(UserWarning, match="holds checkpoints of this run"):
        result = Trainer(config(workdir, tmp_path / "p", steps=4, seed=7, save_steps=3, overwrite=True,
                                checkpoint_dir=str(tmp_path / "o-checkpoints"))).train()  # fmt: skip
    assert result.step == 4


def test_old_checkpoints_without_fingerprint_are_checked_by_their_config(workdir, tmp_path):
    out = tmp_path / "o"
    Trainer(config(workdir, out, steps=6, stop_at=2, save_steps=2)).train()
    state_file = tmp_path / "o-checkpoints" / "checkpoint-2" / "trainer_state.json"
    state = json.loads(state_file.read_text())
    del state["run"], state["run_fingerprint"]
    state_file.write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="weight_decay: 0.01 there, 0.1 now"):
        Trainer(config(workdir, out, steps=6, weight_decay=0.1, resume="latest")).train()
    assert Trainer(config(workdir, out, steps=6, resume="latest")).train().step == 6


# ---------------------------------------------------------------------------------------- lock
def test_a_live_run_locks_its_checkpoint_folder(workdir, tmp_path):
    folder = mark_output_folder(tmp_path / "o-checkpoints", "checkpoints")  # as the other run left it
    with RunLock(folder, "another run"):
        with pytest.raises(
            RunLockedError, match=rf"another training run \(pid {os.getpid()} .*o-checkpoints"
        ):
            Trainer(config(workdir, tmp_path / "o", steps=2)).train()
        assert not (tmp_path / "o").exists()
    result = Trainer(config(workdir, tmp_path / "o", steps=2, save_steps=1)).train()  # free again
    assert result.step == 2 and not (folder / LOCK_FILE).exists()  # released at the end


def test_lock_held_by_another_live_process(tmp_path):
    folder = tmp_path / "ck"
    folder.mkdir()
    code = (
        "import sys, time; from matryoshka2d.training.run_guard import RunLock; "
        f"lock = RunLock({str(folder)!r}).acquire(); print('locked', flush=True); sys.stdin.read()"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code],
        env=subprocess_env(),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"pid {holder.pid} "):
            RunLock(folder).acquire()
    finally:
        holder.communicate("", timeout=60)
    # the holder exited without releasing (it never called release): its lock file is stale now
    assert (folder / LOCK_FILE).exists()
    with pytest.warns(UserWarning, match=f"no longer running \\(pid {holder.pid}"):
        lock = RunLock(folder).acquire()
    assert json.loads((folder / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()
    assert not (folder / LOCK_FILE).exists()


def test_stale_lock_of_a_dead_process_is_taken_over(workdir, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    folder = mark_output_folder(tmp_path / "o-checkpoints", "checkpoints")  # as the killed run left it
    (folder / LOCK_FILE).write_text(json.dumps({"pid": dead.pid, "host": "h", "started": "yesterday"}))
    with pytest.warns(UserWarning, match=f"taking over the lock .*pid {dead.pid}, started yesterday"):
        result = Trainer(config(workdir, tmp_path / "o", steps=2)).train()
    assert result.step == 2 and not (folder / LOCK_FILE).exists()
    assert not folder.exists() or not list(folder.iterdir()) or list_checkpoints(folder) == []


def test_checkpoint_folder_created_and_left_empty_is_removed(workdir, tmp_path):
    Trainer(config(workdir, tmp_path / "o", steps=2, save_steps=0)).train()
    assert (tmp_path / "o" / "modules.json").is_file() and not (tmp_path / "o-checkpoints").exists()


# ---------------------------------------------------------------------------------------- damaged checkpoints
@pytest.fixture
def three_checkpoints(workdir, tmp_path):
    """Checkpoints 2, 4 and 6 of an 8-step run stopped at step 6."""
    out = tmp_path / "o"
    Trainer(config(workdir, out, steps=8, stop_at=6, save_steps=2, save_total_limit=None)).train()
    found = list_checkpoints(tmp_path / "o-checkpoints")
    assert [c.name for c in found] == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    return out, found


def truncate(path, keep=40):
    path.write_bytes(path.read_bytes()[:keep])


def edit_state(checkpoint, **entries):
    """A trainer_state.json that is still valid JSON but holds damaged entries."""
    file = checkpoint / "trainer_state.json"
    file.write_text(json.dumps({**json.loads(file.read_text()), **entries}))


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda c: truncate(c / "optimizer.pt"), r"optimizer.pt is corrupt or truncated"),
        (lambda c: truncate(c / "rng_state.pt"), r"rng_state.pt is corrupt or truncated"),
        (lambda c: truncate(c / "scheduler.pt"), r"scheduler.pt is corrupt or truncated"),
        (lambda c: (c / "rng_state.pt").unlink(), r"rng_state.pt is missing"),
        (lambda c: truncate(c / "trainer_state.json"), r"trainer_state.json is not valid JSON"),
        (lambda c: (c / "trainer_state.json").write_text('{"step": "six"}'), r"'step' is 'six'"),
        (lambda c: edit_state(c, log_history=[{"step": 2}]), r"'log_history' holds"),
        (lambda c: edit_state(c, layer_counts={"a": 1}), r"'layer_counts' is"),
        (lambda c: edit_state(c, tasks={"epoch": "x", "position": 0, "streams": []}), r"'tasks' is"),
        (lambda c: edit_state(c, loss_windows=[["x"]]), r"'loss_windows' is"),
        (lambda c: truncate(c / "model" / "model.safetensors"), r"model"),
    ],
)
def test_damaged_checkpoint_is_one_clear_line(workdir, three_checkpoints, damage, message, capsys):
    out, found = three_checkpoints
    damage(found[-1])
    with pytest.raises(CorruptCheckpointError, match=message) as info:
        Trainer(config(workdir, out, steps=8, resume=str(found[-1]))).train()
    assert str(found[-1]) in str(info.value) and "\n" not in str(info.value)


def test_resume_latest_falls_back_to_the_newest_intact_checkpoint(workdir, tmp_path, three_checkpoints):
    out, found = three_checkpoints
    straight = Trainer(config(workdir, tmp_path / "straight", steps=8, save_steps=0))
    straight.train()
    truncate(found[-1] / "optimizer.pt")
    (found[-2] / "trainer_state.json").write_text("{not json")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = Trainer(
            config(workdir, out, steps=8, save_steps=2, save_total_limit=None, resume="latest")
        ).train()
    skipped = [str(w.message) for w in caught if "skipping a damaged checkpoint" in str(w.message)]
    assert len(skipped) == 2 and "checkpoint-6" in skipped[0] and "checkpoint-4" in skipped[1]
    assert result.step == 8
    # resumed exactly from checkpoint-2: the same weights as 8 steps in one go
    assert max_abs_diff(weights(out), weights(tmp_path / "straight")) <= 1e-6


def test_resume_latest_with_only_damaged_checkpoints_stops(workdir, three_checkpoints, capsys):
    out, found = three_checkpoints
    for checkpoint in found:
        truncate(checkpoint / "rng_state.pt")
    with (
        pytest.warns(UserWarning, match="skipping"),
        pytest.raises(CorruptCheckpointError, match="no intact"),
    ):
        Trainer(config(workdir, out, steps=8, resume="latest")).train()


def test_cli_damaged_checkpoint_exit_2(workdir, three_checkpoints, capsys):
    out, found = three_checkpoints
    truncate(found[-1] / "optimizer.pt")
    argv = ["train", "--model", str(workdir / "model"), "--train-data", str(workdir / "triplets.tsv")]
    argv += ["--output-dir", str(out), "--steps", "8", "--batch-size", "4", "--learning-rate", "1e-3"]
    assert main([*argv, "--save-steps", "0", "--resume", str(found[-1]), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "optimizer.pt is corrupt or truncated" in err


# ---------------------------------------------------------------------------------------- data, evaluation
def test_whitespace_only_training_text_names_row_and_column(workdir, tmp_path):
    data = tmp_path / "bad.tsv"
    data.write_text("anchor\tpositive\na cat\ta dog\nthe man\t  \n")
    with pytest.raises(DataFileError, match=r"bad.tsv, row 2: column 'positive' is only whitespace"):
        Trainer(config(workdir, tmp_path / "o", train_data=[str(data)])).train()


def test_evaluation_during_training_is_in_eval_mode(workdir, tmp_path):
    """Evaluating mid-run neither uses dropout nor changes the training (random states, train mode)."""
    sts = str(workdir / "sts.tsv")
    plain = Trainer(config(workdir, tmp_path / "plain", steps=6))
    plain.train()
    evaluated = Trainer(
        config(workdir, tmp_path / "eval", steps=6, eval_data=sts, eval_steps=2, eval_dims=[32])
    )
    result = evaluated.train()
    assert [e["step"] for e in evaluated.eval_history] == [2, 4, 6]
    assert max_abs_diff(weights(tmp_path / "plain"), weights(tmp_path / "eval")) == 0
    model = EmbeddingModel.load(tmp_path / "eval").eval()
    again = evaluate_sts(model, sts, result.evaluation["layers"], [32], show_progress=False)
    assert again.to_dict()["spearman"] == result.evaluation["spearman"]


def test_config_types_are_checked(workdir, tmp_path):
    with pytest.raises(InvalidInputError, match="'batch_size': expected an integer, got 2.5"):
        config(workdir, tmp_path, batch_size=2.5)
    cfg = config(workdir, tmp_path)
    cfg.batch_size = True
    with pytest.raises(InvalidInputError, match="option 'batch_size' must be an integer, got True"):
        Trainer(cfg)
    shutil.rmtree(tmp_path, ignore_errors=True)


def test_settings_that_would_train_nothing_or_crash_inside_torch_are_refused(workdir, tmp_path):
    with pytest.raises(InvalidInputError, match="batch_size 1: MultipleNegativesRankingLoss compares"):
        Trainer(config(workdir, tmp_path / "a", batch_size=1, columns=["anchor", "positive"])).train()
    with pytest.raises(
        InvalidInputError, match="max_seq_length=1000 is out of range: .* position embeddings"
    ):
        Trainer(config(workdir, tmp_path / "b", max_seq_length=1000)).train()
    with pytest.raises(InvalidInputError, match="'seed'"):
        config(workdir, tmp_path / "c", seed=2**32)
    with pytest.raises(InvalidInputError, match="schedule.*pairs"):
        config(workdir, tmp_path / "d", schedule=5)
    with pytest.raises(InvalidInputError, match="give 'dims' once"):
        Trainer(config(workdir, tmp_path / "e", dims=[16], wrapper_args={"dims": [32, 8]})).train()
    with pytest.raises(InvalidInputError, match="'label_column': the loss .* takes no labels"):
        Trainer(config(workdir, tmp_path / "f", label_column="score")).train()
    assert not any((tmp_path / name).exists() for name in "abcdef")


def test_settings_that_would_silently_train_something_else_are_refused(workdir, tmp_path):
    with pytest.raises(InvalidInputError, match="option 'dims' needs a wrapper"):
        Trainer(config(workdir, tmp_path / "a", wrapper="none", dims=[32, 16])).train()
    with pytest.raises(InvalidInputError, match="option 'wrapper_args' .* needs a wrapper"):
        Trainer(
            config(workdir, tmp_path / "b", wrapper="none", wrapper_args={"n_layers_per_step": 2})
        ).train()
    sts = [str(workdir / "sts.tsv")]  # scores 0..5
    with pytest.raises(InvalidInputError, match="CosineSimilarityLoss takes labels in -1..1 .* label_range"):
        Trainer(config(workdir, tmp_path / "c", train_data=sts, loss="cosine")).train()
    with pytest.raises(InvalidInputError, match="role names out of their order"):
        Trainer(config(workdir, tmp_path / "d", columns=["anchor", "negative", "positive"])).train()
    assert not any((tmp_path / name).exists() for name in "abcd")
    with pytest.warns(UserWarning, match="column 'score' is not used: the loss takes no labels"):
        Trainer(config(workdir, tmp_path / "e", train_data=sts, steps=1)).train()  # MNRL on scored pairs
    Trainer(
        config(workdir, tmp_path / "f", train_data=sts, loss="cosine", label_range=[0, 5], steps=1)
    ).train()


def test_a_resume_with_nothing_left_to_do_names_its_checkpoint(workdir, three_checkpoints):
    out, found = three_checkpoints  # stopped at step 6
    result = Trainer(config(workdir, out, steps=8, stop_at=4, resume="latest")).train()
    assert result.output_dir is None and result.step == 6 and result.checkpoint == found[-1]


def test_an_early_stop_reports_the_loss_since_the_last_log_entry(workdir, tmp_path):
    """stop_at no longer writes a log entry (the resumed run's log must be the uninterrupted one's), but the
    result still says the loss."""
    result = Trainer(config(workdir, tmp_path / "o", steps=8, stop_at=3, log_steps=10)).train()
    assert result.output_dir is None and result.loss is not None and result.loss > 0
