"""Peak memory of streaming encoding (``EmbeddingModel.iter_encode``) for 100k vs 1M short texts.

Each size runs in a fresh subprocess that streams texts from a generator through ``iter_encode`` and keeps
only a running checksum, so its peak RSS is what the streaming encoder itself holds. Memory must stay
bounded: 10x the texts may not cost ~10x the memory.

The model is all-MiniLM-L6-v2's tokenizer and vocabulary with a small randomly initialised 1-layer BERT
(hidden size 64): tokenising, sorting, padding and batching are exactly the real path, while the forward
pass is cheap enough for 1M texts on 2 cores. Texts are STSB test sentences with a running number
appended (so no two are equal).

    python benchmarks/bench_memory.py            # 100k and 1M
    python benchmarks/bench_memory.py --sizes 10000,100000
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))

from common import minilm_path, stsb_sentences  # noqa: E402


def child(size: int) -> None:
    import numpy as np
    import torch
    import transformers as tf

    from matryoshka2d import EmbeddingModel

    torch.set_num_threads(1)  # memory, not speed, is measured here: keep clear of other jobs
    tokenizer = tf.AutoTokenizer.from_pretrained(minilm_path())
    config = tf.BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=128,
        max_position_embeddings=512,
    )
    torch.manual_seed(0)
    model = EmbeddingModel(
        tf.BertModel(config, add_pooling_layer=False).eval(), tokenizer, max_seq_length=128
    )
    sentences = stsb_sentences()
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def texts():
        for i in range(size):
            yield f"{sentences[i % len(sentences)]} ({i})"

    start = time.perf_counter()
    rows, checksum = 0, 0.0
    for batch in model.iter_encode(texts(), layers=1, dims=[64, 16], batch_size=64, show_progress=False):
        rows += batch.size
        checksum += float(np.sum(batch[(1, 16)][:, 0]))
    seconds = time.perf_counter() - start
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(
        json.dumps({"size": rows, "seconds": seconds, "peak_rss_mb": peak / 1024, "base_rss_mb": base / 1024})
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100000,1000000")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child)
        return
    results = []
    for size in [int(s) for s in args.sizes.split(",")]:
        out = subprocess.run([sys.executable, __file__, "--child", str(size)], capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(out.stderr)
        results.append(json.loads(out.stdout.strip().splitlines()[-1]))
        r = results[-1]
        peak, base = r["peak_rss_mb"], r["base_rss_mb"]
        print(
            f"{r['size']:>9,} texts: peak RSS {peak:7.0f} MB (after loading: {base:.0f} MB, "
            f"streaming adds {peak - base:.0f} MB), {r['size'] / r['seconds']:,.0f} texts/s"
        )
    if len(results) >= 2:
        a, b = results[0], results[-1]
        added_a = max(a["peak_rss_mb"] - a["base_rss_mb"], 1)
        added_b = b["peak_rss_mb"] - b["base_rss_mb"]
        print(
            f"{b['size'] / a['size']:.0f}x the texts -> "
            f"{b['peak_rss_mb'] / a['peak_rss_mb']:.2f}x the peak RSS "
            f"({added_b / added_a:.2f}x the memory added by streaming)"
        )


if __name__ == "__main__":
    main()
