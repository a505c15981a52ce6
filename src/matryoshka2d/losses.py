"""Training losses: base losses on embeddings, and the Matryoshka / Adaptive Layer / 2D Matryoshka wrappers.

Design: the trainer runs **one** forward pass per input column and gets the pooled, un-normalised
embedding of every layer it needs (:meth:`matryoshka2d.EmbeddingModel.forward` with ``layers=...``).
Losses receive those embeddings, never the model, so nothing is monkey-patched and nothing runs twice.

* A **base loss** (:class:`MultipleNegativesRankingLoss`, :class:`CoSENTLoss`, :class:`AnglELoss`,
  :class:`CosineSimilarityLoss`) is a pure function of one set of embeddings (one per input column) and
  the labels: :meth:`EmbeddingLoss.embedding_loss`.
* A **wrapper** (:class:`MatryoshkaLoss`, :class:`AdaptiveLayerLoss`, :class:`Matryoshka2dLoss`) picks
  (layer, dim) pairs for the step, truncates each layer's embeddings to the dim, re-normalises, and sums
  the weighted base losses; the adaptive-layer wrappers add a distillation term that pulls each prior
  layer towards the (detached) last layer (``distillation``: sentence-transformers' KL by default, or
  ``"relational"``, ``"cosine"``, ``"mse"``: :func:`distillation_term`), and the Matryoshka wrappers can
  make each dim prefix learn the full size's in-batch similarities (``dim_distillation``).
* **Several processes** (torchrun, accelerate): ``gather_across_devices=True`` on
  :class:`MultipleNegativesRankingLoss` / :class:`CoSENTLoss` / :class:`AnglELoss` compares examples of
  every process (:func:`gather_columns`); the wrappers then share rank 0's sampled plan. Distillation
  terms always use this process's batch.

Loss contract (what the trainer relies on)::

    layers = loss.layers_for_step(model.num_layers)          # once per step, before the forward
    outputs = [model(features, layers=layers) for features in columns]  # list of {layer: (batch, hidden)}
    value = loss(outputs, labels)                            # labels: (batch,) float tensor or None
    value.backward()

* ``layers_for_step`` returns the layer counts to compute this step (``0`` = the embedding layer output,
  ``num_layers`` = the last layer). Wrappers sample their (layer, dim) plan here with torch's global RNG
  (so ``torch.manual_seed`` makes training reproducible) and use it in the next ``forward``. A
  ``forward`` without a pending plan samples one itself, taking the deepest layer in ``outputs`` as the
  last layer.
* ``needs_labels`` / ``in_batch_negatives`` tell the trainer what data the loss expects (wrappers
  forward their base's values); ``config()`` is a JSON-serialisable description for model cards;
  ``check_model(model)`` validates dims and layers against a model before training starts.

Semantics follow sentence-transformers 6.x (``MatryoshkaLoss``, ``AdaptiveLayerLoss``,
``Matryoshka2dLoss``) so that, with sampling disabled, values and gradients match it (see
``tests/test_losses.py``). The one default that differs is :data:`INCLUDE_EMBEDDING_LAYER`.

References:
    - Matryoshka Representation Learning, Kusupati et al. 2022, https://arxiv.org/abs/2205.13147
    - 2D Matryoshka Sentence Embeddings (2DMSE), Li et al. 2024, https://arxiv.org/abs/2402.14776
    - Starbucks: Improved Training for 2D Matryoshka Embeddings, Zhuang et al. 2024,
      https://arxiv.org/abs/2410.13230
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from matryoshka2d.errors import InvalidDimError, InvalidInputError, InvalidLayersError
from matryoshka2d.validation import check_real

#: Whether the adaptive-layer wrappers may sample layer 0 (the embedding layer output, before any
#: transformer layer) as a prior layer. sentence-transformers does; we do not by default, because a
#: bag-of-token-embeddings "model" is rarely worth serving. Change it here (one place) or per loss.
INCLUDE_EMBEDDING_LAYER: bool = False

#: Prior-layer weighting schemes of the adaptive-layer wrappers: weight of layer count ``k``.
LAYER_WEIGHTINGS = {
    "uniform": lambda k: 1.0,  # 2DMSE and Starbucks papers
    "log": lambda k: 1.0 / (1.0 + math.log(1 + k)),  # ESE paper
    "linear": lambda k: 1.0 / (1 + k),  # sentence-transformers before it had this option
}

#: Forms of the layer distillation term of the adaptive-layer wrappers (``distillation=``): each prior
#: layer ``k`` learns from the detached last layer. See :func:`distillation_term`.
DISTILLATIONS = ("kl_logits", "relational", "cosine", "mse")

#: Forms of the dim distillation term of the Matryoshka wrappers (``dim_distillation=``): each trained
#: prefix learns from the detached full-size embedding of the same layer. See :func:`dim_distillation_term`.
DIM_DISTILLATIONS = ("relational", "mse")

LayerOutputs = Sequence[dict[int, Tensor]]


# ---------------------------------------------------------------------------------------- validation
def _number(value: object, name: str, minimum: float = 0.0, strict: bool = False) -> float:
    """A finite real number >= minimum (> minimum if strict), else InvalidInputError."""
    value = check_real(value, name, minimum=minimum)
    if strict and value == minimum:
        raise InvalidInputError(f"{name} must be a finite number > {minimum:g}, got {value:g}")
    return value


def _choice(value: object, name: str, choices: Sequence[str], allow_none: bool = False) -> str | None:
    """One of ``choices`` (or None if allowed), else InvalidInputError naming the choices."""
    if value is None and allow_none:
        return None
    if not isinstance(value, str) or value not in choices:
        allowed = [*choices, None] if allow_none else list(choices)
        raise InvalidInputError(f"{name} must be one of {allowed}, got {value!r}")
    return value


def _per_step(value: object, name: str) -> int:
    """-1 (all) or a positive int."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or not (value == -1 or value >= 1):
        raise InvalidInputError(f"{name} must be -1 (all) or a positive integer, got {value!r}")
    return int(value)


