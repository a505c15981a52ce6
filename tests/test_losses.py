"""Tests of matryoshka2d.losses: base losses, wrappers, sampling, validation, and parity with
sentence-transformers (same weights, sampling disabled: equal values and gradients)."""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F

from matryoshka2d import losses
from matryoshka2d.errors import InvalidDimError, InvalidInputError, InvalidLayersError
from matryoshka2d.losses import (
    AdaptiveLayerLoss,
    AnglELoss,
    CoSENTLoss,
    CosineSimilarityLoss,
    Matryoshka2dLoss,
    MatryoshkaLoss,
    MultipleNegativesRankingLoss,
)

WORDS = "a the man woman dog cat is playing sat on mat park red blue big small ball eating food".split()
NUM_LAYERS, HIDDEN = 4, 32


# ---------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def model_dir(tiny_model_dirs):
    """The tiny random BERT of conftest (4 layers, hidden 32), saved in the sentence-transformers layout."""
    return tiny_model_dirs["bert"]


@pytest.fixture(scope="module")
def ours(model_dir):
    from matryoshka2d import EmbeddingModel

    return EmbeddingModel.load(model_dir).eval()  # eval: no dropout, so both sides are deterministic


@pytest.fixture(scope="module")
def st_model(model_dir):
    import sentence_transformers as st  # a dev dependency: never skipped

    return st.SentenceTransformer(str(model_dir), device="cpu").eval()


@pytest.fixture(scope="module")
def columns():
    rng = random.Random(0)
    return [
        [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 8))) for _ in range(6)] for _ in range(3)
    ]


def run_ours(model, loss, columns, labels=None):
    """One training-step loss of our model + loss: value and gradients by parameter name."""
    model.zero_grad()
    layers = loss.layers_for_step(model.num_layers)
    outputs = [model(model.tokenize(texts), layers=layers) for texts in columns]
    value = loss(outputs, labels)
    value.backward()
    return value.item(), {
        n: p.grad.clone() for n, p in model.transformer.named_parameters() if p.grad is not None
    }


def run_st(model, loss, columns, labels=None):
    """The same with sentence-transformers' model and loss (its own forward)."""
    model.zero_grad()
    value = loss([model.tokenize(texts) for texts in columns], labels)
    value.backward()
    grads = {n: p.grad.clone() for n, p in model[0].auto_model.named_parameters() if p.grad is not None}
    return value.item(), grads


def assert_same(a, b):
    (value_a, grads_a), (value_b, grads_b) = a, b
    assert value_a == pytest.approx(value_b, rel=1e-5)
    assert set(grads_a) == set(grads_b) and grads_a
    flat_a = torch.cat([grads_a[k].flatten() for k in sorted(grads_a)]).double()
    flat_b = torch.cat([grads_b[k].flatten() for k in sorted(grads_b)]).double()
    assert F.cosine_similarity(flat_a, flat_b, dim=0).item() >= 0.9999


def fake_outputs(batch=5, columns=3, num_layers=NUM_LAYERS, hidden=HIDDEN, seed=0, grad=False):
    """Random per-layer embeddings for all layers 0..num_layers, like EmbeddingModel.forward returns."""
    g = torch.Generator().manual_seed(seed)
    return [
        {k: torch.randn(batch, hidden, generator=g).requires_grad_(grad) for k in range(num_layers + 1)}
        for _ in range(columns)
    ]


# ---------------------------------------------------------------------------------------- parity
def test_matryoshka_loss_matches_sentence_transformers(ours, st_model, columns):
    from sentence_transformers.sentence_transformer import losses as st

    dims, weights = [32, 16, 8], [1.0, 2.0, 0.5]
    mine = MatryoshkaLoss(MultipleNegativesRankingLoss(), dims, weights)
    theirs = st.MatryoshkaLoss(st_model, st.MultipleNegativesRankingLoss(st_model), dims, weights)
    assert_same(run_ours(ours, mine, columns), run_st(st_model, theirs, columns))


@pytest.mark.parametrize("layer_weighting", ["uniform", "log", "linear"])
def test_adaptive_layer_loss_matches_sentence_transformers(ours, st_model, columns, layer_weighting):
    from sentence_transformers.sentence_transformer import losses as st

    options = dict(
        n_layers_per_step=-1,
        last_layer_weight=1.3,
        prior_layers_weight=0.7,
        kl_div_weight=0.5,
        kl_temperature=0.3,
        layer_weighting=layer_weighting,
    )
    mine = AdaptiveLayerLoss(MultipleNegativesRankingLoss(), include_embedding_layer=True, **options)
    theirs = st.AdaptiveLayerLoss(st_model, st.MultipleNegativesRankingLoss(st_model), **options)
    assert_same(run_ours(ours, mine, columns), run_st(st_model, theirs, columns))


