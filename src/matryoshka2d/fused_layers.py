"""BERT-family transformer layers run as torch's fused encoder layer, for inference (opt-in).

In eval mode without gradients, ``torch.nn.TransformerEncoderLayer`` runs a whole post-norm encoder layer
(self-attention with a padding mask, feed-forward, both LayerNorms) as one native call. transformers'
``BertLayer`` makes ~25 Python-level torch calls per layer instead, each taking the GIL: on a CPU with
small batches (a server's requests of 1..32 texts) that Python is a visible share of a layer, and threads
running batches at once (the server's workers, ``encode(workers=2)``) wait for each other's GIL.

:class:`FusedLayers` wraps the layers of a BERT, RoBERTa or XLM-RoBERTa model (absolute positions, exact
GELU or ReLU, not a decoder, an even number of heads: :func:`why_not_fusable`) in such modules. They share
every weight with the model except the query/key/value projections, which the fused call takes as one
matrix: those are concatenated into a copy. :meth:`~matryoshka2d.model.EmbeddingModel.fuse_layers` turns
them on and rebuilds them when the model's weights change, as compiled graphs are. Results equal
transformers' to float rounding (float32: ~1e-6 on all-MiniLM-L6-v2's pooled embeddings).

**TorchScript graphs.** Even fused, a pass makes a dozen Python-level calls (the embedding layer, each
layer's argument checks, pooling), and every one of them takes the GIL back from whatever Python another
thread is running (a server's event loop, the tokenising of the next requests): a thread that waits for the
GIL waits up to ``sys.getswitchinterval()`` (5 ms) each time, with its core idle. So by default each pass
(embeddings, the first k fused layers and pooling of the requested exits) is traced once with
``torch.jit.trace`` into one TorchScript graph per (layer count, exits, pooling mode, inputs) and run as
one native call that holds no GIL while it runs. A trace is taken on a 2 x 2 padded example and then
checked against the Python pass on the first real batch (another shape); a trace that fails, warns
(``TracerWarning``: something shape- or data-dependent became a constant) or disagrees is not used, with a
warning, and that pass runs from Python. ``torch.jit.trace`` is deprecated since torch 2.10 (it works, and
the notice is silenced here; ``torch.export`` graphs run from Python, and AOTInductor needs a C++
toolchain): if a later torch removes it, the passes run from Python as before, slower under concurrency
only. ``fuse_layers(torchscript=False)`` (``m2d serve --no-torchscript``) turns the graphs off.
"""

from __future__ import annotations

import re
import threading
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import nn

from matryoshka2d.errors import first_line
from matryoshka2d.pooling import pool

#: Base model classes whose layers map onto the fused layer (by name: transformers is imported lazily).
FUSABLE_MODELS = ("BertModel", "RobertaModel", "XLMRobertaModel")
_ACTIVATIONS = ("gelu", "relu")  # exact GELU: transformers' "gelu_new" and "gelu_fast" differ
_CAPTURING_HOOKS = "transformers.utils.output_capturing"  # the module of transformers' own hooks
#: The model inputs a fused pass takes; others (e.g. ``position_ids``) make a pass run transformers' layers.
INPUTS = frozenset({"input_ids", "attention_mask", "token_type_ids"})


def why_not_fusable(transformer: nn.Module) -> str | None:
    """Why ``transformer``'s layers cannot run as fused layers (None: they can)."""
    name = type(transformer).__name__
    if name not in FUSABLE_MODELS:
        return f"{name} is not one of {', '.join(FUSABLE_MODELS)}"
    config = transformer.config
    if getattr(config, "is_decoder", False) or getattr(config, "add_cross_attention", False):
        return "it is configured as a decoder"
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        return f"its position_embedding_type is {config.position_embedding_type!r}, not 'absolute'"
    if getattr(config, "hidden_act", None) not in _ACTIVATIONS:
        return f"its hidden_act is {getattr(config, 'hidden_act', None)!r}, not one of {_ACTIVATIONS}"
    if config.num_attention_heads % 2:  # torch's fused layer takes an even number of heads only
        return f"it has an odd number of attention heads ({config.num_attention_heads})"
    return None


_LAYERS = ("BertLayer", "RobertaLayer", "XLMRobertaLayer")
_ACTIVATION_MODULES = ("GELUActivation", "ReLU")  # what transformers' ACT2FN gives for "gelu" and "relu"


