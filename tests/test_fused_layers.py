"""Fused encoder layers: the same embeddings as transformers' layers, used only where they may be."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from conftest import SENTENCES, build_tiny_model

from matryoshka2d import InvalidInputError
from matryoshka2d.fused_layers import FusedLayers, why_not_fusable

TEXTS = SENTENCES + ["a much longer sentence than the others so that the batch has padding in it"]


def _count_fused_passes(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = FusedLayers.hidden_states

    def counting(self, inputs, deepest, wanted):
        calls.append(deepest)
        return original(self, inputs, deepest, wanted)

    monkeypatch.setattr(FusedLayers, "hidden_states", counting)
    return calls


def _reference(model, texts, layers):
    """The same model's embeddings from transformers' layers."""
    model.fuse_layers(False)
    try:
        return model.encode_layers(texts, layers=layers, batch_size=3)
    finally:
        model.fuse_layers()


@pytest.mark.parametrize("family", ["bert", "roberta", "xlm-roberta"])
def test_fused_layers_give_transformers_embeddings(tmp_path, family, monkeypatch):
    model = build_tiny_model(tmp_path, family, num_layers=4)
    assert not model.fused_layers  # off unless asked for
    assert model.fuse_layers() is model and model.fused_layers
    calls = _count_fused_passes(monkeypatch)
    fused = model.encode_layers(TEXTS, layers=[1, 2, 4], batch_size=3)
    batches = -(-len(TEXTS) // 3)
    assert len(calls) == batches  # every batch ran fused
    reference = _reference(model, TEXTS, [1, 2, 4])
    assert len(calls) == batches  # nothing ran fused once switched off
    for k in reference:
        np.testing.assert_allclose(fused[k], reference[k], atol=1e-5, rtol=1e-5)
    features = model.tokenize(TEXTS)  # the embedding layer's exit (0) too
    with torch.inference_mode():
        exits = model.forward(features, [0, 3])
        model.fuse_layers(False)
        expected = model.forward(features, [0, 3])
    assert len(calls) == batches + 1
    for k in expected:
        torch.testing.assert_close(exits[k], expected[k], atol=1e-5, rtol=1e-5)


def test_fused_layers_bfloat16_match_within_bfloat16_rounding(tmp_path):
    model = build_tiny_model(tmp_path, "bert", num_layers=3).to(torch.bfloat16).fuse_layers()
    fused = model.encode(TEXTS, layers=3)
    reference = _reference(model, TEXTS, [3])[3]
    reference /= np.linalg.norm(reference, axis=1, keepdims=True)
    assert (fused * reference).sum(axis=1).min() > 0.999  # cosine of unit vectors


def test_unsupported_models_are_refused_with_the_reason(tmp_path):
    for family in ("mpnet", "distilbert"):
        model = build_tiny_model(tmp_path / family, family)
        assert why_not_fusable(model.transformer) is not None
        with pytest.raises(InvalidInputError, match="cannot fuse the layers"):
            model.fuse_layers()
        assert not model.fused_layers
    model = build_tiny_model(tmp_path / "bert", "bert")
    model.transformer.config.hidden_act = "gelu_new"  # not the fused layer's exact GELU
    with pytest.raises(InvalidInputError, match="gelu_new"):
        model.fuse_layers()
    with pytest.raises(ValueError, match="gelu_new"):
        FusedLayers(model.transformer)


def test_passes_that_need_transformers_layers_do_not_run_fused(tmp_path, monkeypatch):
    model = build_tiny_model(tmp_path, "bert", num_layers=3).fuse_layers()
    calls = _count_fused_passes(monkeypatch)
    features = model.tokenize(TEXTS)
    with torch.inference_mode():
        model.forward(features, 2)
    assert calls == [2]
    # gradients recorded (training): transformers' layers, and the gradients reach the model's weights
    model.forward(features, 2)[2].sum().backward()
    assert calls == [2] and model.transformer.encoder.layer[1].attention.self.query.weight.grad is not None
    model.transformer.zero_grad()
    # train mode (dropout) without gradients
    model.transformer.train()
    with torch.no_grad():
        model.forward(features, 2)
    model.transformer.eval()
    assert calls == [2]
    # a user's hook on a layer's submodule: it must be called, so transformers' layers run
    seen = []
    hook = model.transformer.encoder.layer[0].attention.self.register_forward_hook(lambda *_: seen.append(1))
    try:
        with torch.inference_mode():
            model.forward(features, 2)
    finally:
        hook.remove()
    assert seen == [1] and calls == [2]
    # transformers' own hidden-state capturing hooks (installed by the passes above) do not count
    with torch.inference_mode():
        model.forward(features, [1, 2])
    assert calls == [2, 2]


def test_fused_layers_run_only_the_first_k_layers(tmp_path):
    model = build_tiny_model(tmp_path, "bert", num_layers=4).fuse_layers()
    model.encode(TEXTS[:1], layers=1)  # builds them
    counts = [0] * 4
    hooks = [
        layer.register_forward_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1))
        for i, layer in enumerate(model._fused.layers)
    ]
    try:
        model.encode(TEXTS, layers=2, batch_size=len(TEXTS))
    finally:
        for h in hooks:
            h.remove()
    assert counts == [1, 1, 0, 0]


def test_fused_layers_follow_weight_changes(tmp_path):
    """The fused layers hold a copy of the query/key/value weights: a change of the model's weights (an
    in-place update as an optimiser makes, load_state_dict, a dtype change) must reach the next pass."""
    model = build_tiny_model(tmp_path, "bert", num_layers=3).fuse_layers()
    before = model.encode(TEXTS, layers=3)
    value = model.transformer.encoder.layer[0].attention.self.value
    with torch.no_grad():
        value.weight.mul_(3.0)  # in place: same storage, new version
    changed = model.encode(TEXTS, layers=3)
    assert np.abs(changed - before).max() > 1e-4
    np.testing.assert_allclose(changed, _unit(_reference(model, TEXTS, [3])[3]), atol=1e-5)
    state = {k: v.clone() for k, v in model.transformer.state_dict().items()}
    state["encoder.layer.2.attention.self.value.bias"] += 0.5
    model.transformer.load_state_dict(state)
    loaded = model.encode(TEXTS, layers=3)
    assert np.abs(loaded - changed).max() > 1e-4
    np.testing.assert_allclose(loaded, _unit(_reference(model, TEXTS, [3])[3]), atol=1e-5)
    model.to(torch.float64)  # new storage and dtype: the copy follows
    model.encode(TEXTS[:1], layers=1)
    assert model._fused.layers[0].self_attn.in_proj_weight.dtype == torch.float64


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_fused_forward_is_thread_safe(tmp_path):
    model = build_tiny_model(tmp_path, "bert", num_layers=4)
    expected = {k: model.encode(TEXTS, layers=k) for k in (1, 2, 4)}  # transformers' layers
    model.fuse_layers()  # built by the first passes below, from 8 threads at once
    errors, start = [], threading.Barrier(8)

    def run(i: int) -> None:
        start.wait()
        try:
            for j in range(10):
                k = (1, 2, 4)[(i + j) % 3]
                np.testing.assert_allclose(model.encode(TEXTS, layers=k), expected[k], atol=1e-5)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and model._fused is not None
