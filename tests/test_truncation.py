"""Layer-stack discovery and dim truncation helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FAMILIES, tiny_transformer

from matryoshka2d.truncation import (
    find_layer_stack,
    has_optional_pooler,
    keep_first_layers,
    layer_view,
    truncate_dims,
)


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_stack_found_for_each_family(family):
    model = tiny_transformer(family, vocab_size=50, num_layers=3)
    parent, name = find_layer_stack(model)
    assert len(getattr(parent, name)) == 3


@pytest.mark.parametrize("family", ["bert", "mpnet", "roberta", "distilbert"])
def test_layer_view_shares_weights_and_leaves_the_model_unchanged(family):
    model = tiny_transformer(family, vocab_size=50, num_layers=3)
    parent, name = find_layer_stack(model)
    full = getattr(parent, name)
    params = {n: p.data_ptr() for n, p in model.named_parameters()}
    view = layer_view(model, 1)
    view_parent, view_name = find_layer_stack(view)
    assert len(getattr(view_parent, view_name)) == 1 and getattr(view_parent, view_name)[0] is full[0]
    # the original keeps every layer, the same list object and the same parameters
    assert getattr(parent, name) is full and len(full) == 3
    assert {n: p.data_ptr() for n, p in model.named_parameters()} == params
    model_params = {id(p) for p in model.parameters()}
    assert all(id(p) in model_params for p in view.parameters())  # shared, not copied
    assert layer_view(model, 3) is model


def test_layer_view_gradients_reach_the_shared_weights():
    model = tiny_transformer("bert", vocab_size=50, num_layers=3)
    ids = torch.tensor([[1, 5, 7, 2]])
    layer_view(model, 2)(input_ids=ids).last_hidden_state.sum().backward()
    stack = find_layer_stack(model)
    layers = getattr(*stack)
    assert layers[1].attention.self.query.weight.grad is not None
    assert layers[2].attention.self.query.weight.grad is None  # not run


@pytest.mark.parametrize("family", ["bert", "mpnet", "roberta"])
def test_layer_view_can_leave_out_the_pooler(family):
    base = tiny_transformer(family, vocab_size=50, num_layers=3)
    model = type(base)(base.config)  # with the pooling head (the tiny models are built without)
    model.load_state_dict(base.state_dict(), strict=False)
    model.eval()
    assert isinstance(model.pooler, torch.nn.Module) and has_optional_pooler(model)
    ids = torch.tensor([[1, 5, 7, 2], [1, 6, 2, 0]])
    mask = (ids != 0).long()
    for k in (2, 3):
        full = layer_view(model, k)(input_ids=ids, attention_mask=mask)
        view = layer_view(model, k, drop_pooler=True)
        assert view is not model and view.pooler is None
        out = view(input_ids=ids, attention_mask=mask)
        torch.testing.assert_close(out.last_hidden_state, full.last_hidden_state, rtol=0, atol=0)
        assert out.pooler_output is None and full.pooler_output is not None
    assert isinstance(model.pooler, torch.nn.Module)  # the model keeps its head and its weights
    # built without the head (pooler None): nothing to leave out, no copy at full depth
    assert not has_optional_pooler(base) and layer_view(base, 3, drop_pooler=True) is base
    assert not has_optional_pooler(tiny_transformer("distilbert", vocab_size=50, num_layers=3))


def test_layer_view_keeps_a_pooler_the_model_cannot_run_without():
    class Pooled(torch.nn.Module):  # no add_pooling_layer: its forward may need the head
        def __init__(self):
            super().__init__()
            self.encoder = torch.nn.Module()
            self.encoder.layer = torch.nn.ModuleList([torch.nn.Linear(2, 2) for _ in range(3)])
            self.pooler = torch.nn.Linear(2, 2)

    model = Pooled()
    assert not has_optional_pooler(model)
    assert layer_view(model, 3, drop_pooler=True) is model
    assert layer_view(model, 2, drop_pooler=True).pooler is model.pooler


def test_keep_first_layers_updates_config():
    model = tiny_transformer("distilbert", vocab_size=50, num_layers=3)
    keep_first_layers(model, 2)
    assert model.config.num_hidden_layers == 2 and model.config.n_layers == 2


def test_truncate_dims_numpy_and_torch_agree():
    x = np.random.default_rng(0).normal(size=(4, 10)).astype(np.float32)
    a = truncate_dims(x, 3, normalize=True)
    b = truncate_dims(torch.from_numpy(x), 3, normalize=True).numpy()
    np.testing.assert_allclose(a, b, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(a, axis=1), 1, atol=1e-6)
    assert truncate_dims(x, None, normalize=False) is x


@pytest.mark.parametrize("family", ["bert", "mpnet", "distilbert"])
def test_layer_views_return_the_right_hidden_states_call_after_call(family):
    """transformers 5 captures hidden states with hooks: views must not install them again and again."""
    model = tiny_transformer(family, vocab_size=50, num_layers=4).eval()
    batches = [torch.randint(5, 50, (3, 7)), torch.randint(5, 50, (5, 4)), torch.randint(5, 50, (2, 9))]
    parent, name = find_layer_stack(model)
    with torch.inference_mode():
        first = [layer_view(model, 3)(input_ids=b, output_hidden_states=True).hidden_states for b in batches]
        hooks = [len(layer._forward_hooks) for layer in getattr(parent, name)]
        for _ in range(3):
            for b, expected in zip(batches, first):
                again = layer_view(model, 3)(input_ids=b, output_hidden_states=True).hidden_states
                full = model(input_ids=b, output_hidden_states=True).hidden_states
                assert len(again) == 4
                for k in range(4):
                    assert torch.equal(again[k], expected[k]) and torch.equal(again[k], full[k])
    assert [len(layer._forward_hooks) for layer in getattr(parent, name)] == hooks  # no growth


def assert_onnx_exits_match(model, texts, tmp_path, monkeypatch) -> None:
    """The ONNX backend on the saved model gives what ``model.encode(layers=k)`` does at k = 1, 2, 4."""
    pytest.importorskip("onnxruntime")
    from matryoshka2d.backends import load_encoder

    monkeypatch.setenv("M2D_CACHE_DIR", str(tmp_path / "cache"))
    onnx = load_encoder(model.save(tmp_path / "full"), backend="onnx", dtype="float32", threads=1)
    for k in (1, 2, 4):
        assert np.abs(onnx.encode(texts, layers=k) - model.encode(texts, layers=k)).max() <= 1e-4, k


def test_final_norm_models_give_every_exit_as_the_cut_model_would(tmp_path, monkeypatch):
    """ModernBERT (like Llama-style decoders) normalises once after its last layer; transformers applies
    that only to the last hidden state. Every exit must get it, as the model cut there would, whichever
    way the exit is asked for: alone, beside deeper ones, from a truncated folder or from ONNX."""
    from conftest import SENTENCES, build_tiny_model

    from matryoshka2d import EmbeddingModel
    from matryoshka2d.truncation import final_norm

    model = build_tiny_model(tmp_path / "build", "modernbert")
    assert final_norm(model.transformer) is model.transformer.final_norm
    assert final_norm(tiny_transformer("bert", 100)) is None
    texts = SENTENCES[:6]
    together = model.encode_layers(texts, [1, 2, 3, 4])
    for k in (1, 2, 3):
        alone = model.encode(texts, layers=k)
        unit = together[k] / np.linalg.norm(together[k], axis=1, keepdims=True)
        assert np.abs(alone - unit).max() <= 1e-5, k
    cut = EmbeddingModel.load(model.truncate(layers=2).save(tmp_path / "cut2"))  # its per-layer config too
    assert cut.num_layers == 2 and cut.transformer.config.layer_types == [
        "full_attention",
        "sliding_attention",
    ]
    assert np.abs(cut.encode(texts) - model.encode(texts, layers=2)).max() <= 1e-5
    assert_onnx_exits_match(model, texts, tmp_path, monkeypatch)


def test_a_decoder_with_last_token_pooling_gives_every_exit_as_the_cut_model_would(tmp_path, monkeypatch):
    """Llama-style decoder embedding models (e5-mistral, gte-Qwen2): causal attention, the last token
    pooled, an RMS norm after the last layer that every exit gets; the same embeddings from a batch and
    one text at a time (padding must not move the last token), a truncated folder and ONNX."""
    from conftest import SENTENCES, build_tiny_model

    from matryoshka2d import EmbeddingModel
    from matryoshka2d.truncation import final_norm

    model = build_tiny_model(tmp_path / "build", "llama", pooling_mode="lasttoken")
    assert final_norm(model.transformer) is model.transformer.norm
    texts = SENTENCES[:6]
    together = model.encode_layers(texts, [1, 2, 3, 4])
    for k in (1, 2, 3, 4):
        unit = together[k] / np.linalg.norm(together[k], axis=1, keepdims=True)
        assert np.abs(model.encode(texts, layers=k) - unit).max() <= 1e-5, k
    one_by_one = np.stack([model.encode([t], layers=3)[0] for t in texts])
    assert np.abs(one_by_one - model.encode(texts, layers=3)).max() <= 1e-5
    cut = EmbeddingModel.load(model.truncate(layers=2).save(tmp_path / "cut2"))
    assert cut.num_layers == 2 and cut.pooling_mode == "lasttoken"
    assert np.abs(cut.encode(texts) - model.encode(texts, layers=2)).max() <= 1e-5
    assert_onnx_exits_match(model, texts, tmp_path, monkeypatch)
