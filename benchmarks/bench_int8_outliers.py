"""int8 with the outlier channels in float32 against ONNX Runtime's plain dynamic int8: quality and speed.

Three graphs of one model, each cut to the full and the half layer count exactly as the ONNX backend cuts
them: float32, plain dynamic int8 (``quantize_int8`` without calibration: every channel quantised, what
sentence-transformers' ``export_dynamic_quantized_onnx_model`` does) and the backend's int8 (outlier
channels split off in float32, :mod:`matryoshka2d.export.int8_outliers`). Quality: STSB Spearman of each
graph and the cosine of each int8 embedding to the float32 one (lowest and median over the split's
distinct sentences); validation by default, ``--test`` adds the test split (report it once, after the
choice). Speed: the same pre-tokenised batches of the STSB test sentences (sorted longest first, batch
32), 2 threads, the backend's session settings, rounds whose order rotates; the ratio split / plain is
taken within each round, then the median.

    flock /tmp/m2d-heavy.lock python benchmarks/bench_int8_outliers.py --model mpnet [--rounds 5] [--test]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, minilm_path, mpnet_path, save_results, sorted_feeds, stsb_sentences  # noqa: E402

from matryoshka2d.backends.onnx import OnnxEncoder  # noqa: E402
from matryoshka2d.data import data_dir, load_sts  # noqa: E402
from matryoshka2d.export.int8_outliers import OUTLIER_RATIO, calibration_feeds  # noqa: E402
from matryoshka2d.export.onnx import exit_output_name, extract_exits, quantize_int8  # noqa: E402
from matryoshka2d.pooling import pool_numpy  # noqa: E402
from matryoshka2d.truncation import truncate_dims  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["minilm", "mpnet"], default="minilm")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--test", action="store_true", help="also the STSB test split (once, after the choice)"
    )
    parser.add_argument(
        "--ratios",
        default=f"{OUTLIER_RATIO:g}",
        help=f"outlier ratios to compare with plain int8 (the backend's: {OUTLIER_RATIO:g})",
    )
    parser.add_argument("--out", default=None, help="default benchmarks/results/int8-outliers-MODEL.json")
    args = parser.parse_args()
    model = minilm_path() if args.model == "minilm" else mpnet_path()
    if model is None:
        sys.exit("all-mpnet-base-v2 is not available: see benchmarks/common.py")
    fp32 = OnnxEncoder(model, threads=args.threads)
    counts = [fp32.num_layers, fp32.num_layers // 2]
    ratios = [float(r) for r in args.ratios.split(",")]
    labels = ["int8 plain"] + [f"int8 split {r:g}" for r in ratios]
    print(f"machine: {machine()}; {args.model}", flush=True)

    with tempfile.TemporaryDirectory(dir=fp32.cache.parent) as scratch:
        with fp32._cache_lock():
            full = fp32._full_graph()
        feeds = calibration_feeds(fp32, fp32.input_names)
        sessions = {("float32", k): fp32.session(k) for k in counts}
        for label, ratio in zip(labels, [None] + ratios):
            stem = label.replace(" ", "-")
            graph = quantize_int8(
                full,
                Path(scratch) / f"{stem}.onnx",
                external=True,
                calibration=None if ratio is None else feeds,
                outlier_ratio=ratio,
            )
            for k in counts:
                cut = extract_exits(graph, k, Path(scratch) / f"{stem}-{k}.onnx")
                options = fp32.session(k).get_session_options()  # the backend's settings
                sessions[(label, k)] = ort.InferenceSession(
                    str(cut), options, providers=["CPUExecutionProvider"]
                )

        def embed(label: str, k: int, order: list[int], feeds: list[dict]) -> np.ndarray:
            session, out = sessions[(label, k)], exit_output_name(k)
            rows = [
                pool_numpy(session.run([out], f)[0], f["attention_mask"], fp32.pooling_mode) for f in feeds
            ]
            emb = np.empty((len(order), fp32.hidden_size), dtype=np.float32)
            emb[order] = np.concatenate(rows)
            return truncate_dims(emb, None, normalize=True)

        report: dict = {
            "date": time.strftime("%Y-%m-%d"),
            "machine": machine(),
            "model": args.model,
            "quality": {},
        }
        for name in ["validation"] + (["test"] if args.test else []):
            sts = load_sts(data_dir() / "stsb" / f"{name}.tsv")
            texts = list(dict.fromkeys(sts.sentence1 + sts.sentence2))
            order, feeds = sorted_feeds(fp32, texts)
            position = {text: i for i, text in enumerate(texts)}
            a = [position[t] for t in sts.sentence1]
            b = [position[t] for t in sts.sentence2]
            for k in counts:
                reference = embed("float32", k, order, feeds)
                for label in ["float32"] + labels:
                    emb = embed(label, k, order, feeds)
                    cos = (emb * reference).sum(1)
                    rho = 100 * spearmanr((emb[a] * emb[b]).sum(1), sts.scores).statistic
                    row = {
                        "spearman": round(float(rho), 2),
                        "cos_min": round(float(cos.min()), 4),
                        "cos_median": round(float(np.median(cos)), 4),
                    }
                    report["quality"][f"{name} {label} @ {k}"] = row
                    print(
                        f"  STSB {name}, {label} at {k} layers: Spearman {row['spearman']:.2f}, "
                        f"cosine to float32 lowest {row['cos_min']:.4f}, median {row['cos_median']:.4f}",
                        flush=True,
                    )

        _, feeds = sorted_feeds(fp32, stsb_sentences("test"))
        n = sum(len(f["input_ids"]) for f in feeds)
        keys = [(label, k) for k in counts for label in labels]
        rates: dict = {key: [] for key in keys}
        for key in keys:  # warm-up
            sessions[key].run([exit_output_name(key[1])], feeds[0])
        for round_ in range(args.rounds):
            shift = round_ % len(keys)
            for label, k in keys[shift:] + keys[:shift]:
                session, out = sessions[(label, k)], exit_output_name(k)
                start = time.perf_counter()
                for f in feeds:
                    pool_numpy(session.run([out], f)[0], f["attention_mask"], fp32.pooling_mode)
                rates[(label, k)].append(n / (time.perf_counter() - start))
        print(f"\nsentences/s ({n} STSB test sentences, median of {args.rounds} rounds):")
        report["speed"] = {}
        for k in counts:
            plain = rates[("int8 plain", k)]
            report["speed"][f"int8 plain @ {k}"] = {"sentences_per_s": round(statistics.median(plain), 1)}
            print(f"  {k} layers: int8 plain {statistics.median(plain):.0f}")
            for label in labels[1:]:
                ours = rates[(label, k)]
                within = [o / p for o, p in zip(ours, plain)]
                row = {
                    "sentences_per_s": round(statistics.median(ours), 1),
                    "over_plain": round(statistics.median(within), 3),
                    "rounds": [round(r, 3) for r in within],
                }
                report["speed"][f"{label} @ {k}"] = row
                print(
                    f"  {k} layers: {label} {row['sentences_per_s']:.0f}, / plain {row['over_plain']:.3f}x "
                    f"(rounds {min(within):.2f}-{max(within):.2f})"
                )
    out = Path(args.out or ROOT / "benchmarks" / "results" / f"int8-outliers-{args.model}.json")
    save_results(out, report, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
