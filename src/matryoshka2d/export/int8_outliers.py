"""Outlier channels kept in float32 when a graph is quantised to int8 (:func:`split_outlier_channels`).

ONNX Runtime's dynamic quantisation gives each MatMul input tensor one uint8 scale per run, from the
tensor's range. BERT-family encoders have a few activation channels tens of times larger than the rest,
mostly on the ``[SEP]`` / ``</s>`` and ``[CLS]`` / ``<s>`` tokens (the feed-forward output projection's
input, the attention LayerNorm's output): the scale follows them and the other channels round to a few
levels. Measured on all-mpnet-base-v2 (STSB validation sentences): the feed-forward input of its eighth
layer ranges to ~97 where 99.9% of values stay below ~2.4 and the median is ~0.08, so the int8
embeddings have a median cosine of only 0.888 to float32 (lowest 0.55) while STSB Spearman hardly moves:
an index mixing int8 queries with float32 documents would be broken.

The fix is the decomposition of LLM.int8() (Dettmers et al., 2022, arXiv 2208.07339) done in the graph: for
each such MatMul, the channels whose calibrated range is more than ``ratio`` times the median channel range
are zeroed in the quantised product's input and computed in float32 by a small side product with their
rows of the weight (``X W = (X * keep) W + X[:, out] W[out, :]``). The float32 graph after the split gives
the same output (a rewrite, not an approximation); only its int8 version changes. The calibration needs a
few sentences of any kind (:data:`CALIBRATION_TEXTS`, written for this; the channels are the same for other
text: these 16 sentences and 512 STSB training sentences gave the same STSB validation figures). Figures
and the choice of :data:`OUTLIER_RATIO`: docs/BENCHMARKS.md, "int8 with the outlier channels in float32".
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Container, Mapping, Sequence
from pathlib import Path

import numpy as np

from matryoshka2d.errors import InvalidInputError

#: Sentences the outlier channels are calibrated on (any text works: the outliers sit on the special tokens
#: and on a few fixed channels). Varied on purpose: lengths, punctuation, digits, a question, a fragment.
CALIBRATION_TEXTS: tuple[str, ...] = (
    "The cat sat on the mat.",
    "How do I reset my password?",
    "Stock markets fell sharply on Monday after the report.",
    "A man is playing a guitar on stage.",
    "Water boils at 100 degrees Celsius at sea level.",
    "I can't believe it's already December!",
    "The committee will meet again next week to discuss the budget, the schedule and the new hires.",
    "Two dogs run through a field.",
    "Please send me the invoice by Friday.",
    "What is the capital of Australia?",
    'She said, "that is not what I meant."',
    "Error 404: page not found",
    "Photosynthesis converts light energy into chemical energy stored in glucose.",
    "He quickly ran home; it was raining.",
    "ok",
    "Version 2.3.1 fixes 12 bugs and adds support for three new file formats.",
)

#: A channel is an outlier when its calibrated range is more than this many times the median channel's.
#: Chosen on STSB validation (benchmarks/bench_int8_outliers.py, docs/BENCHMARKS.md): at 24,
#: all-mpnet-base-v2's int8 embeddings go from a median cosine of 0.888 to float32 to 0.990 (8: 0.997, at
#: more float32 side products) while all-MiniLM-L6-v2, whose largest channels stay below 23x the median
#: (plain int8 already 0.993), is left as ONNX Runtime quantises it: at 8 it gained 0.004 of median cosine
#: and lost ~8-10% of its int8 speed to the extra operators.
OUTLIER_RATIO = 24.0
#: Graph metadata key recording how many channels of how many MatMul inputs were split.
OUTLIERS_KEY = "matryoshka2d.int8_outliers"
_PREFIX = "m2d_outliers"


def calibration_feeds(
    model, input_names: Sequence[str], texts: Sequence[str] = CALIBRATION_TEXTS
) -> list[dict]:
    """One padded batch of ``texts`` as the graph's int64 inputs, tokenised by ``model`` (an
    :class:`~matryoshka2d.encoder.Encoder`: lower-casing and truncation as for encoding, and padded as
    encoding pads, by :meth:`~matryoshka2d.encoder.Encoder.pad`: a tokenizer without a pad token, which
    cannot pad itself, works too)."""
    from matryoshka2d.encoder import Encoder

    texts = list(texts)
    padded = Encoder.pad(model, model.tokenize(texts, padding=False), range(len(texts)))  # numpy arrays
    return [{name: np.asarray(padded[name], dtype=np.int64) for name in input_names}]


def read_outlier_record(source) -> dict | None:
    """What :func:`split_outlier_channels` recorded in a graph (``ratio``, ``tensors``, ``channels``), or
    None for a graph quantised without it. ``source``: the graph's path, or the graph already loaded."""
    from matryoshka2d.export.onnx import load_graph_header

    graph = load_graph_header(source) if isinstance(source, (str, os.PathLike)) else source
    entry = next((e.value for e in graph.metadata_props if e.key == OUTLIERS_KEY), None)
    return None if entry is None else json.loads(entry)