def _check_stock(layer: nn.Module) -> None:
    """Refuse a layer whose modules are not transformers' own (a replaced or wrapped module, an instance
    whose ``forward`` was reassigned): the fused layer would not compute what it computes."""
    if type(layer).__name__ not in _LAYERS:
        raise ValueError(f"a layer is a {type(layer).__name__}, not one of {_LAYERS}")
    attention, attention_out = layer.attention.self, layer.attention.output
    expected = {
        "query": (attention.query, ("Linear",)),
        "key": (attention.key, ("Linear",)),
        "value": (attention.value, ("Linear",)),
        "attention output": (attention_out.dense, ("Linear",)),
        "first LayerNorm": (attention_out.LayerNorm, ("LayerNorm",)),
        "intermediate": (layer.intermediate.dense, ("Linear",)),
        "activation": (layer.intermediate.intermediate_act_fn, _ACTIVATION_MODULES),
        "output": (layer.output.dense, ("Linear",)),
        "second LayerNorm": (layer.output.LayerNorm, ("LayerNorm",)),
    }
    for what, (module, names) in expected.items():
        if type(module).__name__ not in names:
            raise ValueError(f"{what} is a {type(module).__name__}, not one of {names}")
    for module in layer.modules():
        if "forward" in vars(module):
            raise ValueError(f"a {type(module).__name__} of the layer has its own forward")
    first, second = attention_out.LayerNorm, layer.output.LayerNorm
    if first.eps != second.eps or first.weight is None or second.weight is None:
        raise ValueError("the two LayerNorms differ in eps or have no weights")


def _fused_layer(layer: nn.Module, config) -> nn.TransformerEncoderLayer:
    """A fused layer computing what ``layer`` (a BertLayer) computes, sharing all but its QKV weights."""
    _check_stock(layer)
    attention, attention_out = layer.attention.self, layer.attention.output
    fused = nn.TransformerEncoderLayer(
        config.hidden_size,
        config.num_attention_heads,
        config.intermediate_size,
        dropout=0.0,
        activation=config.hidden_act,
        layer_norm_eps=attention_out.LayerNorm.eps,
        batch_first=True,
        norm_first=False,  # BERT is post-norm: LayerNorm(x + sublayer(x))
        device="meta",  # no memory for the weights replaced below
    )
    mha = fused.self_attn
    with torch.no_grad():
        q, k, v = attention.query, attention.key, attention.value
        mha.in_proj_weight = nn.Parameter(torch.cat([q.weight, k.weight, v.weight]), requires_grad=False)
        mha.in_proj_bias = nn.Parameter(torch.cat([q.bias, k.bias, v.bias]), requires_grad=False)
    mha.out_proj.weight, mha.out_proj.bias = attention_out.dense.weight, attention_out.dense.bias
    fused.norm1.weight, fused.norm1.bias = attention_out.LayerNorm.weight, attention_out.LayerNorm.bias
    fused.linear1.weight, fused.linear1.bias = layer.intermediate.dense.weight, layer.intermediate.dense.bias
    fused.linear2.weight, fused.linear2.bias = layer.output.dense.weight, layer.output.dense.bias
    fused.norm2.weight, fused.norm2.bias = layer.output.LayerNorm.weight, layer.output.LayerNorm.bias
    return fused.eval()


