"""Bulk corpus encoding: ``m2d embed-corpus``.

One pass over a corpus (txt, jsonl, csv/tsv, parquet files; any size, bounded memory) writes Parquet
shards of ``(id, embedding)`` for every requested (layers, dim) cell plus a manifest, resumably and
atomically, in this process (``engine="local"``) or on a Ray cluster (``engine="ray"``, Ray Data actors).

- :func:`embed_corpus`: run or resume a job.
- :func:`read_manifest`, :func:`read_cell`: read a finished output back (ids and vectors of one cell).
- :mod:`.inputs`: input expansion, shard planning and reading; :mod:`.shards`: the output folder format;
  :mod:`.ray_engine`: the Ray Data engine.
"""

from matryoshka2d.corpus.job import DEFAULT_SHARD_ROWS, ENGINES, CorpusResult, embed_corpus
from matryoshka2d.corpus.shards import CorpusOutputError, cell_folder, read_cell, read_manifest

__all__ = [
    "DEFAULT_SHARD_ROWS",
    "ENGINES",
    "CorpusOutputError",
    "CorpusResult",
    "cell_folder",
    "embed_corpus",
    "read_cell",
    "read_manifest",
]
