"""Tests of in-batch negatives gathered across processes (``gather_across_devices``) in matryoshka2d.losses.

The main test runs two gloo processes (torch.multiprocessing spawn, one file store, no network) on halves
of a batch and checks that the loss averaged over processes and the DDP-averaged gradients equal those
of one process on the whole batch (relative difference <= 1e-5), for the in-batch losses and the 2D
wrappers around them; and that without the option they do not.
"""

from __future__ import annotations

import datetime
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from matryoshka2d import losses
from matryoshka2d.errors import InvalidInputError
from matryoshka2d.losses import (
    AnglELoss,
    CoSENTLoss,
    Matryoshka2dLoss,
    MultipleNegativesRankingLoss,
    gather_columns,
)

WORLD, LOCAL_BATCH, NUM_LAYERS, HIDDEN, INPUT = 2, 4, 3, 8, 6


class ToyEncoder(nn.Module):
    """A stand-in for EmbeddingModel.forward: ``forward(x, layers) -> {k: (batch, HIDDEN)}`` (same init)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Linear(INPUT, HIDDEN)
        self.blocks = nn.ModuleList(nn.Linear(HIDDEN, HIDDEN) for _ in range(NUM_LAYERS))

    def forward(self, x: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
        h, out = self.embed(x), {}
        for k in range(max(layers) + 1):
            if k:
                h = h + torch.tanh(self.blocks[k - 1](h))
            if k in layers:
                out[k] = h
        return out


def make_loss(case: str, gather: bool) -> nn.Module:
    mnrl = MultipleNegativesRankingLoss(gather_across_devices=gather)
    if case == "mnrl":
        return mnrl
    if case == "mnrl_symmetric":
        return MultipleNegativesRankingLoss(symmetric=True, gather_across_devices=gather)
    if case == "cosent":
        return CoSENTLoss(gather_across_devices=gather)
    if case == "angle":
        return AnglELoss(gather_across_devices=gather)
    if case == "2d_all_pairs":  # sentence-transformers' KL term (per-row, so it averages exactly)
        return Matryoshka2dLoss.all_pairs(mnrl, [HIDDEN, 4], prior_layers_weight=2.0)
    if case == "2d_sampled":  # sampling: every process must use rank 0's plan
        return Matryoshka2dLoss(mnrl, [HIDDEN, 4, 2], n_dims_per_step=2, distillation="cosine")
    if case == "2d_cosent":
        return Matryoshka2dLoss.all_pairs(
            CoSENTLoss(gather_across_devices=gather), [HIDDEN, 4], distillation="mse"
        )
    raise AssertionError(case)


CASES = ["mnrl", "mnrl_symmetric", "cosent", "angle", "2d_all_pairs", "2d_sampled", "2d_cosent"]


def batch_data(case: str) -> tuple[list[torch.Tensor], torch.Tensor | None]:
    """The whole batch (WORLD * LOCAL_BATCH rows): input columns, labels for the scored-pair losses."""
    g = torch.Generator().manual_seed(CASES.index(case))
    pairs = case in ("cosent", "angle", "2d_cosent")
    anchors = torch.randn(WORLD * LOCAL_BATCH, INPUT, generator=g)
    positives = anchors + 0.5 * torch.randn(anchors.shape, generator=g)
    # hard negatives close to their anchors: a label pointing at them would change the loss a lot
    negatives = anchors + 0.3 * torch.randn(anchors.shape, generator=g)
    columns = [anchors, positives] if pairs else [anchors, positives, negatives]
    labels = torch.rand(WORLD * LOCAL_BATCH, generator=g) if pairs else None
    return columns, labels


def step(model: ToyEncoder, loss: nn.Module, columns, labels, seed: int) -> torch.Tensor:
    """One training step's loss value (backward done; gradients in model's parameters)."""
    torch.manual_seed(seed)
    layers = loss.layers_for_step(NUM_LAYERS)
    value = loss([model(x, layers) for x in columns], labels)
    value.backward()
    return value.detach()


def flat_grads(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def worker(rank: int, store: str, out: str) -> None:
    """One of WORLD gloo processes: every case on its share of the batch, DDP-style gradient averaging."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{store}",
        rank=rank,
        world_size=WORLD,
        timeout=datetime.timedelta(seconds=120),
    )
    results = {}
    try:
        for case in CASES:
            for gather in (True, False):
                columns, labels = batch_data(case)
                rows = slice(rank * LOCAL_BATCH, (rank + 1) * LOCAL_BATCH)
                model = ToyEncoder()
                # a different random state per process: sampled plans must still agree (rank 0's)
                value = step(
                    model,
                    make_loss(case, gather),
                    [x[rows] for x in columns],
                    None if labels is None else labels[rows],
                    seed=7 + 1000 * rank,
                )
                grads = flat_grads(model)
                dist.all_reduce(grads)  # what DDP does: the mean of the processes' gradients
                dist.all_reduce(value)
                results[(case, gather)] = (value / WORLD, grads / WORLD)
        if rank == 0:
            torch.save(results, out)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    import torch.multiprocessing as mp

    folder = tmp_path_factory.mktemp("gather")
    out = folder / "results.pt"
    mp.spawn(worker, args=(str(folder / "store"), str(out)), nprocs=WORLD, join=True)
    return torch.load(out)