def _weight_matmuls(graph) -> dict[str, list]:
    """MatMul nodes with a 2-D constant weight, grouped by their input tensor (computed in the graph: a
    graph input cannot be measured as an extra output, and a transformer has none of those)."""
    weights = {t.name for t in graph.graph.initializer if len(t.dims) == 2}
    constant = {t.name for t in graph.graph.initializer} | {i.name for i in graph.graph.input}
    groups: dict[str, list] = {}
    for node in graph.graph.node:
        if node.op_type == "MatMul" and node.input[1] in weights and node.input[0] not in constant:
            groups.setdefault(node.input[0], []).append(node)
    return groups


def _channel_ranges(
    path: Path,
    graph,
    inputs: Sequence[str],
    feeds: Sequence[Mapping[str, np.ndarray]],
    threads: int | None = None,
) -> dict[str, np.ndarray]:
    """Largest absolute value per channel (last axis) of the tensors ``inputs`` of the graph at ``path``
    over the calibration ``feeds``: ``{tensor: float32 array}``.

    ``graph`` is that graph loaded without its weights; its outputs are replaced by those tensors (it is
    used up) and ONNX Runtime runs it, written beside ``path`` so that it refers to ``path``'s data file
    instead of holding the weights again, and removed afterwards. ``threads``: ONNX Runtime intra-op
    threads (default: its own choice).
    """
    import onnx
    import onnxruntime as ort

    del graph.graph.output[:]
    for name in inputs:
        graph.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    probe = path.with_name(f".{path.stem}.m2d-calibration-{os.getpid()}-{threading.get_ident()}.onnx")
    try:
        onnx.save(graph, str(probe))
        del graph
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if threads:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(str(probe), options, providers=["CPUExecutionProvider"])
    finally:
        probe.unlink(missing_ok=True)  # the session has read it
    ranges: dict[str, np.ndarray] = {}
    for feed in feeds:
        for name, value in zip(inputs, session.run(list(inputs), dict(feed))):
            peak = np.abs(value).reshape(-1, value.shape[-1]).max(0)
            ranges[name] = peak if name not in ranges else np.maximum(ranges[name], peak)
    return ranges


