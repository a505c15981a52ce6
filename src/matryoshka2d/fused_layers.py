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
(embeddings, the first k fused layers and pooling) is traced once with ``torch.jit.trace`` into a
TorchScript graph, run as one native call that holds no GIL while it runs: per layer count, pooling mode
and inputs (with or without token types), one graph returning the last exit and, for passes that ask for
several exits, one returning them all. A trace is taken on a 2 x 2 padded example and checked against
the Python pass on two other shapes (the first real batch and a 3 x 5 one): a trace that fails or
disagrees (a size or value of the example recorded as a constant) is not used, with a warning, and that
pass runs from Python. Under autocast the Python pass runs (a graph keeps the precision it was traced
in). ``torch.jit.trace`` is deprecated since torch 2.10 (a ``DeprecationWarning``, hidden by Python's
default filters); ``torch.export`` graphs run from Python and AOTInductor needs a C++ toolchain: if a
later torch removes tracing, the passes run from Python as before, slower under concurrency only.
TorchScript never frees a trace's memory (~3 MB), so fused layers rebuilt after a change of the weights
are not traced again. ``fuse_layers(torchscript=False)`` (``m2d serve --no-torchscript``) turns the graphs
off.
"""

from __future__ import annotations

import threading
import warnings
from collections.abc import Callable, Iterable

import torch
from torch import nn

from matryoshka2d.errors import first_line
from matryoshka2d.persistence import PROCESS_STATE_LOCK
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
        # (the module, its TorchScript graph or None) per (layer count, all exits or the last, pooling mode,
        # token types)
        self._passes: dict[tuple, tuple[_FusedPass, Callable | None]] = {}
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

    @property
    def traced(self) -> bool:
        """Whether any pass of these fused layers runs as a TorchScript graph."""
        return any(graph is not None for _, graph in self._passes.values())

    def pooled(
        self, inputs: dict[str, torch.Tensor], deepest: int, wanted: Iterable[int], pooling_mode: str
    ) -> dict[int, torch.Tensor]:
        """``{k: pooled float32 embeddings after layer k}`` for each ``k`` in ``wanted`` (0: the embedding
        layer's output), running the embeddings and the first ``deepest`` layers. ``inputs`` holds
        ``input_ids``, ``attention_mask`` and optionally ``token_type_ids`` (:data:`INPUTS`).

        A pass returns either the last exit only or every exit from 0 to ``deepest`` (of which ``wanted``
        are kept), so a layer count has at most two passes per pooling mode and inputs; each runs as a
        TorchScript graph traced on its first use (see the module's docstring), except under autocast
        (a graph keeps the precision it was traced in) or where it could not be traced."""
        wanted = sorted(set(wanted))
        types = inputs.get("token_type_ids") is not None
        key = (deepest, wanted != [deepest], pooling_mode, types)
        args = [inputs["input_ids"], inputs["attention_mask"]]
        if types:
            args.append(inputs["token_type_ids"])
        found = self._passes.get(key)
        if torch.is_autocast_enabled(args[0].device.type):  # a graph keeps the precision it was traced in
            module = found[0] if found is not None else self._module(key)
            return {k: pooled for k, pooled in zip(module.exits, module(*args)) if k in wanted}
        if found is None:
            with self._lock:  # one trace per key, even when many threads meet it at once
                found = self._passes.get(key)
                if found is None:
                    found, pooled = self._build(key, args)
                    self._passes[key] = found
                    return {k: pooled[k] for k in wanted}
        module, graph = found
        try:
            out = (module if graph is None else graph)(*args)
        except RuntimeError:  # the Python pass raises its own error for an input it refuses (IndexError for
            out = module(*args)  # a token id past the embeddings), not the TorchScript interpreter's trace
        return {k: pooled for k, pooled in zip(module.exits, out) if k in wanted}

    def _module(self, key: tuple) -> _FusedPass:
        """The pass for ``key`` as a module (run from Python)."""
        deepest, all_exits, pooling_mode, _ = key
        exits = tuple(range(deepest + 1)) if all_exits else (deepest,)
        return _FusedPass(self.transformer.embeddings, self.layers[:deepest], exits, pooling_mode)

    def _build(self, key: tuple, args: list[torch.Tensor]) -> tuple[tuple, dict[int, torch.Tensor]]:
        """The pass for ``key`` as (module, its TorchScript graph or None), and its results on ``args``
        (from the module: an input it refuses raises here, and nothing is kept for ``key``)."""
        module = self._module(key)
        expected = module(*args)
        graph = None
        if self.torchscript:
            try:
                graph = _traced(module, args, expected)
            except Exception as e:  # noqa: BLE001 - any failure: this pass runs from Python, as untraced
                warnings.warn(
                    f"fused layers run without a TorchScript graph ({first_line(e)}): the same results, "
                    "slower under concurrency",
                    stacklevel=5,
                )
        return (module, graph), dict(zip(module.exits, expected))


class _FusedPass(nn.Module):
    """The embedding layer, fused layers and pooling of the requested exits, as one module to trace.

    ``forward(input_ids, attention_mask[, token_type_ids])`` returns the pooled float32 embeddings of every
    exit in ``exits`` (in that order). Padded positions hold values that pooling ignores, as in
    transformers' output."""

    def __init__(
        self, embeddings: nn.Module, layers: list[nn.Module], exits: tuple[int, ...], pooling_mode: str
    ) -> None:
        super().__init__()
        self.embeddings = embeddings
        self.layers = nn.ModuleList(layers)
        self.exits = exits
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
        return tuple(pool(states[k].float(), attention_mask, self.pooling_mode) for k in self.exits)


def _example(args: list[torch.Tensor], rows: int, width: int) -> list[torch.Tensor]:
    """A ``rows x width`` batch made of the first text's tokens, row r with r padded positions at its end,
    in the dtypes of ``args`` (input ids, attention mask, token types if present)."""
    ids, mask = args[0], args[1]
    row = ids[0].repeat(-(-width // ids.shape[1]))[:width]
    example_mask = torch.ones(rows, width, dtype=mask.dtype, device=mask.device)
    for r in range(1, rows):
        example_mask[r, width - r :] = 0
    example = [row.expand(rows, width).clone(), example_mask]
    if len(args) > 2:
        example.append(torch.zeros(rows, width, dtype=args[2].dtype, device=args[2].device))
    return example


def _traced(module: _FusedPass, args: list[torch.Tensor], expected: tuple[torch.Tensor, ...]) -> Callable:
    """``module`` traced with TorchScript on a 2 x 2 padded batch, then checked against ``module`` on two
    other shapes, ``args`` (whose results are ``expected``) and a 3 x 5 batch: a trace that recorded a size
    or a value of its example as a constant gives other results there, and is refused (ValueError)."""
    with PROCESS_STATE_LOCK:  # torch's tracer keeps process-wide state: never two traces at once
        graph = torch.jit.trace(module, tuple(_example(args, 2, 2)), check_trace=False)
    checks = [(args, expected)]
    other = _example(args, 3, 5)
    checks.append((other, module(*other)))
    for inputs, want in checks:
        got = graph(*inputs)
        if len(got) != len(want) or any(
            a.shape != b.shape or not torch.allclose(a, b, rtol=1e-3, atol=1e-4) for a, b in zip(got, want)
        ):
            shape = "x".join(map(str, inputs[0].shape))
            raise ValueError(f"its results on a batch of {shape} differ from the Python pass's")
    return graph
