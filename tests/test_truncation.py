"""Layer-stack discovery and dim truncation helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FAMILIES, tiny_transformer

from matryoshka2d.truncation import find_layer_stack, first_layers, keep_first_layers, truncate_dims


@pytest.mark.parametrize("family", FAMILIES)
def test_layer_stack_found_for_each_family(family):
    model = tiny_transformer(family, vocab_size=50, num_layers=3)
    parent, name = find_layer_stack(model)
    assert len(getattr(parent, name)) == 3


def test_first_layers_restores_the_stack_even_on_error():
    model = tiny_transformer("bert", vocab_size=50, num_layers=3)
    parent, name = find_layer_stack(model)
    full = getattr(parent, name)
    with pytest.raises(RuntimeError):
        with first_layers(model, 1):
            assert len(getattr(parent, name)) == 1 and getattr(parent, name)[0] is full[0]
            raise RuntimeError("boom")
    assert getattr(parent, name) is full


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