def outlier_channels(ranges: np.ndarray, ratio: float = OUTLIER_RATIO) -> np.ndarray:
    """Indices of the channels whose range passes ``ratio`` x the median range, largest first, at most a
    32nd of the channels (the largest: a bound on the float32 work). None where the median range is 0
    (mostly inactive channels, as after a ReLU: nothing to compare with)."""
    median = float(np.median(ranges))
    if median <= 0:
        return np.zeros(0, dtype=np.int64)
    order = np.argsort(-ranges, kind="stable")
    picked = order[ranges[order] > ratio * median]
    return picked[: max(1, ranges.shape[0] // 32)]


def _bias_add(matmul, consumers: dict[str, list], initializers: Container[str]):
    """The Add of a constant that is the only consumer of ``matmul``'s output (its bias), else None."""
    (output,) = matmul.output
    users = consumers.get(output, [])
    if len(users) == 1 and users[0].op_type == "Add":
        other = [name for name in users[0].input if name != output]
        if len(other) == 1 and other[0] in initializers:
            return users[0]
    return None


def split_outlier_channels(
    source: str | Path,
    path: str | Path,
    feeds: Sequence[Mapping[str, np.ndarray]],
    ratio: float = OUTLIER_RATIO,
    threads: int | None = None,
) -> tuple[list[str], dict]:
    """Write to ``path`` the float32 graph ``source`` with the outlier input channels of its weight MatMuls
    moved to float32 side products (module docstring); same outputs as ``source``.

    Args:
        source: a float32 ``.onnx`` file (its data file beside it).
        path: where to write the rewritten graph (weights in ``<path>_data``; not atomically: a private
            folder is expected, as :func:`~matryoshka2d.export.onnx.quantize_int8` gives it). A copy of
            ``source`` without its weights is written beside ``source`` while calibrating, then removed.
        feeds: calibration batches (:func:`calibration_feeds`).
        ratio: :data:`OUTLIER_RATIO`.
        threads: ONNX Runtime intra-op threads for the calibration run (default: its own choice).

    Returns:
        The names of the nodes added, which must stay in float32 (``nodes_to_exclude`` of the quantiser),
        and what was split (``ratio``, ``tensors``, ``channels``: also in the graph's metadata).
    """
    import onnx
    from onnx import helper, numpy_helper

    from matryoshka2d.export.onnx import load_graph_header

    source, path = Path(source), Path(path)
    if not ratio > 0:
        raise InvalidInputError(f"the outlier ratio must be a positive number, got {ratio!r}")
    header = load_graph_header(source)
    groups = _weight_matmuls(header)
    ranges = _channel_ranges(source, header, list(groups), feeds, threads) if groups else {}
    graph = onnx.load(str(source))  # with its weights, after the measurement
    groups = _weight_matmuls(graph)
    weights = {t.name: t for t in graph.graph.initializer}
    split = {x: channels for x in groups if len(channels := outlier_channels(ranges[x], ratio))}
    added: list[str] = []
    before: dict[int, list] = {}  # id of the first consumer -> nodes to insert before it
    after: dict[int, list] = {}  # id of a MatMul (or of its bias Add) -> nodes to insert after it
    consumers: dict[str, list] = {}
    for node in graph.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for g, (x, channels) in enumerate(split.items()):
        base = f"{_PREFIX}/{g}"
        keep = np.ones(ranges[x].shape[0], dtype=np.float32)
        keep[channels] = 0.0
        graph.graph.initializer.extend(
            [
                numpy_helper.from_array(keep, f"{base}/keep"),
                numpy_helper.from_array(channels.astype(np.int64), f"{base}/channels"),
            ]
        )
        head = [
            helper.make_node("Mul", [x, f"{base}/keep"], [f"{base}/main_input"], name=f"{base}/mask"),
            helper.make_node(
                "Gather", [x, f"{base}/channels"], [f"{base}/outlier_input"], axis=-1, name=f"{base}/gather"
            ),
        ]
        before[id(groups[x][0])] = head
        added += [n.name for n in head]
        for j, node in enumerate(groups[x]):
            rows = numpy_helper.to_array(weights[node.input[1]])[channels]
            graph.graph.initializer.append(
                numpy_helper.from_array(np.ascontiguousarray(rows), f"{base}/weight_{j}")
            )
            node.input[0] = f"{base}/main_input"
            # The side product joins after the bias Add where there is one, so that ONNX Runtime still fuses
            # MatMul + bias into one quantised operator.
            anchor = _bias_add(node, consumers, weights) or node
            out = anchor.output[0]
            anchor.output[0] = f"{out}/{_PREFIX}_main"
            tail = [
                helper.make_node(
                    "MatMul",
                    [f"{base}/outlier_input", f"{base}/weight_{j}"],
                    [f"{out}/{_PREFIX}_side"],
                    name=f"{base}/side_{j}",
                ),
                helper.make_node(
                    "Add", [anchor.output[0], f"{out}/{_PREFIX}_side"], [out], name=f"{base}/add_{j}"
                ),
            ]
            after[id(anchor)] = tail
            added += [n.name for n in tail]
    nodes = []
    for node in graph.graph.node:  # topological order kept: the new nodes sit beside the MatMuls they serve
        nodes += before.get(id(node), []) + [node] + after.get(id(node), [])
    del graph.graph.node[:]
    graph.graph.node.extend(nodes)
    record = {"ratio": ratio, "tensors": len(split), "channels": int(sum(len(c) for c in split.values()))}
    entry = graph.metadata_props.add()
    entry.key, entry.value = OUTLIERS_KEY, json.dumps(record)
    onnx.save(graph, str(path), save_as_external_data=True, location=path.name + "_data")
    return added, record