@pytest.mark.parametrize("base", ["mnrl", "cosent"])
def test_matryoshka2d_loss_matches_sentence_transformers(ours, st_model, columns, base):
    from sentence_transformers.sentence_transformer import losses as st

    dims, weights = [32, 16, 8], [1.0, 0.5, 0.25]
    if base == "mnrl":
        mine_base, their_base, labels = (
            MultipleNegativesRankingLoss(),
            st.MultipleNegativesRankingLoss(st_model),
            None,
        )
    else:
        columns = columns[:2]
        mine_base, their_base = CoSENTLoss(), st.CoSENTLoss(st_model)
        labels = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.7, 0.2])
    mine = Matryoshka2dLoss.all_pairs(mine_base, dims, weights=weights, include_embedding_layer=True)
    theirs = st.Matryoshka2dLoss(
        st_model, their_base, dims, weights, n_layers_per_step=-1, n_dims_per_step=-1, kl_temperature=0.3
    )
    assert_same(run_ours(ours, mine, columns, labels), run_st(st_model, theirs, columns, labels))


@pytest.mark.parametrize(
    "name, mine, options",
    [
        ("MultipleNegativesRankingLoss", MultipleNegativesRankingLoss(scale=10.0), {"scale": 10.0}),
        (
            "MultipleNegativesRankingLoss",
            MultipleNegativesRankingLoss(symmetric=True),
            {"directions": ("query_to_doc", "doc_to_query"), "partition_mode": "per_direction"},
        ),
        ("CoSENTLoss", CoSENTLoss(), {}),
        ("AnglELoss", AnglELoss(), {}),
        ("CosineSimilarityLoss", CosineSimilarityLoss(), {}),
    ],
)
@pytest.mark.parametrize("dim", [16, 7])
def test_base_losses_match_sentence_transformers(name, mine, options, dim):
    from sentence_transformers.sentence_transformer import losses as st

    theirs = getattr(st, name)(model=None, **options)
    torch.manual_seed(1)
    n_columns = 3 if name == "MultipleNegativesRankingLoss" and not mine.symmetric else 2
    embeddings = [torch.randn(8, dim) for _ in range(n_columns)]
    labels = torch.tensor([0.0, 0.2, 0.2, 0.4, 0.5, 0.9, 1.0, 0.1]) if mine.needs_labels else None
    expected = theirs.compute_loss_from_embeddings(embeddings, labels)
    assert mine.embedding_loss(embeddings, labels).item() == pytest.approx(expected.item(), rel=1e-5)


# ---------------------------------------------------------------------------------------- base losses
def test_mnrl_known_values():
    eye = torch.eye(4)
    loss = MultipleNegativesRankingLoss(scale=2.0)
    # each anchor equals its positive and is orthogonal to the others: -log(e^2 / (e^2 + 3 e^0))
    assert loss.embedding_loss([eye, 5 * eye], None).item() == pytest.approx(math.log(1 + 3 * math.exp(-2)))
    # a hard negative identical to the positive: -log(e^2 / (2 e^2 + 6))
    assert loss.embedding_loss([eye, eye, eye], None).item() == pytest.approx(math.log(2 + 6 * math.exp(-2)))
    # swapped positives: every anchor's own positive is orthogonal, a wrong one identical
    swapped = eye[[1, 0, 3, 2]]
    assert loss.embedding_loss([eye, swapped], None).item() == pytest.approx(math.log(math.exp(2) + 3))


def test_mnrl_symmetric_averages_both_directions():
    torch.manual_seed(0)
    a, p = torch.randn(5, 8), torch.randn(5, 8)
    s = 20 * F.normalize(a, dim=-1) @ F.normalize(p, dim=-1).T
    target = torch.arange(5)
    expected = (F.cross_entropy(s, target) + F.cross_entropy(s.T, target)) / 2
    value = MultipleNegativesRankingLoss(symmetric=True).embedding_loss([a, p], None)
    assert value.item() == pytest.approx(expected.item(), rel=1e-6)


def test_cosent_known_values():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # cos = 1 for pair 0, 0 for pair 1
    loss = CoSENTLoss(scale=20.0)
    right_order = loss.embedding_loss([a, b], torch.tensor([1.0, 0.0])).item()
    wrong_order = loss.embedding_loss([a, b], torch.tensor([0.0, 1.0])).item()
    assert right_order == pytest.approx(math.log(1 + math.exp(-20)), abs=1e-7)
    assert wrong_order == pytest.approx(math.log(1 + math.exp(20)), rel=1e-6)
    assert loss.embedding_loss([a, b], torch.tensor([3.0, 3.0])).item() == 0.0  # ties: no pair to rank


def test_angle_similarity_of_known_vectors():
    x = torch.tensor([[1.0, 0.0]])  # as complex numbers: 1 and i
    y = torch.tensor([[0.0, 1.0]])
    assert AnglELoss().similarity(x, x).item() == pytest.approx(1.0)
    assert AnglELoss().similarity(x, y).item() == pytest.approx(1.0)  # |cos + sin| = |0 - 1|
    assert AnglELoss().similarity(x, -x).item() == pytest.approx(1.0)  # |-1 + 0|


