"""The model card (README.md) of a trained model: base model, data, loss, trained dims/layers, evaluation."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from matryoshka2d.evaluation.sts import GridResult

if TYPE_CHECKING:
    from matryoshka2d.model import EmbeddingModel


def _describe_loss(config: Mapping[str, Any], indent: str = "") -> list[str]:
    """A loss config as a nested markdown list: the name, then one line per setting."""
    lines = [f"{indent}- **{config.get('name', 'loss')}**"]
    for key, value in config.items():
        if key == "name":
            continue
        if isinstance(value, Mapping) and "name" in value:
            lines += [f"{indent}  - {key}:", *_describe_loss(value, indent + "    ")]
        else:
            lines.append(f"{indent}  - {key}: `{json.dumps(value)}`")
    return lines


def training_model_card(model: EmbeddingModel, summary: Mapping[str, Any]) -> str:
    """README.md of a trained model: base model, data, loss and settings, trained dims/layers, evaluation."""
    cfg = summary["config"]
    data = summary["data"]
    loss = summary["loss"]
    dims = summary.get("trained_dims")
    layers = summary.get("trained_layers") or {}
    lines = [
        "---",
        "library_name: sentence-transformers",
        "tags: [sentence-transformers, sentence-similarity, matryoshka, matryoshka2d]",
        f"base_model: {summary['base_model']}",
        "---",
        "",
        f"# {Path(str(cfg['output_dir'])).name}",
        "",
        f"A 2D Matryoshka sentence embedding model trained with matryoshka2d from `{summary['base_model']}`: "
        f"{model.num_layers} transformer layers, {model.dim}-dim embeddings, {model.pooling_mode} pooling. "
        "Use the first k layers and the first d dims for faster, smaller embeddings.",
        "",
        "## Training data",
        "",
        *[f"- `{s['source']}`: {s['rows']} rows" for s in data["sources"]],
        f"- columns: {', '.join(data['columns'])}"
        + (f"; label: {data['label_column']}" if data.get("label_column") else ""),
        "",
        "## Loss",
        "",
        *_describe_loss(loss),
        *_describe_extra_tasks(summary.get("extra_tasks") or [], summary.get("task_batches") or {}),
        "",
        f"- trained dims: {dims if dims else f'{model.dim} (full size only)'}",
        "- trained layer counts (times computed): "
        + (", ".join(f"{k}: {v}" for k, v in layers.items()) or "n/a"),
        "",
        "## Training settings",
        "",
        f"- steps: {summary['steps']}, batch size per process: {cfg['batch_size']}, processes: "
        f"{summary['num_processes']}, gradient accumulation: {cfg['gradient_accumulation_steps']} "
        f"(rows per step: {summary['total_batch_size']})",
        f"- AdamW, learning rate {cfg['learning_rate']}, weight decay {cfg['weight_decay']}, linear warmup "
        f"({cfg['warmup_steps'] if cfg['warmup_steps'] is not None else cfg['warmup_ratio']}) and decay, "
        f"gradient clipping {cfg['max_grad_norm']}, mixed precision {cfg['mixed_precision']}, "
        f"seed {cfg['seed']}",
        f"- final training loss: {summary['final_loss']:.4f}"
        if summary.get("final_loss") is not None
        else "",
    ]
    evaluation = summary.get("evaluation")
    if evaluation:
        lines += [
            "",
            "## Evaluation",
            "",
            f"Spearman correlation (x100) of cosine similarity on `{cfg['eval_data']}`, by number of layers "
            "(rows) and embedding dims (columns):",
            "",
            "```text",
            GridResult.from_dict(evaluation).table(),
            "```",
        ]
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "from matryoshka2d import EmbeddingModel",
        'model = EmbeddingModel.load("path/to/this/folder")',
        f'emb = model.encode(["a sentence"], layers={max(1, model.num_layers // 2)}, '
        f"dim={dims[-1] if dims else model.dim})",
        "```",
        "",
    ]
    return "\n".join(lines)


def _describe_extra_tasks(tasks: list[Mapping[str, Any]], batches: Mapping[str, int]) -> list[str]:
    """Markdown lines for the ``extra_tasks`` of a run (its data, base loss and batches trained)."""
    lines = []
    if tasks:
        lines += ["", f"Main task: {batches.get('0', 0)} batches. Extra tasks (each batch from one task):"]
    for i, task in enumerate(tasks, start=1):
        data, base = task["data"], task["loss"].get("base", task["loss"])
        sources = ", ".join(f"`{s['source']}` ({s['rows']} rows)" for s in data["sources"])
        label = f", label {data['label_column']}" if data.get("label_column") else ""
        lines.append(
            f"- task {i}: {sources}; columns {', '.join(data['columns'])}{label}; "
            f"{base.get('name', '?')}; {batches.get(str(i), 0)} batches"
        )
    return lines