def _positive_int(value: object, error: type[Exception], what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise error(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _flag(value: object, name: str) -> bool:
    """True or False, else InvalidInputError (``1``, ``"yes"`` are refused, not guessed)."""
    if not isinstance(value, bool):
        raise InvalidInputError(f"{name} must be True or False, got {value!r}")
    return value


def _check_dims(dims: object) -> list[int]:
    if isinstance(dims, (str, bytes)) or not isinstance(dims, Sequence) or len(dims) == 0:
        raise InvalidDimError(
            f"dims must be a non-empty list of embedding sizes, e.g. [768, 256, 64]; got {dims!r}"
        )
    dims = [_positive_int(d, InvalidDimError, "every entry of dims") for d in dims]
    if len(set(dims)) != len(dims):
        raise InvalidDimError(f"dims has duplicates: {dims}")
    return dims


def _check_weights(weights: object, n: int, what: str) -> list[float]:
    if weights is None:
        return [1.0] * n
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) or len(weights) != n:
        raise InvalidInputError(f"weights must be a list of {n} numbers (one per {what}), got {weights!r}")
    return [_number(w, "every entry of weights") for w in weights]


def _sorted_dims(dims: object, weights: object) -> tuple[list[int], list[float]]:
    """Validated dims and weights, largest dim first (as sentence-transformers orders them)."""
    dims = _check_dims(dims)
    weights = _check_weights(weights, len(dims), "dim")
    order = sorted(range(len(dims)), key=lambda i: -dims[i])
    return [dims[i] for i in order], [weights[i] for i in order]


def _check_num_layers(num_layers: object) -> int:
    return _positive_int(num_layers, InvalidLayersError, "num_layers")


def _sample(n: int, k: int) -> list[int]:
    """``k`` distinct sorted indices out of ``range(n)`` (all of them if k == -1 or k >= n), torch RNG."""
    if k == -1 or k >= n:
        return list(range(n))
    return sorted(torch.randperm(n)[:k].tolist())


def _check_columns(
    embeddings: Sequence[Tensor], loss: str, exactly: int | None = None, at_least: int = 1
) -> int:
    """Validate a list of (batch, dim) embedding tensors; returns the batch size."""
    n = len(embeddings)
    if (exactly is not None and n != exactly) or n < at_least:
        wanted = f"exactly {exactly}" if exactly is not None else f"at least {at_least}"
        raise InvalidInputError(f"{loss} needs {wanted} input columns, got {n}")
    batch = embeddings[0].shape[0]
    for i, e in enumerate(embeddings):
        if e.ndim != 2 or e.shape[0] != batch:
            raise InvalidInputError(
                f"{loss}: column {i} has embeddings of shape {tuple(e.shape)}, expected ({batch}, dim)"
            )
    return batch


def _check_labels(labels: Tensor | None, batch: int, loss: str) -> Tensor:
    if labels is None:
        raise InvalidInputError(f"{loss} needs a score label for every example, got labels=None")
    if not isinstance(labels, Tensor) or labels.numel() != batch:
        shape = tuple(labels.shape) if isinstance(labels, Tensor) else type(labels).__name__
        raise InvalidInputError(f"{loss} needs one label per example ({batch}), got {shape}")
    return labels.reshape(-1).float()


# ---------------------------------------------------------------------------------------- processes
def _world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) when torch.distributed is not in use."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _AllGatherWithGrad(torch.autograd.Function):
    """``all_gather`` whose backward sends each process the summed gradient of its own rows.

    Forward: ``(world, *shape)``, every process's tensor in rank order. Backward: the gradients that all
    processes computed for the gathered tensor are summed (``all_reduce``) and each process keeps its
    own slice, so a process's embeddings receive the gradient of every process's loss.
    """

    @staticmethod
    def forward(ctx, tensor: Tensor) -> Tensor:
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        ctx.rank = dist.get_rank()
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank]


def _all_gather_rows(tensor: Tensor) -> list[Tensor]:
    """Every process's ``tensor`` (same trailing shape, any number of rows), in rank order, with autograd.

    The gradient that any process computes for another process's rows is sent back to that process and
    added to its own (:class:`_AllGatherWithGrad`), so each process's gradient covers every use of its
    embeddings. Row counts may differ between processes (rows are padded for the gather, then cut).
    """
    world = dist.get_world_size()
    count = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
    counts = [torch.zeros_like(count) for _ in range(world)]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    padded = tensor
    if max(sizes) > tensor.shape[0]:
        pad = tensor.new_zeros((max(sizes) - tensor.shape[0], *tensor.shape[1:]))
        padded = torch.cat([tensor, pad])
    parts = _AllGatherWithGrad.apply(padded)
    return [parts[r, :size] for r, size in enumerate(sizes)]