def test_cosine_similarity_loss_is_mse_of_cosines():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    b = torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    value = CosineSimilarityLoss().embedding_loss([a, b], torch.tensor([0.5, 0.5]))
    assert value.item() == pytest.approx(0.25)


def test_base_loss_forward_uses_the_deepest_layer():
    outputs = fake_outputs()
    loss = MultipleNegativesRankingLoss()
    assert loss.layers_for_step(NUM_LAYERS) == [NUM_LAYERS]
    expected = loss.embedding_loss([out[NUM_LAYERS] for out in outputs], None)
    assert loss(outputs, None).item() == pytest.approx(expected.item())


@pytest.mark.parametrize(
    "call, error, match",
    [
        (
            lambda: MultipleNegativesRankingLoss().embedding_loss([torch.randn(3, 4)], None),
            InvalidInputError,
            "at least 2",
        ),
        (
            lambda: CoSENTLoss().embedding_loss([torch.randn(3, 4)] * 3, torch.ones(3)),
            InvalidInputError,
            "exactly 2",
        ),
        (
            lambda: CoSENTLoss().embedding_loss([torch.randn(3, 4)] * 2, None),
            InvalidInputError,
            "labels=None",
        ),
        (
            lambda: CosineSimilarityLoss().embedding_loss([torch.randn(3, 4)] * 2, torch.ones(4)),
            InvalidInputError,
            "one label",
        ),
        (
            lambda: MultipleNegativesRankingLoss().embedding_loss(
                [torch.randn(3, 4), torch.randn(2, 4)], None
            ),
            InvalidInputError,
            "shape",
        ),
        (lambda: MultipleNegativesRankingLoss(scale=0), InvalidInputError, "scale"),
        (lambda: CoSENTLoss(scale=float("nan")), InvalidInputError, "scale"),
        (lambda: MultipleNegativesRankingLoss().layers_for_step(0), InvalidLayersError, "num_layers"),
        (lambda: MultipleNegativesRankingLoss()([], None), InvalidInputError, "outputs"),
    ],
)
def test_base_loss_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()


def test_flags_and_config():
    mnrl, cosent = MultipleNegativesRankingLoss(symmetric=True), CoSENTLoss()
    assert (mnrl.needs_labels, mnrl.in_batch_negatives) == (False, True)
    for loss in (cosent, AnglELoss(), CosineSimilarityLoss()):
        assert (loss.needs_labels, loss.in_batch_negatives) == (True, False)
    for wrapper in (
        MatryoshkaLoss(cosent, [32, 8]),
        AdaptiveLayerLoss(cosent),
        Matryoshka2dLoss(cosent, [32, 8]),
        Matryoshka2dLoss(mnrl, schedule=[(2, 8), (4, 32)]),
    ):
        assert wrapper.needs_labels is wrapper.base.needs_labels
        assert wrapper.in_batch_negatives is wrapper.base.in_batch_negatives
        config = json.loads(json.dumps(wrapper.config()))
        assert (
            config["name"] == type(wrapper).__name__ and config["base"]["name"] == type(wrapper.base).__name__
        )
    config = Matryoshka2dLoss(mnrl, schedule=[(2, 8), (4, 32)]).config()
    assert config["schedule"] == [[2, 8], [4, 32]] and config["base"] == {
        "name": "MultipleNegativesRankingLoss",
        "scale": 20.0,
        "symmetric": True,
        "gather_across_devices": False,
    }
    assert config["distillation"] == "kl_logits" and config["dim_distillation"] is None
    assert Matryoshka2dLoss(mnrl, [8, 32], weights=[1, 2]).config()["dims"] == [32, 8]  # largest first
    assert Matryoshka2dLoss(mnrl, [8, 32], weights=[1, 2]).config()["weights"] == [2.0, 1.0]


# ---------------------------------------------------------------------------------------- wrappers
def manual_term(base, outputs, layer, dim, labels=None):
    return base.embedding_loss([F.normalize(out[layer][:, :dim], dim=-1) for out in outputs], labels)


def manual_kl(outputs, layer, last, t):
    def logits(k):
        return torch.cat([F.normalize(out[k], dim=-1) for out in outputs]) / t

    return F.kl_div(F.log_softmax(logits(layer), -1), F.softmax(logits(last), -1), reduction="batchmean") * t


