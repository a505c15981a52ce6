"""The demo end to end on a tiny model and tiny data: trains, evaluates, reports, and resumes from cache."""

from __future__ import annotations

import json

from conftest import SENTENCES

from matryoshka2d.demo.experiment import run_demo
from matryoshka2d.model import resolve_dtype


def write_tiny_data(root):
    (root / "stsb").mkdir(parents=True)
    (root / "snli").mkdir()
    sts = ["sentence1\tsentence2\tscore"]
    for i, (a, b) in enumerate(zip(SENTENCES, SENTENCES[1:] + SENTENCES[:1])):
        sts += [f"{a}\t{b}\t{i % 5}", f"{a}\t{a} outside\t{4 + (i % 2) * 0.5}"]
    for split in ("train", "test", "validation"):
        (root / "stsb" / f"{split}.tsv").write_text("\n".join(sts) + "\n")
    rows = ["anchor\tpositive\tnegative"]
    rows += [f"{a}\t{a} with a dog\t{b}" for a, b in zip(SENTENCES, SENTENCES[3:] + SENTENCES[:3])]
    for split in ("validation", "test"):
        (root / "snli" / f"triplet-{split}.tsv").write_text("\n".join(rows) + "\n")


def test_demo_end_to_end_and_cached_rerun(tiny_model_dir, tmp_path, capsys):
    write_tiny_data(tmp_path / "data")
    kwargs = dict(
        base_model=str(tiny_model_dir),
        data_root=tmp_path / "data",
        dims=[32, 16, 8],
        speed_texts=8,
        common={"batch_size": 4, "save_steps": 3, "learning_rate": 1e-3, "epochs": 1},
    )
    report = run_demo(tmp_path / "out", tmp_path / "work", **kwargs)
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert list(results["models"]) == ["untouched", "plain_mnrl", "2dmse", "recommended", "rotated"]
    for key, entry in results["models"].items():
        assert entry["grid"]["layers"] == [1, 2, 3, 4] and entry["grid"]["dims"] == [32, 16, 8]
        assert len(entry["validation_grid"]["spearman"]) == 4
        assert entry["speed"]["layers"] == [1, 2, 3, 4]
        # speed in the "auto" dtype (bf16 on a CPU with native bf16), grids in float32
        assert entry["speed"]["dtype"] == str(resolve_dtype("auto")).removeprefix("torch.")
        assert (entry["training_time_s"] is None) == (key == "untouched")
        if key != "untouched":  # every run trains on the same two tasks: SNLI triplets and STSB train pairs
            (task,) = entry["settings"]["extra_tasks"]
            assert task["loss"] == "cosent"
            assert task["train_data"] == str(tmp_path / "data" / "stsb" / "train.tsv")
    trained = results["models"]["recommended"]["grid"]["spearman"]
    assert trained != results["models"]["untouched"]["grid"]["spearman"]  # training changed the model
    assert "matryoshka2d recipe (c)" in report.read_text()
    # (d) = (c) with its earlier exits rotated: the last layer's row is (c)'s, the earlier small dims differ
    rotated, recommended = results["models"]["rotated"], results["models"]["recommended"]
    assert rotated["settings"] == recommended["settings"]
    assert rotated["training_time_s"] > recommended["training_time_s"]
    for which in ("grid", "validation_grid"):
        ours, theirs = rotated[which]["spearman"], recommended[which]["spearman"]
        assert ours[-1] == theirs[-1]
        assert all(abs(a[-1] - b[-1]) > 1e-9 for a, b in zip(ours[:-1], theirs[:-1]))  # 8 of 32 dims
        assert all(abs(a[0] - b[0]) < 1e-6 for a, b in zip(ours, theirs))  # full size: a rotation
    assert "exit rotations (d)" in results["setup"]
    assert "batch 4, 1 epoch of both, lr 0.001, 10% warmup, seed 42" in results["setup"]["training"]
    assert len(list((tmp_path / "out").glob("heatmap_*.png"))) == 5
    capsys.readouterr()

    # everything comes from the cache now; the report folder is the demo's own, replaced with overwrite
    run_demo(tmp_path / "out", tmp_path / "work", overwrite=True, **kwargs)
    assert capsys.readouterr().out.count("cached in") == 5
    again = json.loads((tmp_path / "out" / "results.json").read_text())
    assert again["models"] == results["models"]
    assert "grids in float32" in again["setup"]["speed"]


def test_training_time_of_a_resumed_run_is_the_whole_runs(tmp_path, monkeypatch):
    """A demo run interrupted and resumed used to record only the resumed part's seconds."""
    import types

    import matryoshka2d.training.trainer as trainer_module
    from matryoshka2d.demo import experiment

    class FakeTrainer:
        def __init__(self, config):
            self.checkpoint_dir = tmp_path / "ck"

        def train(self):
            experiment.time.sleep(0.05)
            return types.SimpleNamespace(step=8, steps_per_second=2.0)  # 2 steps ran here

    (tmp_path / "ck" / "checkpoint-6").mkdir(parents=True)
    (tmp_path / "ck" / "checkpoint-6" / "trainer_state.json").write_text("{}")
    monkeypatch.setattr(trainer_module, "Trainer", FakeTrainer)
    _, seconds = experiment.train({}, "base", tmp_path / "data", tmp_path / "work")
    timing = json.loads(next((tmp_path / "work").glob("*.train.json")).read_text())
    # the 6 earlier steps at this run's training pace (3 s), plus this run's own time (set-up counted once)
    assert timing["resumed_at_step"] == 6 and seconds == timing["training_time_s"]
    assert 3.05 <= seconds < 4
