"""Reading and writing model folders in the sentence-transformers layout, atomically.

A folder holds ``modules.json`` listing the modules in order: the transformer (at the folder root or
in a sub-folder), ``1_Pooling``, optionally a ``Dense`` module and a ``Normalize`` module. Plain
transformers folders (a ``config.json`` and weights, no ``modules.json``) load with mean pooling.

matryoshka2d records a dim-truncated export as a Dense module whose weight is the first ``d`` rows of
the identity matrix (no bias, identity activation) followed by Normalize: sentence-transformers loading
the folder then produces exactly our "first d dims, re-normalised" embeddings. The loader recognises
that module and refuses any other Dense module with a clear error.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from matryoshka2d.errors import ModelLoadError
from matryoshka2d.pooling import pooling_config, pooling_mode_from_config

#: Extra metadata file written next to the sentence-transformers files.
METADATA_FILE = "matryoshka2d.json"


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it replaces ``path`` in one rename.

    On error the temporary folder is removed and ``path`` is left as it was. An existing ``path`` is
    moved aside first and deleted only after the new folder is in place.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} already exists")
    if path.exists() and not path.is_dir():
        raise FileExistsError(f"{path} exists and is not a folder")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; a saved folder gets the usual permissions
    old: Path | None = None
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old-", dir=path.parent))
            os.replace(path, old / path.name)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None and (old / path.name).exists() and not path.exists():
            os.replace(old / path.name, path)  # put the previous folder back
            shutil.rmtree(old, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> Path:
    """Write a file under a temporary name beside it and rename it into place (never half-written)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' per-file progress bars and load reports (we show our own progress)."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise ModelLoadError(f"cannot read {path}: {e}") from e


@dataclass
class FolderSpec:
    """What a model folder describes, before any weight is loaded."""

    transformer_dir: Path
    pooling_mode: str = "mean"
    max_seq_length: int | None = None
    do_lower_case: bool = False
    normalize: bool = False
    dim: int | None = None
    metadata: dict | None = None


HUB_IGNORE_PATTERNS = [
    "onnx/*",
    "openvino/*",
    "*.onnx",
    "*.h5",
    "*.msgpack",
    "*.ot",
    "tf_model*",
    "flax_model*",
    "rust_model*",
    "coreml/*",
]