class FusedLayers:
    """The fused layers of ``transformer`` as its weights are now (build a new one after they change).

    Args:
        transformer: a model :func:`why_not_fusable` accepts.
        torchscript: run each pass as a TorchScript graph (default), else as Python calling the fused
            layers one by one.

    Raises:
        ValueError: the model's layers cannot be fused (the message says why).
    """

    def __init__(self, transformer: nn.Module, torchscript: bool = True) -> None:
        reason = why_not_fusable(transformer)
        if reason is not None:
            raise ValueError(f"cannot fuse the layers of {type(transformer).__name__}: {reason}")
        self.transformer = transformer
        self.layers = [_fused_layer(layer, transformer.config) for layer in transformer.encoder.layer]
        # every module of the model and its children, listed once (walking the model on every pass costs
        # more): a module replaced or wrapped afterwards shows as a changed child list
        self._structure = [(module, tuple(module._modules.values())) for module in transformer.modules()]
        self.torchscript = torchscript
        # one pass (a traced graph or the module) per (layer count, exits, pooling mode, token types)
        self._passes: dict[tuple, Callable] = {}
        self._lock = threading.Lock()

    def unchanged(self) -> bool:
        """Whether the model's modules are still the ones the fused layers were built from (a module
        replaced or wrapped since, even without new weights, makes them stale)."""
        return all(tuple(module._modules.values()) == children for module, children in self._structure)

    def has_user_hooks(self) -> bool:
        """Whether a forward (pre-)hook other than transformers' own hidden-state capturing hooks is on the
        model: a fused pass would not call it."""
        for module, _ in self._structure:
            for hooks in (module._forward_hooks, module._forward_pre_hooks):
                if hooks and any(getattr(h, "__module__", "") != _CAPTURING_HOOKS for h in hooks.values()):
                    return True
        return False

    def pooled(
        self, inputs: dict[str, torch.Tensor], deepest: int, wanted: Iterable[int], pooling_mode: str
    ) -> dict[int, torch.Tensor]:
        """``{k: pooled float32 embeddings after layer k}`` for each ``k`` in ``wanted`` (0: the embedding
        layer's output), running the embeddings and the first ``deepest`` layers. ``inputs`` holds
        ``input_ids``, ``attention_mask`` and optionally ``token_type_ids`` (:data:`INPUTS`).

        Each (layer count, exits, pooling, inputs) runs as one TorchScript graph, traced on its first pass
        (see the module's docstring); where one cannot be traced, the same module runs eagerly."""
        types = inputs.get("token_type_ids") is not None
        key = (deepest, tuple(sorted(set(wanted))), pooling_mode, types)
        run = self._passes.get(key)
        if run is None:
            with self._lock:  # one trace per key, even when many threads meet it at once
                run = self._passes.get(key)
                if run is None:
                    run = self._passes[key] = self._build(key, inputs)
        args = [inputs["input_ids"], inputs["attention_mask"]]
        if types:
            args.append(inputs["token_type_ids"])
        return dict(zip(key[1], run(*args)))

    def _build(self, key: tuple, inputs: dict[str, torch.Tensor]) -> Callable:
        """The pass for ``key``: its module traced (when ``torchscript``), else the module itself."""
        deepest, wanted, pooling_mode, types = key
        module = _FusedPass(self.transformer.embeddings, self.layers[:deepest], wanted, pooling_mode)
        if not self.torchscript:
            return module
        try:
            return _traced(module, inputs, types)
        except Exception as e:  # noqa: BLE001 - any failure: run the module eagerly, as before tracing
            warnings.warn(
                f"fused layers run without a TorchScript graph ({first_line(e)}): same results, slower "
                "under concurrency",
                stacklevel=4,
            )
            return module


class _FusedPass(nn.Module):
    """The embedding layer, fused layers and pooling of the requested exits, as one module to trace.

    ``forward(input_ids, attention_mask[, token_type_ids])`` returns the pooled float32 embeddings of every
    exit in ``wanted`` (in that order). Padded positions hold values that pooling ignores, as in
    transformers' output."""

    def __init__(
        self, embeddings: nn.Module, layers: list[nn.Module], wanted: tuple[int, ...], pooling_mode: str
    ) -> None:
        super().__init__()
        self.embeddings = embeddings
        self.layers = nn.ModuleList(layers)
        self.wanted = wanted
        self.pooling_mode = pooling_mode

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        token_type_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, ...]:
        if token_type_ids is None:
            hidden = self.embeddings(input_ids=input_ids)
        else:
            hidden = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        padding = attention_mask == 0
        states = {0: hidden}
        for k, layer in enumerate(self.layers, start=1):
            hidden = layer(hidden, src_key_padding_mask=padding)
            states[k] = hidden
        return tuple(pool(states[k].float(), attention_mask, self.pooling_mode) for k in self.wanted)


#: The deprecation notice torch.jit.trace gives since torch 2.10 (it still works; see the module docstring).
_TRACE_DEPRECATION = re.compile(r"`torch\.jit\.trace(_method)?` is deprecated")


def _traced(module: _FusedPass, inputs: dict[str, torch.Tensor], types: bool) -> Callable:
    """``module`` traced with TorchScript on a small padded batch made from ``inputs`` and checked against
    ``module`` itself on ``inputs`` (another shape): a trace that recorded anything shape- or
    data-dependent as a constant fails that check or warns (TracerWarning), and is not used."""
    ids, mask = inputs["input_ids"], inputs["attention_mask"]
    row = ids[:1, :2] if ids.shape[1] >= 2 else ids[:1].repeat(1, 2)
    example = [row.repeat(2, 1), torch.ones_like(row).repeat(2, 1)]
    example[1][1, 1] = 0  # the second row padded: the trace must keep the masking
    if types:
        example.append(torch.zeros_like(example[0]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = torch.jit.trace(module, tuple(example), check_trace=False)
    for w in caught:
        if issubclass(w.category, torch.jit.TracerWarning):
            raise ValueError(f"the trace may depend on its example: {w.message}")
        if not _TRACE_DEPRECATION.search(str(w.message)):  # others reach the user as they would have
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    args = [ids, mask] + ([inputs["token_type_ids"]] if types else [])
    for got, expected in zip(graph(*args), module(*args)):
        if not torch.allclose(got, expected, rtol=1e-3, atol=1e-4):
            raise ValueError("its results differ from the eager pass's")
    return graph
