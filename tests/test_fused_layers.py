"""Fused encoder layers: the same embeddings as transformers' layers, used only where they may be."""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest
import torch
from conftest import SENTENCES, build_tiny_model

from matryoshka2d import EmbeddingModel, InvalidInputError
from matryoshka2d.fused_layers import FusedLayers, why_not_fusable

TEXTS = SENTENCES + ["a much longer sentence than the others so that the batch has padding in it"]


def _count_fused_passes(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = FusedLayers.pooled

    def counting(self, inputs, deepest, wanted, pooling_mode):
        calls.append(deepest)
        return original(self, inputs, deepest, wanted, pooling_mode)

    monkeypatch.setattr(FusedLayers, "pooled", counting)
    return calls


def _reference(model, texts, layers, batch_size=3):
    """The same model's embeddings from transformers' layers (the same batches: with left padding the
    batches decide the positions)."""
    model.fuse_layers(False)
    try:
        return model.encode_layers(texts, layers=layers, batch_size=batch_size)
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
    model = build_tiny_model(tmp_path, "bert", num_layers=4).fuse_layers(torchscript=False)
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
    model.fuse_layers()  # a TorchScript graph per layer count: the graph of 2 layers calls 2 fused layers
    model.encode(TEXTS, layers=2)
    ((_, graph),) = model._fused._passes.values()
    assert isinstance(graph, torch.jit.ScriptModule)
    nodes = [node.kind() for node in graph.inlined_graph.nodes()]
    assert nodes.count("aten::_transformer_encoder_layer_fwd") == 2


POOLING_MODES = ["mean", "cls", "max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken"]


@pytest.mark.parametrize("mode", POOLING_MODES)
@pytest.mark.parametrize("family, padding_side", [("bert", "right"), ("bert", "left"), ("roberta", "right")])
def test_torchscript_graphs_give_the_eager_fused_embeddings_at_every_shape(
    tmp_path, mode, family, padding_side
):
    """A graph is traced once per (layers, exits, pooling, inputs) on a 2 x 2 example; it must give what the
    fused layers called from Python give at the other batch sizes and widths it later meets (a size recorded
    as a constant would break another shape), for every pooling mode, both padding sides, several exits."""
    graphs = build_tiny_model(tmp_path, family, num_layers=3, pooling_mode=mode).fuse_layers()
    eager = build_tiny_model(tmp_path, family, num_layers=3, pooling_mode=mode)
    eager.transformer.load_state_dict(graphs.transformer.state_dict())
    eager.fuse_layers(torchscript=False)
    for model in (graphs, eager):
        model.tokenizer.padding_side = padding_side
    batches = [TEXTS[:1], TEXTS[-1:], TEXTS[:2], TEXTS, TEXTS[1:4] * 5]
    with torch.inference_mode():
        for layers in ([2], [0, 1, 3], [3]):
            for texts in batches:
                features = graphs.tokenize(texts)
                if family == "bert":  # token types as a second segment would give them: another graph
                    features["token_type_ids"][:, 1::2] = 1
                got, expected = graphs.forward(features, layers), eager.forward(features, layers)
                for k in layers:
                    torch.testing.assert_close(got[k], expected[k], atol=1e-6, rtol=1e-6)
            if family == "bert":  # the same pass without token types: its own graph
                features = {k: v for k, v in graphs.tokenize(TEXTS).items() if k != "token_type_ids"}
                got, expected = graphs.forward(features, layers), eager.forward(features, layers)
                for k in layers:
                    torch.testing.assert_close(got[k], expected[k], atol=1e-6, rtol=1e-6)
    passes = graphs._fused._passes  # layers 2 and 3 (the last exit), 3 (every exit); without token types
    assert len(passes) == (6 if family == "bert" else 3)
    assert all(isinstance(graph, torch.jit.ScriptModule) for _, graph in passes.values())
    assert all(graph is None for _, graph in eager._fused._passes.values())


def test_a_trace_that_fails_or_differs_is_not_used(tmp_path, monkeypatch):
    """Where TorchScript cannot trace a pass (an error, results unlike the Python pass's on another shape),
    the fused layers run from Python instead, with a warning saying so, and the results stay right."""
    model = build_tiny_model(tmp_path, "bert", num_layers=3).fuse_layers()
    expected = _reference(model, TEXTS, [2])[2]
    real_trace = torch.jit.trace

    def failing(*args, **kwargs):
        raise RuntimeError("tracing is not available here")

    def shifted(module, *args, **kwargs):
        return lambda *inputs: tuple(x + 1.0 for x in module(*inputs))

    def only_its_example(module, example, **kwargs):  # as a trace with the example's sizes as constants
        shape = example[0].shape
        return lambda *inputs: module(*inputs) if inputs[0].shape == shape else module(*example)

    for fake, message in [
        (failing, "tracing is not available here"),
        (shifted, r"its results on a batch of 3x\d+ differ from the Python pass's"),  # the first real batch
        (only_its_example, r"its results on a batch of 3x\d+ differ"),
    ]:
        model.fuse_layers()  # new fused layers, no graph yet
        monkeypatch.setattr(torch.jit, "trace", fake)
        with pytest.warns(UserWarning, match=f"without a TorchScript graph .*{message}"):
            got = model.encode_layers(TEXTS, layers=[2], batch_size=3)[2]
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
        assert all(graph is None for _, graph in model._fused._passes.values())
        monkeypatch.setattr(torch.jit, "trace", real_trace)
    # a first real batch of the example's own shape (2 x 2) cannot tell: the 3 x 5 check does
    model.fuse_layers()
    monkeypatch.setattr(torch.jit, "trace", only_its_example)
    features = {key: value[:2, :2] for key, value in model.tokenize(TEXTS).items()}
    features["attention_mask"][1, 1] = 0
    with torch.inference_mode(), pytest.warns(UserWarning, match="on a batch of 3x5 differ"):
        model.forward(features, 2)
    monkeypatch.setattr(torch.jit, "trace", real_trace)
    model.fuse_layers()
    model.encode(TEXTS, layers=2)
    assert all(isinstance(graph, torch.jit.ScriptModule) for _, graph in model._fused._passes.values())


def test_a_bad_first_batch_raises_and_leaves_the_graph_to_the_next(tmp_path):
    """An input the pass refuses (a token id past the embeddings) raises as it would from Python, and does
    not count as a failed trace: the next batch is traced."""
    model = build_tiny_model(tmp_path, "bert", num_layers=3).fuse_layers()
    features = model.tokenize(TEXTS)
    bad = {**features, "input_ids": features["input_ids"].clone()}
    bad["input_ids"][0, 1] = 10_000
    with torch.inference_mode(), warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no "without a TorchScript graph"
        with pytest.raises(IndexError):
            model.forward(bad, 2)
        assert model._fused._passes == {}
        model.forward(features, 2)
        with pytest.raises(IndexError):  # the Python pass's error, not the TorchScript interpreter's
            model.forward(bad, 2)
    ((_, graph),) = model._fused._passes.values()
    assert isinstance(graph, torch.jit.ScriptModule)


def test_autocast_passes_run_from_python_in_the_autocast_precision(tmp_path):
    """A graph keeps the precision it was traced in: under autocast the pass runs from Python (reduced
    precision), and a graph is neither traced there nor used there."""
    model = build_tiny_model(tmp_path, "bert", num_layers=3).fuse_layers()
    features = model.tokenize(TEXTS)
    with torch.inference_mode():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            reduced = model.forward(features, 2)[2]
        assert model._fused._passes == {}  # nothing traced under autocast
        full = model.forward(features, 2)[2]
        assert isinstance(model._fused._passes[(2, False, "mean", True)][1], torch.jit.ScriptModule)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            again = model.forward(features, 2)[2]
        model.fuse_layers(False)
        expected = model.forward(features, 2)[2]
    torch.testing.assert_close(full, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(again, reduced)
    assert (reduced - full).abs().max() > 1e-4  # bfloat16 really ran under autocast


def test_fused_layers_rebuilt_after_a_weight_change_are_not_traced_again(tmp_path, monkeypatch):
    """TorchScript never frees a trace's memory: fused layers rebuilt after a change of the weights run from
    Python (still right), until fuse_layers() is called again."""
    model = build_tiny_model(tmp_path, "bert", num_layers=3).fuse_layers()
    plain = EmbeddingModel(model.transformer, model.tokenizer)  # the same modules, not fused
    traces = []
    real_trace = torch.jit.trace
    monkeypatch.setattr(torch.jit, "trace", lambda *a, **k: traces.append(1) or real_trace(*a, **k))
    model.encode(TEXTS, layers=3)
    assert len(traces) == 1 and model._fused.traced
    for _ in range(3):
        with torch.no_grad():
            model.transformer.encoder.layer[0].attention.self.value.weight.mul_(1.5)
        np.testing.assert_allclose(model.encode(TEXTS, layers=3), plain.encode(TEXTS, layers=3), atol=1e-5)
        assert len(traces) == 1 and not model._fused.torchscript
    model.fuse_layers()
    model.encode(TEXTS, layers=3)
    assert len(traces) == 2 and model._fused.traced


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


def test_fused_forward_is_thread_safe(tmp_path, monkeypatch):
    model = build_tiny_model(tmp_path, "bert", num_layers=4)
    expected = {k: model.encode(TEXTS, layers=k) for k in (1, 2, 4)}  # transformers' layers
    model.fuse_layers()  # built (and traced) by the first passes below, from 8 threads at once
    traces = []
    real_trace = torch.jit.trace

    def counting(*args, **kwargs):
        traces.append(1)
        return real_trace(*args, **kwargs)

    monkeypatch.setattr(torch.jit, "trace", counting)
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
    assert len(traces) == 3  # one graph per layer count, traced once


def _assert_fused_equals_unfused(model, texts=TEXTS, layers=(1, 2, 3)):
    fused = model.encode_layers(texts, layers=list(layers), batch_size=4)
    reference = _reference(model, texts, list(layers), batch_size=4)
    for k in reference:
        np.testing.assert_allclose(fused[k], reference[k], atol=1e-5, rtol=1e-5)


def test_layer_norm_eps_activation_and_left_padding_as_the_model_has_them(tmp_path, monkeypatch):
    """RoBERTa/XLM-R checkpoints use LayerNorm eps 1e-5 (the tiny models 1e-12), some models ReLU, some
    tokenizers pad on the left: the fused layers compute what the model's own layers do in each case."""
    calls = _count_fused_passes(monkeypatch)
    roberta = build_tiny_model(tmp_path / "roberta", "roberta", num_layers=3)
    for module in roberta.transformer.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.eps = 1e-1  # large enough that a fused layer with the config's eps would differ
    _assert_fused_equals_unfused(roberta.fuse_layers())
    bert = build_tiny_model(tmp_path / "bert", "bert", num_layers=3)
    bert.transformer.config.hidden_act = "relu"
    for layer in bert.transformer.encoder.layer:
        layer.intermediate.intermediate_act_fn = torch.nn.ReLU()
    assert bert.fuse_layers()._fused.layers[0].activation_relu_or_gelu == 1  # ReLU
    _assert_fused_equals_unfused(bert)
    left = build_tiny_model(tmp_path / "left", "bert", num_layers=3).fuse_layers()
    left.tokenizer.padding_side = "left"
    _assert_fused_equals_unfused(left)
    assert len(calls) >= 3 * -(-len(TEXTS) // 4)


def test_exit_rotations_apply_to_fused_passes(tmp_path):
    model = build_tiny_model(tmp_path, "bert", num_layers=3)
    rotation, _ = torch.linalg.qr(
        torch.randn(model.hidden_size, model.hidden_size, generator=torch.Generator().manual_seed(0))
    )
    model.set_exit_rotations({2: rotation})
    model.fuse_layers()
    _assert_fused_equals_unfused(model, layers=(2, 3))
    rotated = model.encode(TEXTS, layers=2)
    model.set_exit_rotations({})
    assert np.abs(model.encode(TEXTS, layers=2) - rotated).max() > 1e-3


def test_compiled_and_position_id_passes_run_transformers_layers(tmp_path, monkeypatch):
    model = build_tiny_model(tmp_path, "bert", num_layers=3).fuse_layers()
    calls = _count_fused_passes(monkeypatch)
    features = model.tokenize(TEXTS)
    with torch.inference_mode():
        positions = torch.arange(features["input_ids"].shape[1]).expand_as(features["input_ids"]) + 2
        shifted = model.forward({**features, "position_ids": positions}, 2)[2]
        model.fuse_layers(False)
        expected = model.forward({**features, "position_ids": positions}, 2)[2]
        model.fuse_layers()
        assert calls == []  # position ids are the embeddings' input a fused pass does not take
        torch.testing.assert_close(shifted, expected)
        assert not torch.allclose(shifted, model.forward(features, 2)[2], atol=1e-4)
        assert calls == [2]
        types = {**features, "token_type_ids": torch.ones_like(features["input_ids"])}  # a second segment
        fused_types = model.forward(types, 2)[2]
        assert calls == [2, 2]
        model.fuse_layers(False)
        torch.testing.assert_close(fused_types, model.forward(types, 2)[2], atol=1e-5, rtol=1e-5)
        model.fuse_layers()
        assert not torch.allclose(fused_types, model.forward(features, 2)[2], atol=1e-4)
        model._compile = True  # as compile_for_inference() sets it: compiled graphs win
        try:
            assert model._fused_runner(features) is None
        finally:
            model._compile = False


def test_a_replaced_module_is_run_or_fusing_turns_off(tmp_path, monkeypatch):
    """A module replaced or wrapped after fuse_layers(), even without new weights, must run: the fused
    layers are rebuilt from the new modules, or, where they cannot compute it, fusing turns off."""
    model = build_tiny_model(tmp_path, "bert", num_layers=3).fuse_layers()
    calls = _count_fused_passes(monkeypatch)
    model.encode(TEXTS, layers=3)
    assert len(calls) == 1

    class Shifted(torch.nn.Module):  # the same weights, another computation
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *args, **kwargs):
            out = self.inner(*args, **kwargs)
            return (out[0] + 1.0, *out[1:]) if isinstance(out, tuple) else out + 1.0

    layers = model.transformer.encoder.layer
    layers[1] = Shifted(layers[1])
    with pytest.warns(UserWarning, match="fused layers turned off"):
        wrapped = model.encode(TEXTS, layers=3)
    assert not model.fused_layers and len(calls) == 1
    np.testing.assert_allclose(wrapped, model.encode(TEXTS, layers=3), atol=1e-6)
    with pytest.raises(InvalidInputError, match="a layer is a Shifted"):  # refused at once, with the reason
        model.fuse_layers()
    layers[1] = layers[1].inner
    model.fuse_layers()
    for layer in layers:  # a stock module swapped for another stock one: rebuilt, still fused
        layer.intermediate.intermediate_act_fn = torch.nn.ReLU()
    model.transformer.config.hidden_act = "relu"
    fused = model.encode(TEXTS, layers=3)
    assert model.fused_layers and len(calls) == 2
    np.testing.assert_allclose(fused, _unit(_reference(model, TEXTS, [3])[3]), atol=1e-5)


def test_warm_up_traces_every_layer_count_asked(tmp_path):
    """The server warms up before its first request: every allowed layer count's graph (and, for its
    shared batch mode, the pass of every exit) is traced then, not during a client's request; not the pass
    of every exit of the smallest layer count: a shared batch of several layer counts runs to a deeper one."""
    model = build_tiny_model(tmp_path, "bert", num_layers=3).fuse_layers()
    model.warm_up([2, 3], exits=True)
    passes = model._fused._passes
    assert {(deepest, every_exit) for deepest, every_exit, *_ in passes} == {
        (2, False),
        (3, False),
        (3, True),
    }
    assert all(isinstance(graph, torch.jit.ScriptModule) for _, graph in passes.values())
    # the graphs hold the model's own weights (and the fused layers' one QKV copy), not copies of their own
    embedding = model.transformer.embeddings.word_embeddings.weight
    for _, graph in passes.values():
        assert graph.embeddings.word_embeddings.weight.data_ptr() == embedding.data_ptr()
        qkv = getattr(graph.layers, "0").self_attn.in_proj_weight
        assert qkv.data_ptr() == model._fused.layers[0].self_attn.in_proj_weight.data_ptr()