def resolve_model_path(name_or_path: str | os.PathLike) -> Path:
    """A local folder as is; anything else is treated as a Hugging Face hub id and downloaded (cached)."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    text = str(name_or_path)
    if path.exists():
        raise ModelLoadError(f"{text} is a file, not a model folder")
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or "\\" in text:
        raise ModelLoadError(f"model folder not found: {text}")
    try:
        from huggingface_hub import snapshot_download

        # Only what a PyTorch model folder needs: not the ONNX / OpenVINO / TF / Flax / Rust copies that
        # many sentence-transformers repos also ship (several times the model's size).
        return Path(snapshot_download(repo_id=text, ignore_patterns=HUB_IGNORE_PATTERNS))
    except Exception as e:  # network errors, missing repo, offline mode without a cache
        raise ModelLoadError(
            f"{name_or_path!r} is not a local folder and could not be fetched from the Hugging Face hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        ) from None


def read_folder_spec(folder: Path) -> FolderSpec:
    """Parse ``modules.json`` and the module configs of a model folder (no weights loaded)."""
    modules_file = folder / "modules.json"
    metadata = read_json(folder / METADATA_FILE) if (folder / METADATA_FILE).is_file() else None
    if not modules_file.is_file():
        if not (folder / "config.json").is_file():
            raise ModelLoadError(
                f"{folder} is not a model folder: it has neither modules.json (sentence-transformers) "
                "nor config.json (transformers)"
            )
        return FolderSpec(transformer_dir=folder, metadata=metadata)

    modules = read_json(modules_file)
    if not isinstance(modules, list) or not modules:
        raise ModelLoadError(f"{modules_file}: expected a non-empty list of modules")
    spec: FolderSpec | None = None
    seen_pooling = False
    for module in sorted(modules, key=lambda m: m.get("idx", 0)):
        kind = str(module.get("type", "")).rsplit(".", 1)[-1]
        sub = folder / module.get("path", "")
        if kind == "Transformer":
            spec = FolderSpec(transformer_dir=sub, metadata=metadata)
            st_config = sub / "sentence_bert_config.json"
            if st_config.is_file():
                cfg = read_json(st_config)
                spec.max_seq_length = cfg.get("max_seq_length")
                spec.do_lower_case = bool(cfg.get("do_lower_case", False))
        elif spec is None:
            raise ModelLoadError(f"{modules_file}: the first module must be a Transformer, got {kind!r}")
        elif kind == "Pooling":
            spec.pooling_mode = pooling_mode_from_config(read_json(sub / "config.json"), str(sub))
            seen_pooling = True
        elif kind == "Dense":
            spec.dim = _identity_prefix_dim(sub)
        elif kind == "Normalize":
            spec.normalize = True
        else:
            raise ModelLoadError(
                f"{modules_file}: unsupported module {module.get('type')!r}; matryoshka2d supports "
                "Transformer, Pooling, Normalize and its own dim-truncation Dense module"
            )
    if spec is None or not seen_pooling:
        raise ModelLoadError(f"{modules_file}: a Transformer and a Pooling module are required")
    return spec


def _identity_prefix_dim(dense_dir: Path) -> int:
    """The ``d`` of a Dense module that keeps the first ``d`` dims; refuse any other Dense module."""
    cfg = read_json(dense_dir / "config.json")
    weights_file = dense_dir / "model.safetensors"
    refuse = ModelLoadError(
        f"{dense_dir}: Dense modules that project embeddings are not supported (matryoshka2d truncates "
        "dims by prefix; only its own dim-truncation module is accepted)"
    )
    if cfg.get("bias", True) or not str(cfg.get("activation_function", "")).endswith("Identity"):
        raise refuse
    if not weights_file.is_file():
        raise refuse
    from safetensors.torch import load_file

    weight = load_file(str(weights_file)).get("linear.weight")
    if weight is None or weight.ndim != 2 or weight.shape[0] > weight.shape[1]:
        raise refuse
    if not torch.equal(weight, torch.eye(weight.shape[0], weight.shape[1], dtype=weight.dtype)):
        raise refuse
    return int(weight.shape[0])


def write_folder(
    folder: Path,
    transformer,
    tokenizer,
    pooling_mode: str,
    max_seq_length: int,
    hidden_size: int,
    dim: int,
    metadata: dict,
    model_card: str,
    do_lower_case: bool = False,
    normalize: bool = True,
) -> None:
    """Write a complete sentence-transformers model folder into ``folder`` (which must be empty)."""
    import transformers

    from matryoshka2d import __version__

    with quiet_transformers(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        transformer.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    write_json(
        folder / "sentence_bert_config.json",
        {"max_seq_length": max_seq_length, "do_lower_case": do_lower_case},
    )
    write_json(folder / "1_Pooling" / "config.json", pooling_config(pooling_mode, hidden_size))
    if dim < hidden_size:
        from safetensors.torch import save_file

        dense = folder / "2_Dense"
        write_json(
            dense / "config.json",
            {
                "in_features": hidden_size,
                "out_features": dim,
                "bias": False,
                "activation_function": "torch.nn.modules.linear.Identity",
            },
        )
        save_file({"linear.weight": torch.eye(dim, hidden_size)}, str(dense / "model.safetensors"))
        modules.append(
            {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}
        )
    if normalize:
        n = len(modules)
        normalize_type = "sentence_transformers.models.Normalize"
        modules.append({"idx": n, "name": str(n), "path": f"{n}_Normalize", "type": normalize_type})
        (folder / f"{n}_Normalize").mkdir()
    write_json(folder / "modules.json", modules)  # type: ignore[arg-type]
    write_json(
        folder / "config_sentence_transformers.json",
        {
            "__version__": {
                "matryoshka2d": __version__,
                "transformers": transformers.__version__,
                "pytorch": torch.__version__,
            },
            "prompts": {},
            "default_prompt_name": None,
            "similarity_fn_name": "cosine",
        },
    )
    write_json(folder / METADATA_FILE, metadata)
    (folder / "README.md").write_text(model_card, encoding="utf-8")