def test_schedule_trains_exactly_its_pairs():
    base = MultipleNegativesRankingLoss()
    schedule = [(1, 8), (2, 16), (4, 32)]
    loss = Matryoshka2dLoss(
        base, schedule=schedule, weights=[1.0, 2.0, 3.0], last_layer_weight=0.5, kl_div_weight=0.1
    )
    assert loss.layers_for_step(NUM_LAYERS) == [1, 2, 4]
    outputs = fake_outputs()
    expected = (
        1.0 * manual_term(base, outputs, 1, 8)
        + 2.0 * manual_term(base, outputs, 2, 16)
        + 3.0 * 0.5 * manual_term(base, outputs, 4, 32)
        + 0.1 * (manual_kl(outputs, 1, 4, 0.3) + manual_kl(outputs, 2, 4, 0.3))
    )
    assert loss(outputs, None).item() == pytest.approx(expected.item(), rel=1e-6)
    # the plan is the same every step: no sampling
    plans = {tuple(map(tuple, loss.plan(NUM_LAYERS).terms)) for _ in range(5)}
    assert len(plans) == 1


def test_schedule_without_last_layer_still_computes_the_kl_teacher():
    loss = Matryoshka2dLoss(MultipleNegativesRankingLoss(), schedule=[(2, 16)])
    assert loss.layers_for_step(NUM_LAYERS) == [2, NUM_LAYERS]
    base = MultipleNegativesRankingLoss()
    loss = Matryoshka2dLoss(base, schedule=[(2, 16)], kl_temperature=0, prior_layers_weight=0.5)
    assert loss.layers_for_step(NUM_LAYERS) == [2]
    outputs = [{2: out[2]} for out in fake_outputs()]
    expected = 0.5 * manual_term(base, outputs, 2, 16)
    assert loss(outputs, None).item() == pytest.approx(expected.item(), rel=1e-6)


def test_sampled_2d_value_matches_its_plan():
    base = MultipleNegativesRankingLoss()
    loss = Matryoshka2dLoss(
        base, [32, 16, 8], weights=[1.0, 2.0, 4.0], layer_weighting="linear", kl_div_weight=2.0
    )
    torch.manual_seed(3)
    layers = loss.layers_for_step(NUM_LAYERS)
    plan = loss._pending
    (k,) = [layer for layer in layers if layer != NUM_LAYERS]
    (last_dim,) = [d for layer, d, _ in plan.terms if layer == NUM_LAYERS]
    (prior_dim,) = [d for layer, d, _ in plan.terms if layer == k]
    weight = dict(zip([32, 16, 8], [1.0, 2.0, 4.0], strict=True))
    outputs = fake_outputs()
    expected = (
        weight[last_dim] * manual_term(base, outputs, NUM_LAYERS, last_dim)
        + weight[prior_dim] / (1 + k) * manual_term(base, outputs, k, prior_dim)
        + 2.0 * manual_kl(outputs, k, NUM_LAYERS, 0.3)
    )
    assert loss(outputs, None).item() == pytest.approx(expected.item(), rel=1e-6)


def test_2dmse_defaults_sample_one_prior_layer_and_one_dim_per_layer():
    loss = Matryoshka2dLoss(MultipleNegativesRankingLoss(), [32, 16, 8])
    torch.manual_seed(0)
    seen_layers, seen_dims = set(), set()
    for _ in range(60):
        layers = loss.layers_for_step(NUM_LAYERS)
        assert len(layers) == 2 and layers[-1] == NUM_LAYERS and 1 <= layers[0] < NUM_LAYERS
        terms = loss._pending.terms
        assert sorted(layer for layer, _, _ in terms) == layers  # one dim per trained layer
        seen_layers.add(layers[0])
        seen_dims.update(d for _, d, _ in terms)
    assert seen_layers == {1, 2, 3}  # layer 0 only with include_embedding_layer
    assert seen_dims == {32, 16, 8}


def test_include_embedding_layer_samples_layer_0():
    assert losses.INCLUDE_EMBEDDING_LAYER is False
    loss = AdaptiveLayerLoss(MultipleNegativesRankingLoss(), include_embedding_layer=True)
    torch.manual_seed(0)
    seen = {loss.layers_for_step(NUM_LAYERS)[0] for _ in range(60)}
    assert seen == {0, 1, 2, 3}
    assert AdaptiveLayerLoss(MultipleNegativesRankingLoss(), n_layers_per_step=-1).layers_for_step(4) == [
        1,
        2,
        3,
        4,
    ]


def test_sampling_is_reproducible_with_torch_seed():
    loss = Matryoshka2dLoss(
        MultipleNegativesRankingLoss(), [32, 16, 8, 4], n_layers_per_step=2, n_dims_per_step=2
    )

    def plans(seed):
        torch.manual_seed(seed)
        out = []
        for _ in range(20):
            loss.layers_for_step(NUM_LAYERS)
            out.append(loss._pending.terms)
        return out

    assert plans(7) == plans(7)
    assert plans(7) != plans(8)
    for terms in plans(7):
        layers = [layer for layer, _, _ in terms]
        assert len(set(layers)) == 3 and all(layers.count(k) == 2 for k in set(layers))


