"""Exit rotations: put each layer exit's principal directions first, so its small dim prefixes keep more.

Matryoshka training orders the last layer's coordinates well (its first d dims are about as good as any d
directions of that embedding), but in a short schedule it leaves the earlier layer exits far from that:
their first 32 or 64 dims hold much less than their best 32 or 64 directions. An orthogonal rotation R_k
of exit k fixes that after training, with no change to the weights:

- fit: the unit-length embeddings X of a few thousand training sentences at exit k; the eigenvectors of
  XᵀX, largest eigenvalue first (uncentred PCA), are the rows of R_k. No centring, so R_k is a pure
  rotation: every full-size cosine is unchanged, only what the first d dims hold changes.
- use: exit k's pooled embedding x becomes ``R_k x`` before its dims are cut
  (:meth:`EmbeddingModel.set_exit_rotations <matryoshka2d.model.EmbeddingModel.set_exit_rotations>`); it
  costs one (hidden x hidden) product per text after pooling.

By default only the exits before the last are rotated: at the last layer the trained prefix is already
as good as its principal subspace (a rotation measured slightly worse there; docs/RECIPE.md). ``m2d
rotate`` is the command.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from matryoshka2d.encoder import check_texts
from matryoshka2d.errors import InvalidInputError, InvalidLayersError
from matryoshka2d.truncation import check_layers


def sample_texts(texts: Sequence[str], max_texts: int, seed: int = 0) -> list[str]:
    """The distinct texts of ``texts`` (first occurrence order), at most ``max_texts`` of them: a fixed
    random sample (``seed``), so the same files always give the same rotations."""
    texts = list(dict.fromkeys(texts))
    if len(texts) <= max_texts:
        return texts
    keep = np.sort(np.random.default_rng(seed).choice(len(texts), max_texts, replace=False))
    return [texts[i] for i in keep]


def principal_rotation(embeddings: np.ndarray) -> torch.Tensor:
    """The orthogonal matrix whose rows are the principal directions of ``embeddings``, largest first.

    Args:
        embeddings: ``(n, hidden)`` vectors; each row is scaled to unit length first (cosine geometry).

    Returns:
        float32 ``(hidden, hidden)`` R with ``R @ R.T = I``; row i is the eigenvector of XᵀX with the i-th
        largest eigenvalue (uncentred), its sign chosen so that its largest-magnitude entry is positive
        (the same data gives the same matrix).
    """
    x = np.asarray(embeddings, dtype=np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise InvalidInputError(f"expected a non-empty (n, hidden) array of embeddings, got shape {x.shape}")
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    x = x / np.where(norms > 0, norms, 1.0)
    _, vectors = np.linalg.eigh(x.T @ x)  # ascending eigenvalues
    rows = vectors[:, ::-1].T.copy()
    signs = np.sign(rows[np.arange(len(rows)), np.abs(rows).argmax(axis=1)])
    rows *= np.where(signs == 0, 1.0, signs)[:, None]
    return torch.from_numpy(rows).float()


def fit_exit_rotations(
    model,
    texts: Sequence[str],
    layers: int | Sequence[int] | None = None,
    batch_size: int = 32,
    show_progress: bool | None = None,
) -> dict[int, torch.Tensor]:
    """Fit a rotation per layer exit on ``texts`` (see the module docstring); the model is not changed.

    A model that already has a rotation at an exit is fitted on its rotated embeddings and the result is
    composed with it, so the returned matrix always acts on the un-rotated pooled embedding.

    Args:
        model: an :class:`~matryoshka2d.model.EmbeddingModel`.
        texts: training sentences (at least ``model.hidden_size``, so that every direction is estimated;
            a few thousand are plenty; never the evaluation data).
        layers: the exit(s) to rotate, a layer count or a list (default: every exit but the last,
            ``1..num_layers - 1``).
        batch_size: texts per forward pass.
        show_progress: a tqdm bar (default: for more than 20 batches).

    Returns:
        ``{k: float32 (hidden, hidden) rotation}`` for every requested exit: pass it (merged with
        ``model.exit_rotations`` if you keep others) to ``model.set_exit_rotations``.

    Raises:
        InvalidInputError: fewer distinct texts than ``hidden_size``, or no texts.
        InvalidLayersError: a layer count out of range.
    """
    texts = list(dict.fromkeys(check_texts(texts)))
    if len(texts) < model.hidden_size:
        raise InvalidInputError(
            f"fitting exit rotations needs at least {model.hidden_size} distinct texts (the embedding "
            f"size), got {len(texts)}: pass a few thousand training sentences"
        )
    if layers is None:
        layers = range(1, model.num_layers)
    elif isinstance(layers, (int, np.integer)) and not isinstance(layers, bool):
        layers = [layers]
    elif isinstance(layers, str) or not isinstance(layers, Iterable):
        raise InvalidLayersError(f"layers must be a layer count or a list of them, got {layers!r}")
    ks = sorted({check_layers(k, model.num_layers) for k in layers})
    if not ks:
        raise InvalidInputError(
            f"no layer exit to rotate: the model has {model.num_layers} layer(s) and the last one is not "
            "rotated by default (pass layers=[...] to choose)"
        )
    pooled = model.encode_layers(texts, ks, batch_size=batch_size, show_progress=show_progress)
    current = model.exit_rotations
    fitted = {}
    for k in ks:
        rotation = principal_rotation(pooled[k])
        if k in current:  # pooled[k] is already rotated: compose, so the result acts on the raw exit
            rotation = rotation @ current[k].cpu()  # exit_rotations: float32 copies
        fitted[k] = rotation
    return fitted
