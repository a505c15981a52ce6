"""``m2d export`` (alias ``m2d truncate``): a smaller standalone model, as torch weights and/or ONNX.

The output folder is checked before the model is loaded (the safe-output rule of
:mod:`matryoshka2d.persistence`): a new or empty folder, or a model written by m2d with ``--overwrite``.
"""

from __future__ import annotations

import argparse

from matryoshka2d.cli.common import cell_parent, model_parent, overwrite_parent


def cmd_export(args: argparse.Namespace) -> int:
    from matryoshka2d.errors import InvalidInputError
    from matryoshka2d.export import export_model, external_data_path, require_onnx
    from matryoshka2d.model import EmbeddingModel
    from matryoshka2d.persistence import check_output_folder

    if args.quantize and args.format != "onnx":
        raise InvalidInputError(
            f"--quantize {args.quantize} needs --format onnx (got --format {args.format})"
        )
    if args.format == "onnx":
        require_onnx()  # refuse before the work
    check_output_folder(args.out, "model", overwrite=args.overwrite, inputs=[args.model])
    model = EmbeddingModel.load(args.model, dtype="float32")  # exports keep full precision
    out = export_model(
        model,
        args.out,
        layers=args.layers,
        dim=args.dim,
        format=args.format,
        quantize=args.quantize,
        overwrite=args.overwrite,
        inputs=[args.model],
    )
    layers = args.layers or model.num_layers
    dim = args.dim or model.dim
    print(f"saved {layers} layers x {dim} dims to {out}")
    print(f"(from {model.num_layers} layers x {model.dim} dims)")
    if args.format == "onnx":
        from matryoshka2d.persistence import read_json

        onnx = read_json(out / "matryoshka2d.json").get("onnx", {})
        print(f"ONNX: {onnx.get('file')} (SentenceTransformer(folder, backend='onnx'))")
        for name in (onnx.get("file"), onnx.get("int8_file")):
            if name and external_data_path(out / name).is_file():  # past 2 GiB: ONNX external data
                print(f"  weights of {name} in {name}_data beside it: keep the two files together")
        if onnx.get("int8_file"):
            from matryoshka2d.export.int8_outliers import read_outlier_record

            print(
                f"int8: {onnx['int8_file']} (model_kwargs={{'file_name': '{onnx['int8_file']}'}}, "
                f"preset {onnx['int8_preset']})"
            )
            split = read_outlier_record(out / onnx["int8_file"]) or {}
            if split.get("channels"):
                print(
                    f"  {split['channels']} outlier activation channels of {split['tensors']} MatMul inputs "
                    f"kept float32 (past {split['ratio']:g}x the median channel)"
                )
    return 0


def register(sub) -> None:
    """The ``export`` subcommand and its alias ``truncate``."""
    p = sub.add_parser(
        "export",
        aliases=["truncate"],
        parents=[model_parent(), cell_parent(), overwrite_parent()],
        help="export a smaller standalone model (first K layers, first D dims; torch and/or ONNX)",
        description="Write a sentence-transformers folder holding only the first K layers, keeping the "
        "first D dims, that sentence-transformers loads with the same embeddings as "
        "encode(layers=K, dim=D). 'm2d truncate' is the same command.",
    )
    p.add_argument(
        "--format",
        choices=("torch", "onnx"),
        default="torch",
        help="torch: safetensors weights (default); onnx: the same plus onnx/model.onnx for "
        "SentenceTransformer(folder, backend='onnx') and m2d --runtime onnx",
    )
    p.add_argument(
        "--quantize",
        choices=("int8",),
        help="with --format onnx: also write onnx/model_qint8_<preset>.onnx (ONNX Runtime dynamic int8, "
        "preset chosen from this CPU; the few activation channels far above the rest stay float32)",
    )
    p.add_argument(
        "--out",
        required=True,
        help="output folder (sentence-transformers layout): new or empty; a model written by m2d only "
        "with --overwrite",
    )
    p.set_defaults(func=cmd_export)