def test_all_pairs_trains_every_layer_and_dim():
    loss = Matryoshka2dLoss.all_pairs(MultipleNegativesRankingLoss(), [32, 8])
    assert loss.layers_for_step(NUM_LAYERS) == [1, 2, 3, 4]
    assert {(k, d) for k, d, _ in loss._pending.terms} == {(k, d) for k in (1, 2, 3, 4) for d in (32, 8)}
    loss = MatryoshkaLoss(MultipleNegativesRankingLoss(), [32, 16, 8], n_dims_per_step=2)
    torch.manual_seed(0)
    assert loss.layers_for_step(NUM_LAYERS) == [NUM_LAYERS]
    assert len(loss._pending.terms) == 2


def test_forward_consumes_the_plan_and_plans_itself_when_called_alone():
    loss = AdaptiveLayerLoss(MultipleNegativesRankingLoss())
    torch.manual_seed(0)
    layers = loss.layers_for_step(NUM_LAYERS)
    partial = [{k: out[k] for k in layers} for out in fake_outputs()]
    loss(partial, None)
    assert loss._pending is None
    # without a pending plan it samples from the layers it is given (deepest = last layer)
    assert torch.isfinite(loss(fake_outputs(), None))
    # a partial output without a matching plan: a clear error, not a KeyError
    with pytest.raises(InvalidLayersError, match="layers_for_step"):
        for _ in range(20):
            loss([{NUM_LAYERS: out[NUM_LAYERS]} for out in fake_outputs()], None)


def test_kl_teacher_is_detached():
    loss = AdaptiveLayerLoss(
        MultipleNegativesRankingLoss(), n_layers_per_step=-1, last_layer_weight=0, prior_layers_weight=0
    )
    outputs = fake_outputs(grad=True)
    loss.layers_for_step(NUM_LAYERS)
    loss(outputs, None).backward()
    # the task terms have weight 0, so only the KL term is left; its teacher (the last layer) is detached
    assert all(not out[NUM_LAYERS].grad.any() for out in outputs)
    assert all(out[k].grad.abs().sum() > 0 for out in outputs for k in (1, 2, 3))


def test_gradients_flow_through_every_trained_pair():
    loss = Matryoshka2dLoss.all_pairs(MultipleNegativesRankingLoss(), [32, 8], kl_temperature=0)
    outputs = fake_outputs(grad=True)
    loss.layers_for_step(NUM_LAYERS)
    loss(outputs, None).backward()
    for out in outputs:
        assert out[0].grad is None
        for k in (1, 2, 3, 4):
            assert out[k].grad[:, :8].abs().sum() > 0 and out[k].grad[:, 8:].abs().sum() > 0


def test_dims_above_the_model_size():
    loss = Matryoshka2dLoss(MultipleNegativesRankingLoss(), [64, 32])
    loss.layers_for_step(NUM_LAYERS)
    with pytest.raises(InvalidDimError, match="64"):
        loss(fake_outputs(hidden=32), None)

    class Model:
        num_layers, dim = NUM_LAYERS, 32

    with pytest.raises(InvalidDimError, match=r"\[64\].*32"):
        loss.check_model(Model())
    with pytest.warns(UserWarning, match="full size 32"):
        MatryoshkaLoss(MultipleNegativesRankingLoss(), [16, 8]).check_model(Model())
    with pytest.raises(InvalidLayersError, match=r"\(6, 8\)"):
        Matryoshka2dLoss(MultipleNegativesRankingLoss(), schedule=[(2, 8), (6, 8)]).check_model(Model())
    with pytest.raises(InvalidLayersError, match="0..4"):
        Matryoshka2dLoss(MultipleNegativesRankingLoss(), schedule=[(2, 8), (6, 8)]).layers_for_step(
            NUM_LAYERS
        )
    AdaptiveLayerLoss(CoSENTLoss()).check_model(Model())  # nothing to complain about