def gather_columns(columns: Sequence[Tensor]) -> tuple[list[Tensor], int]:
    """Each column's rows from every process, in rank order, and where this process's rows start.

    Column ``c`` of the result is ``[column c of rank 0; column c of rank 1; ...]``, so with local batch
    ``b`` on every process the rows of rank ``r`` start at ``r * b`` in every column: a local anchor ``i``
    of rank ``r`` has its positive at row ``r * b + i`` of the gathered positives column, and hard
    negatives (later columns) come from every process but are never labels. Without torch.distributed
    (or with one process) the columns come back unchanged with offset 0.

    Args:
        columns: this process's ``(batch, dim)`` tensors, one per input column (same batch size).

    Returns:
        ``(gathered columns, offset of this process's rows)``.
    """
    rank, world = _world()
    if world == 1:
        return list(columns), 0
    n = len(columns)
    parts = _all_gather_rows(torch.cat(list(columns)))  # one collective for all columns
    per_rank = [part.split(part.shape[0] // n) for part in parts]
    gathered = [torch.cat([chunks[c] for chunks in per_rank]) for c in range(n)]
    offset = sum(part.shape[0] // n for part in parts[:rank])
    return gathered, offset


def _gather_values(values: Tensor) -> Tensor:
    """A 1-d tensor's values from every process, in rank order (differentiable); unchanged in one process."""
    if _world()[1] == 1:
        return values
    return torch.cat(_all_gather_rows(values))


# ---------------------------------------------------------------------------------------- distillation
def _similarities(embeddings: Tensor) -> Tensor:
    """Cosine similarity of each of the ``n`` rows to the ``n - 1`` others: ``(n, n - 1)``, self left out."""
    if embeddings.shape[0] < 2:
        raise InvalidInputError(
            f"relational distillation needs at least 2 embeddings per step, got {embeddings.shape[0]}"
        )
    unit = F.normalize(embeddings.float(), dim=-1)
    n = unit.shape[0]
    sims = unit @ unit.T
    keep = ~torch.eye(n, dtype=torch.bool, device=sims.device)
    return sims[keep].view(n, n - 1)


def relational_kl(student_sims: Tensor, teacher_sims: Tensor, temperature: float) -> Tensor:
    """``KL(softmax(teacher / T) || softmax(student / T))`` per row, averaged over rows (batchmean).

    Args:
        student_sims, teacher_sims: ``(n, n - 1)`` similarities from :func:`_similarities`; the teacher's
            should be detached.
        temperature: ``T``; 0.05 makes the distributions as peaked as MNRL's scale 20.
    """
    return F.kl_div(
        F.log_softmax(student_sims / temperature, dim=-1),
        F.log_softmax(teacher_sims / temperature, dim=-1),
        reduction="batchmean",
        log_target=True,
    )


def distillation_term(form: str, student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """How far a prior layer's embeddings are from the last layer's (the teacher, detached here).

    ``student`` and ``teacher`` are the ``(n, hidden)`` pooled embeddings of every column of the step
    (rows in the same order). Forms:

    * ``"kl_logits"``: sentence-transformers' AdaptiveLayerLoss term, ``T * KL(softmax(t / T) ||
      softmax(s / T))`` over the *dimensions* of each normalised embedding (batchmean). On unit vectors of
      hundreds of dims both distributions are almost uniform, so the term is tiny.
    * ``"relational"``: ``KL(softmax(sim_t / T) || softmax(sim_s / T))`` where ``sim`` holds each
      embedding's cosine similarity to the other ``n - 1`` embeddings of the step: the prior layer learns
      the last layer's in-batch similarity distribution (its geometry), not its coordinates.
    * ``"cosine"``: mean over rows of ``1 - cos(s_i, t_i)``.
    * ``"mse"``: mean squared error between the raw (un-normalised) pooled embeddings.

    Args:
        form: one of :data:`DISTILLATIONS`.
        student: the prior layer's embeddings (gradients flow here).
        teacher: the last layer's embeddings (detached: no gradient flows into the teacher).
        temperature: ``T`` of the two KL forms.
    """
    teacher = teacher.detach()
    if form == "kl_logits":
        target = F.softmax(F.normalize(teacher, dim=-1) / temperature, dim=-1)
        log_p = F.log_softmax(F.normalize(student, dim=-1) / temperature, dim=-1)
        return temperature * F.kl_div(log_p, target, reduction="batchmean")
    if form == "relational":
        return relational_kl(_similarities(student), _similarities(teacher), temperature)
    if form == "cosine":
        return (1 - F.cosine_similarity(student.float(), teacher.float(), dim=-1)).mean()
    if form == "mse":
        return F.mse_loss(student.float(), teacher.float())
    raise InvalidInputError(f"distillation must be one of {list(DISTILLATIONS)}, got {form!r}")


def dim_distillation_term(form: str, prefix: Tensor, teacher_sims: Tensor, temperature: float) -> Tensor:
    """How far a dim prefix's in-batch similarities are from the full-size embedding's.

    Args:
        form: ``"relational"`` (KL between the softmax(sim / T) rows, as in :func:`relational_kl`) or
            ``"mse"`` (mean squared difference of the cosine similarities).
        prefix: the first ``d`` dims of the ``(n, hidden)`` embeddings of every column of the step.
        teacher_sims: :func:`_similarities` of the full-size embeddings of the same layer, detached.
        temperature: ``T`` of the relational form.
    """
    student_sims = _similarities(prefix)
    if form == "relational":
        return relational_kl(student_sims, teacher_sims, temperature)
    if form == "mse":
        return F.mse_loss(student_sims, teacher_sims)
    raise InvalidInputError(f"dim_distillation must be one of {list(DIM_DISTILLATIONS)}, got {form!r}")


# ---------------------------------------------------------------------------------------- base losses
class EmbeddingLoss(nn.Module):
    """Base class of the base losses: a function of the last layer's embeddings (and labels).

    Subclasses implement :meth:`embedding_loss`; :meth:`forward` takes the model outputs of the
    trainer (one ``{layer: embeddings}`` dict per input column) and applies it to the deepest layer.
    """

    needs_labels: bool = False
    in_batch_negatives: bool = False
    #: Whether the loss ranks the pairs of a batch against each other (a batch of one pair gives 0).
    ranks_pairs: bool = False
    #: Whether this loss compares examples across processes (see :func:`gather_columns`).
    gather_across_devices: bool = False
    #: The range its labels must lie in (None: any), checked by the trainer against the data.
    label_bounds: tuple[float, float] | None = None

    def layers_for_step(self, num_layers: int) -> list[int]:
        """Base losses only need the last layer."""
        return [_check_num_layers(num_layers)]

    def forward(self, outputs: LayerOutputs, labels: Tensor | None = None) -> Tensor:
        """Loss on the deepest layer of ``outputs`` (``outputs[i]`` is the model output of column i)."""
        _check_outputs(outputs)
        return self.embedding_loss([out[max(out)] for out in outputs], labels)

    def embedding_loss(self, embeddings: Sequence[Tensor], labels: Tensor | None) -> Tensor:
        """The loss of one set of embeddings: ``embeddings[i]`` is ``(batch, dim)`` for input column i.

        Embeddings need not be normalised (every base loss here is cosine-based).
        """
        raise NotImplementedError

    def check_model(self, model) -> None:
        """Validate the loss settings against a model (nothing to check for base losses)."""

    def settings(self) -> dict:
        return {}

    def config(self) -> dict:
        """Name and settings, JSON-serialisable (for model cards)."""
        return {"name": type(self).__name__, **self.settings()}

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.settings().items())


class MultipleNegativesRankingLoss(EmbeddingLoss):
    """In-batch negatives ranking loss (InfoNCE) for (anchor, positive[, negative...]) tuples.

    For each anchor, the scaled cosine similarity to its own positive must be the highest among all
    positives and negatives in the batch: cross-entropy over ``scale * cos(anchor_i, doc_j)``.

    Args:
        scale: inverse temperature (20 = temperature 0.05).
        symmetric: also rank anchors for each positive (doc -> query) and average the two directions,
            as sentence-transformers' ``MultipleNegativesSymmetricRankingLoss``.
        gather_across_devices: with several processes (torchrun, accelerate), rank each local anchor
            against the positives and hard negatives of *every* process (sentence-transformers'
            ``gather_across_devices``): ``processes x batch`` candidates per anchor instead of ``batch``.
            The gather is differentiable, so with every process holding the same batch size the loss
            averaged over processes and the DDP-averaged gradients equal one process's on the
            concatenated batch. Without torch.distributed (or in one process) it changes nothing.

    Inputs: 2 or more columns (anchor, positive, optional hard negatives); no labels. Batches should
    not repeat texts (the trainer's no-duplicates sampler), or duplicates count as false negatives.

    Reference: van den Oord et al. 2018, https://arxiv.org/abs/1807.03748
    """

    in_batch_negatives = True

    def __init__(
        self, scale: float = 20.0, symmetric: bool = False, gather_across_devices: bool = False
    ) -> None:
        super().__init__()
        self.scale = _number(scale, "scale", strict=True)
        self.symmetric = _flag(symmetric, "symmetric")
        self.gather_across_devices = _flag(gather_across_devices, "gather_across_devices")

    def embedding_loss(self, embeddings: Sequence[Tensor], labels: Tensor | None = None) -> Tensor:
        batch = _check_columns(embeddings, type(self).__name__, at_least=2)
        normalized = F.normalize(torch.cat(list(embeddings)), dim=-1)
        columns = list(normalized.split(batch))
        anchors = columns[0]
        offset = 0
        if self.gather_across_devices:
            columns, offset = gather_columns(columns)  # candidates of every process, in rank order
        # (batch, candidates): positives of rank r at r * batch .. (r + 1) * batch - 1, then the
        # hard-negative columns; the label of local anchor i is its own positive, offset + i.
        docs = torch.cat(columns[1:])
        scores = self.scale * anchors @ docs.T
        target = torch.arange(offset, offset + batch, device=scores.device)
        loss = F.cross_entropy(scores, target)
        if self.symmetric:  # each local positive against every anchor: its own anchor is offset + i
            positives = docs[offset : offset + batch]
            loss = (loss + F.cross_entropy(self.scale * positives @ columns[0].T, target)) / 2
        return loss

    def settings(self) -> dict:
        return {
            "scale": self.scale,
            "symmetric": self.symmetric,
            "gather_across_devices": self.gather_across_devices,
        }


class CoSENTLoss(EmbeddingLoss):
    """CoSENT: a ranking loss over all pairs of scored pairs in the batch.

    ``loss = log(1 + sum exp(scale * (s(k, l) - s(i, j))))`` over every two pairs where the label of
    ``(i, j)`` is higher than that of ``(k, l)``; ``s`` is the cosine similarity. Only the order of the
    labels matters, so any score range works (e.g. STS 0-5).

    Args:
        scale: inverse temperature.
        gather_across_devices: with several processes, rank the pairs of *every* process against each
            other (the scores and labels are gathered, differentiably): each process computes the loss
            of the concatenated batch, so the value and the DDP-averaged gradients equal one process's
            on that batch. Without torch.distributed (or in one process) it changes nothing.

    Inputs: 2 columns (sentence1, sentence2) and a float score per pair.

    Reference: Su 2022, https://kexue.fm/archives/8847 ; Huang et al., CoSENT (TASLP 2024).
    """

    needs_labels = True
    ranks_pairs = True

    def __init__(self, scale: float = 20.0, gather_across_devices: bool = False) -> None:
        super().__init__()
        self.scale = _number(scale, "scale", strict=True)
        self.gather_across_devices = _flag(gather_across_devices, "gather_across_devices")

    def similarity(self, a: Tensor, b: Tensor) -> Tensor:
        """Row-wise similarity of two ``(batch, dim)`` tensors: cosine."""
        return (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1)

    def embedding_loss(self, embeddings: Sequence[Tensor], labels: Tensor | None) -> Tensor:
        batch = _check_columns(embeddings, type(self).__name__, exactly=2)
        labels = _check_labels(labels, batch, type(self).__name__).to(embeddings[0].device)
        scores = self.scale * self.similarity(embeddings[0].float(), embeddings[1].float())
        if self.gather_across_devices:
            scores, labels = _gather_values(scores), _gather_values(labels.detach())
        diff = scores[:, None] - scores[None, :]  # diff[i, j] = s_i - s_j
        wrong_way = labels[:, None] < labels[None, :]  # i should score below j
        return torch.logsumexp(torch.cat([diff.new_zeros(1), diff[wrong_way]]), dim=0)

    def settings(self) -> dict:
        return {"scale": self.scale, "gather_across_devices": self.gather_across_devices}


class AnglELoss(CoSENTLoss):
    """AnglE: CoSENT with the angle similarity ``|cos(x, y) + sin(x, y)|`` of the normalised embeddings.

    The two halves of each embedding act as real and imaginary parts; this avoids the vanishing gradient
    of the cosine near +-1. Same inputs as :class:`CoSENTLoss` (pairs with a float score).

    Reference: Li and Li 2024, AoE: Angle-optimized Embeddings, https://arxiv.org/abs/2309.12871
    """

    def similarity(self, a: Tensor, b: Tensor) -> Tensor:
        a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
        if a.shape[-1] % 2:  # pair dimension i with i + dim/2; pad odd sizes with a zero
            a, b = F.pad(a, (0, 1)), F.pad(b, (0, 1))
        a_re, a_im = a.chunk(2, dim=-1)
        b_re, b_im = b.chunk(2, dim=-1)
        cos = (a * b).sum(-1)
        sin = (a_im * b_re - a_re * b_im).sum(-1)
        return (cos + sin).abs()


class CosineSimilarityLoss(EmbeddingLoss):
    """Mean squared error between ``cos(u, v)`` and the label of each pair.

    Inputs: 2 columns and a float score per pair, in the cosine's range (scale STS 0-5 scores to 0-1).
    :class:`CoSENTLoss` usually trains better; this is the classic baseline.
    """

    needs_labels = True
    label_bounds = (-1.0, 1.0)  # cosine targets

    def embedding_loss(self, embeddings: Sequence[Tensor], labels: Tensor | None) -> Tensor:
        batch = _check_columns(embeddings, type(self).__name__, exactly=2)
        labels = _check_labels(labels, batch, type(self).__name__).to(embeddings[0].device)
        return F.mse_loss(F.cosine_similarity(embeddings[0], embeddings[1], dim=-1), labels)


# ---------------------------------------------------------------------------------------- wrappers
def _check_outputs(outputs: LayerOutputs) -> None:
    if isinstance(outputs, dict) or not isinstance(outputs, Sequence) or not outputs:
        raise InvalidInputError(
            "outputs must be a non-empty list with one {layer: embeddings} dict per column"
        )
    for i, out in enumerate(outputs):
        if not isinstance(out, dict) or not out:
            raise InvalidInputError(f"outputs[{i}] must be a non-empty {{layer: embeddings}} dict")


@dataclass
class StepPlan:
    """What a wrapper computes in one step.

    Attributes:
        terms: ``(layer, dim, weight)``: add ``weight * base(truncate(layer's embeddings, dim))``;
            ``dim=None`` keeps the full size.
        kl_layers: layers pulled towards ``last_layer`` by the layer distillation term (the KL term of
            sentence-transformers by default; see ``distillation``).
        last_layer: the model's last layer (the distillation teacher).
    """

    terms: list[tuple[int, int | None, float]]
    kl_layers: list[int]
    last_layer: int

    @property
    def layers(self) -> list[int]:
        """Every layer the model must return for this plan."""
        needed = {layer for layer, _, _ in self.terms} | set(self.kl_layers)
        if self.kl_layers:
            needed.add(self.last_layer)
        return sorted(needed)


class _LayerDimLoss(nn.Module):
    """Shared machinery of the wrappers: a sampled :class:`StepPlan` per step, and its evaluation.

    Subclasses implement :meth:`plan` (what to train this step) and :meth:`settings`.
    """

    def __init__(self, base: EmbeddingLoss) -> None:
        super().__init__()
        if not isinstance(base, EmbeddingLoss):
            raise InvalidInputError(
                f"base must be a base loss (e.g. MultipleNegativesRankingLoss()), got {type(base).__name__}"
            )
        self.base = base
        self.needs_labels = base.needs_labels
        self.in_batch_negatives = base.in_batch_negatives
        self.ranks_pairs = base.ranks_pairs
        self.dims: list[int] = []  # dims to train; empty = the full size only
        self.weights: list[float] = []  # one per dim
        self.n_dims_per_step = -1
        self.dim_distillation: str | None = None
        self.dim_distillation_weight = 1.0
        self.relational_temperature = 0.05
        self._pending: StepPlan | None = None

    def _set_dim_distillation(self, form: object, weight: object) -> None:
        self.dim_distillation = _choice(form, "dim_distillation", DIM_DISTILLATIONS, allow_none=True)
        self.dim_distillation_weight = _number(weight, "dim_distillation_weight")

    # -- sampling
    def plan(self, num_layers: int) -> StepPlan:
        """This step's (layer, dim, weight) terms and KL layers, sampled with torch's global RNG."""
        raise NotImplementedError

    def check_layers(self, num_layers: int) -> None:
        """Raise InvalidLayersError if fixed layers of this loss do not exist in a model of ``num_layers``."""

    def layers_for_step(self, num_layers: int) -> list[int]:
        """Sample this step's plan (torch RNG) and return the layer counts the model must compute."""
        self._pending = self._synced_plan(_check_num_layers(num_layers))
        return self._pending.layers

    def _synced_plan(self, num_layers: int) -> StepPlan:
        """:meth:`plan`; when the base loss gathers across processes, rank 0's plan on every process.

        Processes gathering embeddings must run the same (layer, dim) terms in the same order (each
        term is a collective), but their random states can differ (e.g. dropout on different shapes).
        """
        plan = self.plan(num_layers)
        if self.base.gather_across_devices and _world()[1] > 1:
            shared = [plan]
            dist.broadcast_object_list(shared, src=0)
            plan = shared[0]
        return plan

    def _sample_dims(self, weight: float) -> list[tuple[int | None, float]]:
        """``n_dims_per_step`` of the dims (all if -1), each with ``weight * its dim weight``."""
        if not self.dims:
            return [(None, weight)]
        return [
            (self.dims[i], weight * self.weights[i]) for i in _sample(len(self.dims), self.n_dims_per_step)
        ]

    # -- evaluation
    def forward(self, outputs: LayerOutputs, labels: Tensor | None = None) -> Tensor:
        """Sum of the weighted base losses over this step's (layer, dim) pairs, plus the KL terms.

        Args:
            outputs: ``outputs[i]`` = ``model(features_of_column_i, layers=self.layers_for_step(...))``.
            labels: per-example labels for losses that need them, else None.
        """
        _check_outputs(outputs)
        plan, self._pending = self._pending, None
        if plan is None:  # used outside the trainer: plan from what is there
            plan = self._synced_plan(max(outputs[0]))
        missing = [k for k in plan.layers if any(k not in out for out in outputs)]
        if missing:
            raise InvalidLayersError(
                f"outputs lack layers {missing}: run the model with layers=loss.layers_for_step(num_layers) "
                "before every loss call"
            )
        batch, size = outputs[0][plan.layers[-1]].shape
        if self.dims and max(self.dims) > size:
            raise InvalidDimError(f"dims {self.dims} go above the model's embedding size {size}")

        # One (columns * batch, hidden) tensor per layer, so each (layer, dim) term normalises once.
        stacked = {k: torch.cat([out[k] for out in outputs]) for k in plan.layers}
        loss = stacked[plan.layers[-1]].new_zeros(())
        full_sims: dict[int, Tensor] = {}  # dim distillation teachers: full-size similarities per layer
        for layer, dim, weight in plan.terms:
            columns = F.normalize(stacked[layer][:, :dim], dim=-1).split(batch)
            loss = loss + weight * self.base.embedding_loss(columns, labels)
            if (
                self.dim_distillation is not None
                and self.dim_distillation_weight > 0
                and (dim or size) < size
            ):
                if layer not in full_sims:
                    full_sims[layer] = _similarities(stacked[layer].detach())
                loss = loss + self.dim_distillation_weight * dim_distillation_term(
                    self.dim_distillation,
                    stacked[layer][:, :dim],
                    full_sims[layer],
                    self.relational_temperature,
                )
        if plan.kl_layers:
            loss = loss + self._layer_distillation(stacked, plan)
        return loss

    def _layer_distillation(self, stacked: dict[int, Tensor], plan: StepPlan) -> Tensor:
        """``sum_k distillation_weight(k) * distillation_term(layer k, last layer)`` over the KL layers.

        The embeddings are the full-size ones of every column of this process's batch (the teacher,
        the last layer, is detached). The default form, ``"kl_logits"``, is sentence-transformers'
        ``T * KL(softmax(last / T) || softmax(layer / T))`` over the embedding dimensions (batchmean).
        """
        form = getattr(self, "distillation", "kl_logits")
        t = self.kl_temperature if form == "kl_logits" else self.relational_temperature
        teacher = stacked[plan.last_layer].detach()
        return sum(
            self.distillation_weight(k, plan.last_layer) * distillation_term(form, stacked[k], teacher, t)
            for k in plan.kl_layers
        )

    def distillation_weight(self, k: int, num_layers: int) -> float:
        """Weight of prior layer ``k``'s distillation term in a model of ``num_layers`` layers."""
        raise NotImplementedError

    # -- checks and description
    def check_model(self, model) -> None:
        """Validate dims (<= ``model.dim``) and any fixed layers (<= ``model.num_layers``) up front."""
        too_big = [d for d in self.dims if d > model.dim]
        if too_big:
            raise InvalidDimError(f"dims {too_big} are larger than the model's embedding size {model.dim}")
        self.check_layers(model.num_layers)
        if self.dims and model.dim not in self.dims:
            warnings.warn(
                f"dims {self.dims} do not include the model's full size {model.dim}: the full-size embedding "
                "is not trained",
                stacklevel=2,
            )

    def settings(self) -> dict:
        raise NotImplementedError

    def config(self) -> dict:
        """Name, base loss and settings, JSON-serialisable (for model cards)."""
        return {"name": type(self).__name__, "base": self.base.config(), **self.settings()}

    def extra_repr(self) -> str:
        return ", ".join(f"{key}={value!r}" for key, value in self.settings().items())


class MatryoshkaLoss(_LayerDimLoss):
    """Train the first ``d`` dims of the last layer's embeddings for several ``d`` (Matryoshka).

    ``loss = sum_d weight_d * base(normalize(embedding[:, :d]))`` over the dims used this step, plus,
    with ``dim_distillation``, ``dim_distillation_weight * D(prefix d, full size)`` for every trained
    ``d`` below the full size (:func:`dim_distillation_term`; the full-size teacher is detached).

    Args:
        base: the base loss, e.g. :class:`MultipleNegativesRankingLoss` or :class:`CoSENTLoss`.
        dims: embedding sizes to train, e.g. ``[768, 512, 256, 128, 64]``; include the full size.
        weights: one weight per dim (default 1 each).
        n_dims_per_step: how many dims to sample each step; -1 = all (default).
        dim_distillation: None (default, off), ``"relational"`` (each prefix learns the full-size
            embedding's in-batch similarity distribution, ``softmax(sim / relational_temperature)``) or
            ``"mse"`` (squared difference of the in-batch cosine similarities).
        dim_distillation_weight: weight of each prefix's distillation term.
        relational_temperature: temperature of the relational form (0.05 = MNRL's scale 20).

    Reference: Kusupati et al. 2022, https://arxiv.org/abs/2205.13147
    """

    def __init__(
        self,
        base: EmbeddingLoss,
        dims: Sequence[int],
        weights: Sequence[float] | None = None,
        n_dims_per_step: int = -1,
        dim_distillation: str | None = None,
        dim_distillation_weight: float = 1.0,
        relational_temperature: float = 0.05,
    ) -> None:
        super().__init__(base)
        self.dims, self.weights = _sorted_dims(dims, weights)
        self.n_dims_per_step = _per_step(n_dims_per_step, "n_dims_per_step")
        self.relational_temperature = _number(relational_temperature, "relational_temperature", strict=True)
        self._set_dim_distillation(dim_distillation, dim_distillation_weight)

    def plan(self, num_layers: int) -> StepPlan:
        return StepPlan([(num_layers, d, w) for d, w in self._sample_dims(1.0)], [], num_layers)

    def settings(self) -> dict:
        return {
            "dims": self.dims,
            "weights": self.weights,
            "n_dims_per_step": self.n_dims_per_step,
            "dim_distillation": self.dim_distillation,
            "dim_distillation_weight": self.dim_distillation_weight,
            "relational_temperature": self.relational_temperature,
        }


class AdaptiveLayerLoss(_LayerDimLoss):
    """Train sub-models of fewer layers at the full embedding size (the layer half of 2D Matryoshka).

    Every step trains the last layer plus ``n_layers_per_step`` sampled prior layers, and pulls each
    sampled prior layer towards the last layer with a distillation term::

        loss = last_layer_weight * base(last)
             + sum_{sampled prior k} [ prior_layers_weight * lw(k) / n_sampled * base(k)
                                       + kl_div_weight * dw(k) * D(k, last) ]

    ``lw`` is ``layer_weighting``; ``dw`` is ``distillation_weighting`` (1 by default); ``D`` is
    :func:`distillation_term` of form ``distillation``, on the full-size embeddings of all columns, with
    the last layer detached as the teacher. The default,
    ``"kl_logits"``, is ``kl_temperature * KL(softmax(last / T) || softmax(k / T))`` over the
    dimensions of the normalised embeddings (batchmean), sentence-transformers' ``AdaptiveLayerLoss``
    (values and gradients match it). ``"relational"`` makes layer k learn the last layer's in-batch
    similarity distribution instead; ``"cosine"`` and ``"mse"`` pull its embeddings towards the last
    layer's.

    Args:
        base: the base loss, e.g. :class:`MultipleNegativesRankingLoss`.
        n_layers_per_step: prior layers sampled per step (the last layer is always trained); -1 = all.
            Values above the number of prior layers use all of them.
        last_layer_weight: weight of the last layer's loss.
        prior_layers_weight: weight of the prior layers' losses.
        kl_div_weight: weight of the layer distillation term, whatever its form (0 disables it).
        kl_temperature: softmax temperature of the ``"kl_logits"`` form (0 disables that form).
        distillation: form of the layer distillation term, one of :data:`DISTILLATIONS`:
            ``"kl_logits"`` (default, sentence-transformers'), ``"relational"``, ``"cosine"``, ``"mse"``.
        relational_temperature: temperature ``T`` of the relational forms, ``softmax(cosine / T)``
            over the other embeddings of the step (0.05 = MNRL's scale 20).
        layer_weighting: prior-layer weights ``lw(k)`` by layer count ``k``: ``"uniform"`` (1),
            ``"log"`` (``1 / (1 + ln(1 + k))``) or ``"linear"`` (``1 / (1 + k)``).
        distillation_weighting: how the distillation weight is spread over the prior layers, one of
            the ``layer_weighting`` schemes: ``dw(k)`` is the scheme's weight of ``k`` divided by its
            mean over every prior layer the loss can train, so the total stays ``kl_div_weight`` per
            prior layer and ``"uniform"`` (default) is 1 for each. ``"linear"`` puts more of it on the
            shallowest exits (on 6 layers: 1.72 at layer 1 .. 0.57 at layer 5).
        include_embedding_layer: let layer 0 (the embedding layer output) be a prior layer, as
            sentence-transformers does (default: :data:`INCLUDE_EMBEDDING_LAYER`).

    Reference: 2DMSE, Li et al. 2024, https://arxiv.org/abs/2402.14776
    """

    def __init__(
        self,
        base: EmbeddingLoss,
        n_layers_per_step: int = 1,
        last_layer_weight: float = 1.0,
        prior_layers_weight: float = 1.0,
        kl_div_weight: float = 1.0,
        kl_temperature: float = 0.3,
        layer_weighting: str = "uniform",
        include_embedding_layer: bool | None = None,
        distillation: str = "kl_logits",
        relational_temperature: float = 0.05,
        distillation_weighting: str = "uniform",
    ) -> None:
        super().__init__(base)
        self.n_layers_per_step = _per_step(n_layers_per_step, "n_layers_per_step")
        self.last_layer_weight = _number(last_layer_weight, "last_layer_weight")
        self.prior_layers_weight = _number(prior_layers_weight, "prior_layers_weight")
        self.kl_div_weight = _number(kl_div_weight, "kl_div_weight")
        self.kl_temperature = _number(kl_temperature, "kl_temperature")
        self.distillation = _choice(distillation, "distillation", DISTILLATIONS)
        self.relational_temperature = _number(relational_temperature, "relational_temperature", strict=True)
        self.layer_weighting = _choice(layer_weighting, "layer_weighting", list(LAYER_WEIGHTINGS))
        self.distillation_weighting = _choice(
            distillation_weighting, "distillation_weighting", list(LAYER_WEIGHTINGS)
        )
        if include_embedding_layer is None:
            include_embedding_layer = INCLUDE_EMBEDDING_LAYER
        if not isinstance(include_embedding_layer, bool):
            raise InvalidInputError(
                f"include_embedding_layer must be True or False, got {include_embedding_layer!r}"
            )
        self.include_embedding_layer = include_embedding_layer

    @property
    def kl_enabled(self) -> bool:
        """Whether the layer distillation term is on (``kl_temperature`` 0 only turns off ``kl_logits``)."""
        if self.distillation == "kl_logits" and self.kl_temperature == 0:
            return False
        return self.kl_div_weight > 0

    def layer_weight(self, k: int) -> float:
        """``prior_layers_weight * lw(k)`` for prior layer ``k``."""
        return self.prior_layers_weight * LAYER_WEIGHTINGS[self.layer_weighting](k)

    def distillation_weight(self, k: int, num_layers: int) -> float:
        """``kl_div_weight * dw(k)``: the scheme's weight of ``k`` over its mean on the prior layers."""
        scheme = LAYER_WEIGHTINGS[self.distillation_weighting]
        # a schedule may name a layer outside them (layer 0 of a 1-layer model): then its own weight
        prior = self.prior_layers(num_layers) or [k]
        return self.kl_div_weight * scheme(k) * len(prior) / sum(scheme(j) for j in prior)

    def prior_layers(self, num_layers: int) -> list[int]:
        """Layer counts that may be sampled as prior layers: 1 (or 0) .. num_layers - 1."""
        return list(range(0 if self.include_embedding_layer else 1, num_layers))

    def plan(self, num_layers: int) -> StepPlan:
        terms = [(num_layers, d, w) for d, w in self._sample_dims(self.last_layer_weight)]
        candidates = self.prior_layers(num_layers)
        prior = [candidates[i] for i in _sample(len(candidates), self.n_layers_per_step)]
        for k in prior:
            terms += [(k, d, w) for d, w in self._sample_dims(self.layer_weight(k) / len(prior))]
        return StepPlan(terms, prior if self.kl_enabled else [], num_layers)

    def settings(self) -> dict:
        return {
            "n_layers_per_step": self.n_layers_per_step,
            "last_layer_weight": self.last_layer_weight,
            "prior_layers_weight": self.prior_layers_weight,
            "kl_div_weight": self.kl_div_weight,
            "kl_temperature": self.kl_temperature,
            "layer_weighting": self.layer_weighting,
            "include_embedding_layer": self.include_embedding_layer,
            "distillation": self.distillation,
            "relational_temperature": self.relational_temperature,
            "distillation_weighting": self.distillation_weighting,
        }


class Matryoshka2dLoss(AdaptiveLayerLoss):
    """2D Matryoshka: train sub-models of fewer layers *and* fewer dims, from one forward pass.

    Sampled mode (default, the 2DMSE recipe as in sentence-transformers' ``Matryoshka2dLoss``):
    :class:`AdaptiveLayerLoss` where each trained layer (the last one and the sampled prior ones) uses
    ``n_dims_per_step`` dims sampled independently, each term being ``w_d * base(normalize(emb[:, :d]))``::

        loss = last_layer_weight * sum_d w_d * base(last, d)
             + sum_{sampled prior k} [ prior_layers_weight * lw(k) / n_sampled * sum_d w_d * base(k, d)
                                       + kl_div_weight * D(k, last) ]
             + dim_distillation_weight * sum_{trained (k, d), d < full} Ddim((k, d), (k, full))

    ``D`` is the layer distillation term (``distillation``, default sentence-transformers' KL, see
    :class:`AdaptiveLayerLoss`); ``Ddim`` the optional dim distillation term (``dim_distillation``, see
    :class:`MatryoshkaLoss`): each trained prefix learns from the same layer's full-size embedding.

    ``n_layers_per_step=-1, n_dims_per_step=-1`` (or :meth:`all_pairs`) trains every layer at every dim
    each step.

    Schedule mode (``schedule=[(layers, dim), ...]``, the Starbucks recipe): exactly these pairs every
    step, no sampling, e.g. ``[(2, 32), (4, 64), (6, 128), (8, 256), (10, 512), (12, 768)]``. A pair at
    the last layer has weight ``last_layer_weight``, any other ``prior_layers_weight * lw(k)`` (summed,
    not averaged, as in the Starbucks code), each times its entry in ``weights``; every distinct prior
    layer in the schedule also gets the KL term (full-size embeddings, as in sampled mode).

    Args:
        base: the base loss, e.g. :class:`MultipleNegativesRankingLoss`.
        dims: embedding sizes to train (sampled mode), including the model size, e.g. [768, 256, 64].
        weights: one weight per dim (sampled mode) or per schedule pair (schedule mode); default 1.
        n_layers_per_step: prior layers sampled per step (default 1); -1 = all.
        n_dims_per_step: dims sampled per trained layer (default 1); -1 = all.
        schedule: fixed (layers, dim) pairs trained every step instead of sampling (then leave ``dims``,
            ``n_layers_per_step`` and ``n_dims_per_step`` unset).
        dim_distillation: None (off, default), ``"relational"`` or ``"mse"``, as in :class:`MatryoshkaLoss`.
        dim_distillation_weight: weight of each prefix's dim distillation term.
        **kwargs: the other options of :class:`AdaptiveLayerLoss` (``last_layer_weight``,
            ``prior_layers_weight``, ``kl_div_weight``, ``kl_temperature``, ``layer_weighting``,
            ``distillation_weighting``,
            ``include_embedding_layer``, ``distillation``, ``relational_temperature``).

    References:
        - 2DMSE, Li et al. 2024, https://arxiv.org/abs/2402.14776
        - Starbucks, Zhuang et al. 2024, https://arxiv.org/abs/2410.13230
    """

    def __init__(
        self,
        base: EmbeddingLoss,
        dims: Sequence[int] | None = None,
        weights: Sequence[float] | None = None,
        n_layers_per_step: int | None = None,
        n_dims_per_step: int | None = None,
        schedule: Sequence[tuple[int, int]] | None = None,
        dim_distillation: str | None = None,
        dim_distillation_weight: float = 1.0,
        **kwargs,
    ) -> None:
        if schedule is not None and (
            dims is not None or n_layers_per_step is not None or n_dims_per_step is not None
        ):
            raise InvalidInputError(
                "schedule fixes the (layers, dim) pairs: do not also pass dims, n_layers_per_step or "
                "n_dims_per_step"
            )
        if schedule is None and dims is None:
            raise InvalidDimError("Matryoshka2dLoss needs dims (e.g. [768, 256, 64]) or a schedule")
        n_layers_per_step = 1 if n_layers_per_step is None else n_layers_per_step
        super().__init__(base, n_layers_per_step=n_layers_per_step, **kwargs)
        self._set_dim_distillation(dim_distillation, dim_distillation_weight)
        self.schedule = None if schedule is None else _check_schedule(schedule)
        if self.schedule is not None:
            self.weights = _check_weights(weights, len(self.schedule), "schedule pair")
            self.dims = sorted({d for _, d in self.schedule}, reverse=True)
        else:
            self.dims, self.weights = _sorted_dims(dims, weights)
            self.n_dims_per_step = _per_step(
                1 if n_dims_per_step is None else n_dims_per_step, "n_dims_per_step"
            )

    @classmethod
    def all_pairs(cls, base: EmbeddingLoss, dims: Sequence[int], **kwargs) -> Matryoshka2dLoss:
        """Train every layer at every dim, every step (``n_layers_per_step = n_dims_per_step = -1``)."""
        return cls(base, dims, n_layers_per_step=-1, n_dims_per_step=-1, **kwargs)

    def check_layers(self, num_layers: int) -> None:
        if self.schedule is not None and max(k for k, _ in self.schedule) > num_layers:
            bad = [pair for pair in self.schedule if pair[0] > num_layers]
            raise InvalidLayersError(
                f"schedule pairs {bad} are out of range: the model has layers 0..{num_layers}"
            )

    def plan(self, num_layers: int) -> StepPlan:
        if self.schedule is None:
            return super().plan(num_layers)
        self.check_layers(num_layers)
        terms = [
            (k, d, w * (self.last_layer_weight if k == num_layers else self.layer_weight(k)))
            for (k, d), w in zip(self.schedule, self.weights, strict=True)
        ]
        kl_layers = sorted({k for k, _ in self.schedule if k < num_layers}) if self.kl_enabled else []
        return StepPlan(terms, kl_layers, num_layers)

    def settings(self) -> dict:
        settings = {
            **super().settings(),
            "dim_distillation": self.dim_distillation,
            "dim_distillation_weight": self.dim_distillation_weight,
        }
        if self.schedule is not None:
            del settings["n_layers_per_step"]
            return {"schedule": [list(pair) for pair in self.schedule], "weights": self.weights, **settings}
        return {
            "dims": self.dims,
            "weights": self.weights,
            "n_dims_per_step": self.n_dims_per_step,
            **settings,
        }


def _check_schedule(schedule: object) -> list[tuple[int, int]]:
    if isinstance(schedule, (str, bytes)) or not isinstance(schedule, Sequence) or not schedule:
        raise InvalidInputError(f"schedule must be a non-empty list of (layers, dim) pairs, got {schedule!r}")
    pairs = []
    for item in schedule:
        if isinstance(item, (str, bytes)) or not isinstance(item, Sequence) or len(item) != 2:
            raise InvalidInputError(f"every schedule entry must be a (layers, dim) pair, got {item!r}")
        k, d = item
        if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 0:
            raise InvalidLayersError(
                f"schedule pair {tuple(item)}: layers must be an integer >= 0, got {k!r}"
            )
        pairs.append((int(k), _positive_int(d, InvalidDimError, f"schedule pair {tuple(item)}: dim")))
    if len(set(pairs)) != len(pairs):
        raise InvalidInputError(f"schedule has duplicate pairs: {pairs}")
    return pairs


__all__ = [
    "INCLUDE_EMBEDDING_LAYER",
    "LAYER_WEIGHTINGS",
    "DISTILLATIONS",
    "DIM_DISTILLATIONS",
    "distillation_term",
    "dim_distillation_term",
    "relational_kl",
    "gather_columns",
    "EmbeddingLoss",
    "MultipleNegativesRankingLoss",
    "CoSENTLoss",
    "AnglELoss",
    "CosineSimilarityLoss",
    "StepPlan",
    "MatryoshkaLoss",
    "AdaptiveLayerLoss",
    "Matryoshka2dLoss",
]
