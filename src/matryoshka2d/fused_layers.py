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
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

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

    Raises:
        ValueError: the model's layers cannot be fused (the message says why).
    """

    def __init__(self, transformer: nn.Module) -> None:
        reason = why_not_fusable(transformer)
        if reason is not None:
            raise ValueError(f"cannot fuse the layers of {type(transformer).__name__}: {reason}")
        self.transformer = transformer
        self.layers = [_fused_layer(layer, transformer.config) for layer in transformer.encoder.layer]
        # every module of the model and its children, listed once (walking the model on every pass costs
        # more): a module replaced or wrapped afterwards shows as a changed child list
        self._structure = [(module, tuple(module._modules.values())) for module in transformer.modules()]

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

    def hidden_states(
        self, inputs: dict[str, torch.Tensor], deepest: int, wanted: Iterable[int]
    ) -> dict[int, torch.Tensor]:
        """``{k: hidden states after layer k}`` for each ``k`` in ``wanted`` (0: the embedding layer's
        output), running the embeddings and the first ``deepest`` layers. Padded positions hold values that
        pooling ignores, as in transformers' output. ``inputs`` holds ``input_ids``, ``attention_mask`` and
        optionally ``token_type_ids`` (:data:`INPUTS`)."""
        embeddings_inputs = {"input_ids": inputs["input_ids"]}
        if inputs.get("token_type_ids") is not None:
            embeddings_inputs["token_type_ids"] = inputs["token_type_ids"]
        hidden = self.transformer.embeddings(**embeddings_inputs)
        padding = inputs["attention_mask"] == 0
        wanted = set(wanted)
        states = {0: hidden} if 0 in wanted else {}
        for k in range(1, deepest + 1):
            hidden = self.layers[k - 1](hidden, src_key_padding_mask=padding)
            if k in wanted:
                states[k] = hidden
        return states