def one_process(case: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference: one process (no process group) on the whole batch, rank 0's random state."""
    columns, labels = batch_data(case)
    model = ToyEncoder()
    value = step(model, make_loss(case, gather=True), columns, labels, seed=7)
    return value, flat_grads(model)


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("case", CASES)
def test_two_processes_equal_one_process_on_the_whole_batch(two_process_results, case):
    value, grads = one_process(case)
    gathered_value, gathered_grads = two_process_results[(case, True)]
    assert rel_diff(gathered_value, value) <= 1e-5
    assert rel_diff(gathered_grads, grads) <= 1e-5
    # without the option each process only sees its own half: a different loss and gradient
    local_value, local_grads = two_process_results[(case, False)]
    assert rel_diff(local_value, value) > 1e-3 or rel_diff(local_grads, grads) > 1e-3


# ---------------------------------------------------------------------------------------- one process
def test_gather_changes_nothing_without_a_process_group():
    torch.manual_seed(0)
    columns = [torch.randn(5, 8) for _ in range(3)]
    assert gather_columns(columns) == (columns, 0)
    plain = MultipleNegativesRankingLoss(symmetric=True).embedding_loss(columns, None)
    gathered = MultipleNegativesRankingLoss(symmetric=True, gather_across_devices=True).embedding_loss(
        columns, None
    )
    assert gathered.item() == plain.item()


def fake_rank_1(other_rank_columns):
    """Pretend to be rank 1 of 2: gather_columns puts ``other_rank_columns`` (rank 0's) first."""

    def gather(columns):
        return [torch.cat([o, c]) for o, c in zip(other_rank_columns, columns, strict=True)], len(columns[0])

    return gather


def test_labels_point_at_the_own_positive_never_at_a_hard_negative(monkeypatch):
    eye, s = torch.eye(8), 2.0
    # rank 0's rows: anchors/positives e0, e1, hard negatives e4, e5
    monkeypatch.setattr(losses, "gather_columns", fake_rank_1([eye[[0, 1]], eye[[0, 1]], eye[[4, 5]]]))
    loss = MultipleNegativesRankingLoss(scale=s, gather_across_devices=True)
    # this process (rank 1): anchors = positives = e2, e3; hard negatives e6, e7 -> 8 candidates, the
    # own positive (row 2 + i) scores s, the 7 others 0
    value = loss.embedding_loss([eye[[2, 3]], eye[[2, 3]], eye[[6, 7]]], None).item()
    assert value == pytest.approx(math.log(1 + 7 * math.exp(-s)))
    # a label at row i (rank 0's positive) would give log(e^s + 7); labels at the hard negatives likewise
    assert value < math.log(math.exp(s) + 7) - 1
    # hard negatives identical to the own positive are candidates, not labels: -log(e^s / (2 e^s + 6))
    value = loss.embedding_loss([eye[[2, 3]], eye[[2, 3]], eye[[2, 3]]], None).item()
    assert value == pytest.approx(math.log(2 + 6 * math.exp(-s)))


def test_symmetric_direction_uses_the_local_positives_against_every_anchor(monkeypatch):
    torch.manual_seed(0)
    other = [F.normalize(torch.randn(3, 8), dim=-1) for _ in range(2)]  # gathered rows come normalised
    local = [torch.randn(3, 8) for _ in range(2)]
    monkeypatch.setattr(losses, "gather_columns", fake_rank_1(other))
    value = MultipleNegativesRankingLoss(symmetric=True, gather_across_devices=True).embedding_loss(
        local, None
    )
    a_all = F.normalize(torch.cat([other[0], local[0]]), dim=-1)
    p_all = F.normalize(torch.cat([other[1], local[1]]), dim=-1)
    target = torch.arange(3, 6)
    forward = F.cross_entropy(20 * a_all[3:] @ p_all.T, target)
    backward = F.cross_entropy(20 * p_all[3:] @ a_all.T, target)
    assert value.item() == pytest.approx(((forward + backward) / 2).item(), rel=1e-6)


@pytest.mark.parametrize(
    "make",
    [
        lambda: MultipleNegativesRankingLoss(gather_across_devices=1),
        lambda: MultipleNegativesRankingLoss(gather_across_devices="yes"),
        lambda: CoSENTLoss(gather_across_devices=None),
    ],
)
def test_gather_option_must_be_a_bool(make):
    with pytest.raises(InvalidInputError, match="gather_across_devices must be True or False"):
        make()


def test_gather_option_in_config_and_from_a_training_config(tmp_path):
    """``loss_args: {gather_across_devices: true}`` reaches the base loss through build_loss."""
    from types import SimpleNamespace

    from matryoshka2d.training import TrainConfig, build_loss

    cfg = TrainConfig.from_dict(
        {
            "model": "unused",
            "train_data": ["unused.tsv"],
            "output_dir": str(tmp_path),
            "loss_args": {"gather_across_devices": True},
            "wrapper": "Matryoshka2dLoss",
            "dims": [HIDDEN, 4],
        }
    )
    loss = build_loss(cfg, SimpleNamespace(dim=HIDDEN, num_layers=NUM_LAYERS))
    assert loss.base.gather_across_devices is True
    assert loss.config()["base"]["gather_across_devices"] is True


def test_training_under_torchrun_with_gathered_negatives(tiny_model_dirs, tmp_path):
    """End to end: 2 gloo processes, 2DMSE sampling (plans shared from rank 0), loss_args from flags."""
    import json
    import os
    import random
    import subprocess
    import sys
    from pathlib import Path

    words = "a the cat dog sat on mat man woman is playing guitar park red blue big small".split()
    rng = random.Random(0)
    lines = ["anchor\tpositive\tnegative"]
    for _ in range(24):
        anchor = " ".join(rng.choice(words) for _ in range(5))
        lines.append(
            f"{anchor}\t{anchor} {rng.choice(words)}\t{' '.join(rng.choice(words) for _ in range(5))}"
        )
    data = tmp_path / "triplets.tsv"
    data.write_text("\n".join(lines) + "\n")
    out = tmp_path / "model"
    src = Path(__file__).resolve().parents[1] / "src"
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "matryoshka2d.cli", "train", "--model", str(tiny_model_dirs["bert"]), "--train-data", str(data),
        "--output-dir", str(out), "--batch-size", "4", "--steps", "3", "--save-steps", "0", "--no-progress",
        "--wrapper", "Matryoshka2dLoss", "--dims", "32,8",
        "--loss-args", '{"gather_across_devices": true}',
        "--wrapper-args", '{"distillation": "relational"}',
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 2 process(es)" in result.stderr
    saved = json.loads((out / "matryoshka2d.json").read_text())
    text = json.dumps(saved)
    assert '"gather_across_devices": true' in text and '"distillation": "relational"' in text