MNRL = MultipleNegativesRankingLoss()


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: MatryoshkaLoss(MNRL, []), InvalidDimError, "non-empty"),
        (lambda: MatryoshkaLoss(MNRL, 64), InvalidDimError, "list"),
        (lambda: MatryoshkaLoss(MNRL, [64, 0]), InvalidDimError, "positive"),
        (lambda: MatryoshkaLoss(MNRL, [64, 32.5]), InvalidDimError, "positive integer"),
        (lambda: MatryoshkaLoss(MNRL, [64, 64]), InvalidDimError, "duplicates"),
        (lambda: MatryoshkaLoss(MNRL, [64, 32], weights=[1]), InvalidInputError, "2 numbers"),
        (lambda: MatryoshkaLoss(MNRL, [64, 32], weights=[1, -1]), InvalidInputError, "weights"),
        (lambda: MatryoshkaLoss(MNRL, [64], n_dims_per_step=0), InvalidInputError, "n_dims_per_step"),
        (lambda: MatryoshkaLoss("mnrl", [64]), InvalidInputError, "base loss"),
        (lambda: AdaptiveLayerLoss(MNRL, n_layers_per_step=-2), InvalidInputError, "n_layers_per_step"),
        (lambda: AdaptiveLayerLoss(MNRL, layer_weighting="cubic"), InvalidInputError, "uniform"),
        (lambda: AdaptiveLayerLoss(MNRL, kl_temperature=-1), InvalidInputError, "kl_temperature"),
        (
            lambda: AdaptiveLayerLoss(MNRL, last_layer_weight=float("inf")),
            InvalidInputError,
            "last_layer_weight",
        ),
        (lambda: AdaptiveLayerLoss(MNRL, include_embedding_layer=1), InvalidInputError, "True or False"),
        (lambda: Matryoshka2dLoss(MNRL), InvalidDimError, "dims"),
        (lambda: Matryoshka2dLoss(MNRL, [64], n_layers_per_step=0), InvalidInputError, "n_layers_per_step"),
        (lambda: Matryoshka2dLoss(MNRL, [64], schedule=[(2, 64)]), InvalidInputError, "schedule"),
        (lambda: Matryoshka2dLoss(MNRL, schedule=[]), InvalidInputError, "non-empty"),
        (lambda: Matryoshka2dLoss(MNRL, schedule=[(2, 64, 1)]), InvalidInputError, "pair"),
        (lambda: Matryoshka2dLoss(MNRL, schedule=[(-1, 64)]), InvalidLayersError, ">= 0"),
        (lambda: Matryoshka2dLoss(MNRL, schedule=[(2, 0)]), InvalidDimError, "dim"),
        (lambda: Matryoshka2dLoss(MNRL, schedule=[(2, 8), (2, 8)]), InvalidInputError, "duplicate"),
        (
            lambda: Matryoshka2dLoss(MNRL, schedule=[(2, 8), (4, 8)], weights=[1]),
            InvalidInputError,
            "schedule pair",
        ),
    ],
)
def test_wrapper_option_errors(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_one_layer_model_has_no_prior_layers():
    loss = Matryoshka2dLoss(MultipleNegativesRankingLoss(), [32, 8])
    assert loss.layers_for_step(1) == [1]
    assert torch.isfinite(loss(fake_outputs(num_layers=1), None))


# ---------------------------------------------------------------------------------------- distillation
def off_diagonal_cosines(x):
    """Each row's cosine similarity to every other row, (n, n - 1) (written independently of losses.py)."""
    n = x.shape[0]
    sims = F.cosine_similarity(x[:, None, :], x[None, :, :], dim=-1)
    return torch.stack([torch.cat([sims[i, :i], sims[i, i + 1 :]]) for i in range(n)])


def manual_relational(student, teacher, t):
    p = F.softmax(off_diagonal_cosines(teacher) / t, dim=-1)
    q = F.softmax(off_diagonal_cosines(student) / t, dim=-1)
    return (p * (p.log() - q.log())).sum(-1).mean()


def test_relational_distillation_of_a_hand_checkable_example():
    e0, e1 = [1.0, 0.0], [0.0, 1.0]
    teacher, student = torch.tensor([e0, e0, e1]), torch.tensor([e0, e1, e1])
    # cosines to the other two rows: teacher [1, 0], [1, 0], [0, 0]; student [0, 0], [0, 1], [0, 1]
    sig = 1 / (1 + math.exp(-1))  # softmax([1, 0]) = [sig, 1 - sig] at T = 1
    row0 = sig * math.log(2 * sig) + (1 - sig) * math.log(2 * (1 - sig))  # KL([sig, 1-sig] || uniform)
    row1 = (2 * sig - 1) * math.log(sig / (1 - sig))  # KL([sig, 1-sig] || [1-sig, sig])
    row2 = 0.5 * math.log(0.5 / (1 - sig)) + 0.5 * math.log(0.5 / sig)  # KL(uniform || [1-sig, sig])
    value = losses.distillation_term("relational", student, teacher, temperature=1.0)
    assert value.item() == pytest.approx((row0 + row1 + row2) / 3, rel=1e-6)
    # scaled embeddings have the same geometry: the relational term only sees cosines
    assert losses.distillation_term("relational", 3 * teacher, teacher, 0.05).item() == pytest.approx(
        0, abs=1e-7
    )


def test_cosine_mse_and_kl_logits_distillation_values():
    student = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    teacher = torch.tensor([[2.0, 0.0], [1.0, 1.0]])
    cosine = losses.distillation_term("cosine", student, teacher, 1.0)
    assert cosine.item() == pytest.approx((0 + 1 - 1 / math.sqrt(2)) / 2)
    mse = losses.distillation_term("mse", student, teacher, 1.0)  # raw embeddings: (1 + 0 + 1 + 1) / 4
    assert mse.item() == pytest.approx(0.75)
    # kl_logits is sentence-transformers' form: T * KL over the dims of the normalised embeddings
    t = 0.3
    p = F.softmax(F.normalize(teacher, dim=-1) / t, -1)
    log_q = F.log_softmax(F.normalize(student, dim=-1) / t, -1)
    expected = t * (p * (p.log() - log_q)).sum() / 2
    assert losses.distillation_term("kl_logits", student, teacher, t).item() == pytest.approx(expected.item())


def test_dim_distillation_values():
    torch.manual_seed(0)
    full = torch.randn(6, 8)
    teacher_sims = off_diagonal_cosines(full)
    prefix = full[:, :3]
    relational = losses.dim_distillation_term("relational", prefix, teacher_sims, 0.1)
    assert relational.item() == pytest.approx(manual_relational(prefix, full, 0.1).item(), rel=1e-5)
    mse = losses.dim_distillation_term("mse", prefix, teacher_sims, 0.1)
    expected = ((off_diagonal_cosines(prefix) - teacher_sims) ** 2).mean()
    assert mse.item() == pytest.approx(expected.item(), rel=1e-5)
    assert losses.dim_distillation_term("mse", full, teacher_sims, 0.1).item() == pytest.approx(0, abs=1e-6)


@pytest.mark.parametrize("distillation", losses.DISTILLATIONS)
def test_layer_distillation_teacher_gets_no_gradient(distillation):
    loss = AdaptiveLayerLoss(
        MultipleNegativesRankingLoss(),
        n_layers_per_step=-1,
        last_layer_weight=0,
        prior_layers_weight=0,
        distillation=distillation,
    )
    outputs = fake_outputs(grad=True)
    loss.layers_for_step(NUM_LAYERS)
    value = loss(outputs, None)
    assert value.item() > 0
    value.backward()
    # only the distillation term is left (task weights 0); its teacher, the last layer, is detached
    assert all(not out[NUM_LAYERS].grad.any() for out in outputs)
    assert all(out[k].grad.abs().sum() > 0 for out in outputs for k in (1, 2, 3))


@pytest.mark.parametrize("form", losses.DIM_DISTILLATIONS)
def test_dim_distillation_teacher_gets_no_gradient(form):
    # dim weights 0: only the dim distillation term of the 8-dim prefix is left; its teacher is the
    # full-size embedding, so the dims past the prefix (only in the teacher) get no gradient
    loss = MatryoshkaLoss(MultipleNegativesRankingLoss(), [HIDDEN, 8], weights=[0, 0], dim_distillation=form)
    outputs = fake_outputs(grad=True)
    loss.layers_for_step(NUM_LAYERS)
    value = loss(outputs, None)
    assert value.item() > 0
    value.backward()
    for out in outputs:
        assert out[NUM_LAYERS].grad[:, :8].abs().sum() > 0
        assert not out[NUM_LAYERS].grad[:, 8:].any()


def test_2d_loss_with_relational_distillation_matches_its_formula():
    base = MultipleNegativesRankingLoss()
    loss = Matryoshka2dLoss.all_pairs(
        base,
        [HIDDEN, 16, 8],
        prior_layers_weight=2.0,
        kl_div_weight=0.5,
        distillation="relational",
        relational_temperature=0.1,
        dim_distillation="relational",
        dim_distillation_weight=0.25,
    )
    assert loss.layers_for_step(NUM_LAYERS) == [1, 2, 3, 4]
    outputs = fake_outputs()

    def stacked(k):
        return torch.cat([out[k] for out in outputs])

    expected = sum(manual_term(base, outputs, NUM_LAYERS, d) for d in (HIDDEN, 16, 8))
    for k in (1, 2, 3):
        expected = expected + 2.0 / 3 * sum(manual_term(base, outputs, k, d) for d in (HIDDEN, 16, 8))
        expected = expected + 0.5 * manual_relational(stacked(k), stacked(NUM_LAYERS), 0.1)
    for k in (1, 2, 3, 4):
        for d in (16, 8):
            expected = expected + 0.25 * manual_relational(stacked(k)[:, :d], stacked(k), 0.1)
    assert loss(outputs, None).item() == pytest.approx(expected.item(), rel=1e-5)
    config = loss.config()
    assert (config["distillation"], config["dim_distillation"], config["relational_temperature"]) == (
        "relational",
        "relational",
        0.1,
    )


@pytest.mark.parametrize("scheme", ["linear", "log"])
def test_distillation_weighting_spreads_the_same_total_over_the_prior_layers(scheme):
    base = MultipleNegativesRankingLoss()
    loss = Matryoshka2dLoss.all_pairs(
        base, [HIDDEN, 8], kl_div_weight=2.0, distillation="relational", distillation_weighting=scheme
    )
    lw = losses.LAYER_WEIGHTINGS[scheme]
    prior = (1, 2, 3)
    factors = {k: lw(k) * len(prior) / sum(lw(j) for j in prior) for k in prior}
    assert factors[1] > factors[2] > factors[3]  # shallow exits get more of it
    assert sum(loss.distillation_weight(k, NUM_LAYERS) for k in prior) == pytest.approx(2.0 * len(prior))
    outputs = fake_outputs()
    loss.layers_for_step(NUM_LAYERS)

    def stacked(k):
        return torch.cat([out[k] for out in outputs])

    expected = sum(manual_term(base, outputs, NUM_LAYERS, d) for d in (HIDDEN, 8))
    for k in prior:
        expected = expected + sum(manual_term(base, outputs, k, d) for d in (HIDDEN, 8)) / 3
        expected = expected + 2.0 * factors[k] * manual_relational(stacked(k), stacked(NUM_LAYERS), 0.05)
    assert loss(outputs, None).item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss.config()["distillation_weighting"] == scheme
    # uniform (the default) is exactly kl_div_weight for every layer
    uniform = Matryoshka2dLoss.all_pairs(base, [HIDDEN, 8], kl_div_weight=2.0)
    assert [uniform.distillation_weight(k, NUM_LAYERS) for k in prior] == [2.0, 2.0, 2.0]
    assert uniform.config()["distillation_weighting"] == "uniform"


def test_default_distillation_is_the_sentence_transformers_kl():
    loss = Matryoshka2dLoss.all_pairs(MultipleNegativesRankingLoss(), [HIDDEN, 8], last_layer_weight=0)
    assert loss.distillation == "kl_logits" and loss.dim_distillation is None
    explicit = Matryoshka2dLoss.all_pairs(
        MultipleNegativesRankingLoss(), [HIDDEN, 8], last_layer_weight=0, distillation="kl_logits"
    )
    outputs = fake_outputs()
    loss.layers_for_step(NUM_LAYERS)
    explicit.layers_for_step(NUM_LAYERS)
    base = MultipleNegativesRankingLoss()
    expected = sum(
        manual_term(base, outputs, k, d) / 3 + (manual_kl(outputs, k, NUM_LAYERS, 0.3) if d == 8 else 0)
        for k in (1, 2, 3)
        for d in (HIDDEN, 8)
    )
    assert loss(outputs, None).item() == pytest.approx(expected.item(), rel=1e-6)
    assert explicit(outputs, None).item() == loss(outputs, None).item()


def test_distillation_switches():
    mnrl = MultipleNegativesRankingLoss()
    # kl_temperature 0 turns off only the kl_logits form; kl_div_weight 0 turns off every form
    assert not AdaptiveLayerLoss(mnrl, kl_temperature=0).kl_enabled
    assert AdaptiveLayerLoss(mnrl, kl_temperature=0, distillation="cosine").kl_enabled
    assert not AdaptiveLayerLoss(mnrl, kl_div_weight=0, distillation="relational").kl_enabled
    # dim distillation only adds terms for prefixes below the full size
    outputs = fake_outputs()
    plain = MatryoshkaLoss(mnrl, [HIDDEN])
    distilled = MatryoshkaLoss(mnrl, [HIDDEN], dim_distillation="relational")
    assert plain(outputs, None).item() == distilled(outputs, None).item()
    with pytest.raises(InvalidInputError, match="at least 2 embeddings"):
        losses.distillation_term("relational", torch.randn(1, 4), torch.randn(1, 4), 0.05)


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: AdaptiveLayerLoss(MNRL, distillation="kl"), "distillation must be one of"),
        (lambda: AdaptiveLayerLoss(MNRL, distillation=None), "distillation must be one of"),
        (lambda: AdaptiveLayerLoss(MNRL, distillation_weighting="steep"), "distillation_weighting must be"),
        (lambda: AdaptiveLayerLoss(MNRL, distillation_weighting=None), "distillation_weighting must be"),
        (lambda: AdaptiveLayerLoss(MNRL, relational_temperature=0), "relational_temperature"),
        (lambda: AdaptiveLayerLoss(MNRL, relational_temperature=float("nan")), "relational_temperature"),
        (lambda: MatryoshkaLoss(MNRL, [8], dim_distillation="cosine"), "dim_distillation must be one of"),
        (lambda: MatryoshkaLoss(MNRL, [8], dim_distillation_weight=-1), "dim_distillation_weight"),
        (lambda: Matryoshka2dLoss(MNRL, [8], dim_distillation="kl_logits"), "dim_distillation"),
        (lambda: Matryoshka2dLoss(MNRL, [8], dim_distillation_weight="1"), "dim_distillation_weight"),
        (lambda: MultipleNegativesRankingLoss(symmetric="no"), "symmetric must be True or False"),
    ],
)
def test_distillation_option_errors(make, match):
    with pytest.raises(InvalidInputError, match=match):
        make()


def test_a_schedule_with_the_embedding_layer_of_a_one_layer_model():
    """Layer 0 in the schedule while the prior layers (1..n-1) are none: it used to divide by zero."""
    loss = Matryoshka2dLoss(MultipleNegativesRankingLoss(), schedule=[(0, 8), (1, 8)])
    loss.layers_for_step(1)
    outputs = [{0: torch.randn(4, 8), 1: torch.randn(4, 8)} for _ in range(2)]
    assert torch.isfinite(loss(outputs))
