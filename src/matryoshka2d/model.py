"""EmbeddingModel: a transformer encoder plus pooling that runs at any (layers, dims).

One forward pass returns the pooled embedding of every requested layer (layer k = the output after the
first k transformer layers; 0 = the embedding layer alone). That single primitive serves inference
(``encode``, which runs only the layers it needs), grid evaluation (all layers from one pass) and
training (losses receive the per-layer embeddings; nothing is monkey-patched).
"""

from __future__ import annotations

import copy
import inspect
import os
import threading
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from matryoshka2d.encoder import (  # noqa: F401 - check_texts, EmbeddingBatch, ...: public here too
    DEFAULT_CHUNK_SIZE,
    EmbeddingBatch,
    Encoder,
    check_text,
    check_texts,
    check_texts_iterable,
    pad_rows,
    sort_longest_first,
)
from matryoshka2d.errors import InvalidInputError, InvalidLayersError, ModelLoadError, first_line
from matryoshka2d.fused_layers import INPUTS, FusedLayers
from matryoshka2d.persistence import (
    FolderSpec,
    atomic_directory,
    check_rotation,
    quiet_transformers,
    read_folder_spec,
    resolve_model_path,
    write_folder,
)
from matryoshka2d.pooling import POOLING_MODES, pool
from matryoshka2d.truncation import (
    check_dim,
    check_layers,
    exit_states,
    find_layer_stack,
    keep_first_layers,
    layer_view,
)

# Families whose position ids start after the padding index, so max_position_embeddings overstates the
# usable length by pad_token_id + 1 (514 positions = 512 tokens for RoBERTa).
_OFFSET_POSITION_FAMILIES = {
    "roberta",
    "xlm-roberta",
    "xlm-roberta-xl",
    "camembert",
    "data2vec-text",
    "longformer",
    "roberta-prelayernorm",
    "xmod",
    "ibert",
    "luke",
}
# MPNet's position ids start after a padding index fixed at 1, whatever its config says.
_FIXED_POSITION_OFFSETS = {"mpnet": 2}


# The dtypes a model can run its transformer layers in (pooling and normalisation are always float32).
DTYPES = ("auto", "float32", "bfloat16", "float16")
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (x86 ``avx512_bf16`` or AMX; read from /proc/cpuinfo).

    Elsewhere (no /proc/cpuinfo, older x86, ARM) bfloat16 is emulated and slower than float32: False.
    """
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def warn_if_emulated_bf16() -> None:
    """Warn that bfloat16 was asked for on a CPU that only emulates it (much slower than float32)."""
    if not cpu_has_native_bf16():
        warnings.warn(
            "bfloat16 on this CPU is emulated (no avx512_bf16/AMX): measured 5.4x slower than float32 on "
            "an AVX2 CPU (docs/BENCHMARKS.md); dtype='auto' picks float32 here",
            RuntimeWarning,
            stacklevel=3,
        )


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device | None = None) -> torch.dtype:
    """The torch dtype for a ``dtype`` option on ``device`` (default CPU).

    ``"auto"`` is bfloat16 where the hardware computes it natively (a CUDA GPU that supports it, a CPU
    with ``avx512_bf16``/AMX) and float32 otherwise.

    Raises:
        InvalidInputError: an unknown dtype name.
    """
    if isinstance(dtype, torch.dtype):
        if dtype not in _TORCH_DTYPES.values():
            raise InvalidInputError(f"dtype {dtype} is not supported; choose one of {list(DTYPES)}")
        return dtype
    if dtype not in DTYPES:
        raise InvalidInputError(f"unknown dtype {dtype!r}; choose one of {list(DTYPES)}")
    if dtype != "auto":
        return _TORCH_DTYPES[dtype]
    device = torch.device(device or "cpu")
    if device.type == "cuda":  # native bf16 (Ampere and later) on that device, not emulated (T4, V100)
        supported = torch.cuda.is_available() and torch.cuda.get_device_capability(device) >= (8, 0)
        return torch.bfloat16 if supported else torch.float32
    if device.type == "cpu":
        return torch.bfloat16 if cpu_has_native_bf16() else torch.float32
    return torch.float32


def check_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` as a ``torch.device`` if this machine has it (None stays None: the CPU). An int is a
    CUDA device index, as in torch (``0`` is ``"cuda:0"``).

    Raises:
        InvalidInputError: not a device (``"gpu"``, ``1.5``), or a device this torch build or machine
            does not have (``"cuda"`` without a GPU, ``"cuda:5"`` on a machine with two).
    """
    if device is None:
        return None
    if isinstance(device, bool) or not isinstance(device, (str, int, torch.device)):
        raise InvalidInputError(f"device must be a name such as 'cpu' or 'cuda:0', got {device!r:.50}")
    if isinstance(device, int):  # torch: an index of a CUDA device
        if device < 0:
            raise InvalidInputError(f"unknown device {device!r}: a device index must be >= 0")
        device = f"cuda:{device}"
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise InvalidInputError(f"unknown device {device!r}: use e.g. 'cpu', 'cuda' or 'cuda:0'") from None
    if parsed.type == "cpu":
        return parsed
    if parsed.type != "cuda":
        module = getattr(torch, parsed.type, None)
        available = getattr(module, "is_available", None)
        if available is None or not available():
            raise InvalidInputError(f"device {device!r} is not available on this machine")
        return parsed
    if not torch.cuda.is_available():
        raise InvalidInputError(f"device {device!r}: this machine (or this torch build) has no CUDA GPU")
    if parsed.index is not None and parsed.index >= torch.cuda.device_count():
        raise InvalidInputError(
            f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s) (cuda:0..)"
        )
    return parsed


def _cpp_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU backend uses on Linux and macOS ($CXX, else g++), if found."""
    import shutil

    return shutil.which(os.environ.get("CXX") or "g++")


def _weights_state(module: nn.Module) -> tuple:
    """What identifies a module's current weights cheaply: each parameter's storage, version counter
    and dtype, plus the first element of about a dozen parameters spread over the model (writes that
    bypass the version counter, such as fused optimizer steps or ``.data`` writes, still change those
    in practice). About 0.2 ms for all-MiniLM-L6-v2, once per compiled forward pass."""
    params = list(module.parameters())
    ids = tuple((p.data_ptr(), 0 if p.is_inference() else p._version, p.dtype) for p in params)
    sample = params[:: max(1, len(params) // 12)] + params[-1:]
    return ids, torch.stack([p.detach().reshape(-1)[0].float() for p in sample])


def _same_weights(a: tuple, b: tuple) -> bool:
    """Whether two :func:`_weights_state` results (``()``: none yet) describe the same weights."""
    return bool(a) and bool(b) and a[0] == b[0] and torch.equal(a[1], b[1])


def _needs_eager_modules() -> bool:
    """Whether this pass must run the model's own modules, not a compiled graph or fused layers built
    from frozen copies of its weights: gradients are recorded, or the pass is traced or exported."""
    return torch.is_grad_enabled() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export()


def _compiled_runner(view: nn.Module, layers: int) -> Callable:
    """``view`` (a model of ``layers`` layers) compiled for inference, failures as one-line errors."""
    from torch._dynamo.exc import BackendCompilerFailed

    # Each layer count keeps its own graphs (one text / any batch, with or without every exit's hidden
    # states): shared, the layer counts of one model would exhaust torch's limit of 8 graphs per
    # function and quietly run eagerly.
    compiled = torch.compile(view, dynamic=True, isolate_recompiles=True, recompile_limit=8)

    def run(**kwargs):
        try:
            return compiled(**kwargs)
        except BackendCompilerFailed as e:  # e.g. a C++ toolchain that cannot build the kernels
            first = first_line(e)
            raise InvalidInputError(
                f"torch.compile could not build the graph of {layers} layers ({first}); "
                "run without compiling (no --compile)"
            ) from None

    return run


class EmbeddingModel(nn.Module, Encoder):
    """A sentence embedding model that can be truncated to its first k layers and first d dims.

    Args:
        transformer: a Hugging Face encoder (``transformers.PreTrainedModel``) of a supported family:
            BERT, MPNet, RoBERTa/XLM-R, DistilBERT (any model with the same layer-stack layout).
        tokenizer: its tokenizer.
        pooling_mode: one of ``mean``, ``cls``, ``max``, ``mean_sqrt_len_tokens``, ``weightedmean``,
            ``lasttoken``.
        max_seq_length: longer inputs are truncated to this many tokens (default: the tokenizer's limit,
            capped by the model's position embeddings).
        dim: output embedding size (default: the hidden size). A model exported with
            :meth:`truncate` has a smaller ``dim``.
        do_lower_case: lower-case texts before tokenising (as some sentence-transformers folders ask).
        normalize: whether the model's own output is unit-length (a sentence-transformers Normalize module).
            Saved folders keep it, so sentence-transformers reproduces the model's output; ``encode``
            normalises by default either way.
        name_or_path: where the model came from, for reports and model cards.
        exit_rotations: ``{layer count k: orthogonal (hidden, hidden) matrix R_k}``: layer exit k's pooled
            embedding x becomes ``R_k x`` before its dims are cut (see :meth:`set_exit_rotations`).
        prompts: named prompts (a sentence-transformers folder's ``config_sentence_transformers.json``).
        default_prompt_name: the prompt prepended to every text the model tokenises (``encode``, the
            server, training), as sentence-transformers' ``encode`` does with a folder's default prompt.
        similarity_fn_name: the similarity function the folder declares; kept when the model is saved.
        include_prompt: the pooling's ``include_prompt`` (False: prompts are refused; kept when saved).

    Example:
        >>> model = EmbeddingModel.load("sentence-transformers/all-MiniLM-L6-v2")
        >>> full = model.encode(["a sentence"])                  # (1, 384)
        >>> fast = model.encode(["a sentence"], layers=3, dim=64)  # half the layers, 1/6 the size
    """

    def __init__(
        self,
        transformer: nn.Module,
        tokenizer,
        pooling_mode: str = "mean",
        max_seq_length: int | None = None,
        dim: int | None = None,
        do_lower_case: bool = False,
        normalize: bool = True,
        name_or_path: str | None = None,
        exit_rotations: Mapping[int, torch.Tensor] | None = None,
        prompts: Mapping[str, str] | None = None,
        default_prompt_name: str | None = None,
        similarity_fn_name: str | None = None,
        include_prompt: bool = True,
    ) -> None:
        super().__init__()
        if pooling_mode not in POOLING_MODES:
            raise ModelLoadError(f"unknown pooling mode {pooling_mode!r}; supported: {list(POOLING_MODES)}")
        self.prompts: dict[str, str] = dict(prompts or {})
        if default_prompt_name is not None and default_prompt_name not in self.prompts:
            raise ModelLoadError(
                f"default_prompt_name {default_prompt_name!r} is not one of the prompts "
                f"({sorted(self.prompts)})"
            )
        self.default_prompt_name = default_prompt_name
        self.similarity_fn_name = similarity_fn_name
        self.include_prompt = bool(include_prompt)
        if self.prompt and not self.include_prompt:  # as read_folder_spec refuses such a folder
            raise ModelLoadError(
                f"the pooling leaves the prompt's tokens out (include_prompt=False) and the default prompt "
                f"{default_prompt_name!r} is prepended to every text; matryoshka2d does not support that "
                "combination (its embeddings would differ from sentence-transformers')"
            )
        parent, name = find_layer_stack(transformer)  # fail now, with the class name, if unknown
        self._num_layers = len(getattr(parent, name))  # a fixed fact: running fewer layers changes nothing
        self.transformer = transformer
        self.tokenizer = tokenizer
        self.pooling_mode = pooling_mode
        self.hidden_size: int = int(transformer.config.hidden_size)
        self.dim: int = check_dim(dim, self.hidden_size) if dim is not None else self.hidden_size
        self.do_lower_case = do_lower_case
        self.normalize = normalize
        self.metadata: dict = {}
        self.name_or_path = name_or_path or getattr(transformer.config, "_name_or_path", "") or "model"
        _check_token_embeddings(transformer, tokenizer, self.name_or_path)
        limit = getattr(tokenizer, "model_max_length", None) or 512
        positions = getattr(transformer.config, "max_position_embeddings", None) or limit
        family = getattr(transformer.config, "model_type", "")
        if family in _OFFSET_POSITION_FAMILIES:
            positions -= (getattr(transformer.config, "pad_token_id", None) or 0) + 1  # ids start at pad + 1
        positions -= _FIXED_POSITION_OFFSETS.get(family, 0)
        if limit > 100_000:  # tokenizers without a configured limit report a huge sentinel
            limit = positions
        self.max_positions = positions
        try:  # the setter refuses 0, negative, non-integer or past the position embeddings
            self.max_seq_length = max_seq_length if max_seq_length is not None else min(limit, positions)
        except InvalidInputError as e:  # from the folder or the caller: the model cannot be loaded so
            raise ModelLoadError(str(e)) from None
        self._input_names = set(inspect.signature(transformer.forward).parameters)
        # A fast tokenizer's call may switch its truncation/padding state: not safe from several threads.
        # Only tokenising is serialised; forward passes of any layer count run concurrently.
        self._tokenizer_lock = threading.Lock()
        # float32 on the model's device whatever dtype the layers are cast to (see _apply), not buffers:
        # a bf16 copy of a rotation would no longer be orthogonal.
        self._exit_rotations: dict[int, torch.Tensor] = {}
        self.rotations_version = 0  # bumped by set_exit_rotations (caches keyed on a model object use it)
        self.set_exit_rotations(exit_rotations or {})
        # compile_for_inference: on or off, one compiled module per layer count, and the weights they
        # were compiled from (frozen graphs hold copies: any change of the weights drops them)
        self._compile = False
        self._compiled: dict[int, Callable] = {}
        self._compiled_weights: tuple = ()
        self._compile_lock = threading.Lock()
        # fuse_layers: on or off, the fused layers (which know whether they trace) and the weights they were
        # built from (under _compile_lock)
        self._fuse = False
        self._fused: FusedLayers | None = None
        self._fused_weights: tuple = ()

    # ------------------------------------------------------------------ loading and saving
    @classmethod
    def load(
        cls,
        name_or_path: str | os.PathLike,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = "float32",
    ) -> EmbeddingModel:
        """Load a sentence-transformers model folder, a plain transformers folder, or a hub id.

        sentence-transformers folders keep their pooling mode, ``max_seq_length`` and Normalize module;
        plain transformers folders get mean pooling. Hub ids are downloaded (and cached) with
        ``huggingface_hub``; set ``HF_HUB_OFFLINE=1`` to use the cache only.

        Args:
            name_or_path: a model folder or a hub id.
            device: where to run (default: CPU).
            dtype: what the transformer layers compute in: ``"float32"`` (default: exact, and what
                training needs), ``"bfloat16"``, ``"float16"`` or ``"auto"`` (bfloat16 where the hardware
                has it natively, see :func:`resolve_dtype`; about 2.7x faster on a CPU with avx512_bf16 at
                a ~0.01 STSB cost). Pooling, dim truncation and normalisation are float32 either way;
                the choice is ``model.dtype``.

        Raises:
            ModelLoadError: the folder is missing, is not a model folder, holds an unsupported module
                (a projecting Dense layer) or an architecture whose layer stack cannot be found.
            InvalidInputError: an unknown ``dtype``, or a ``device`` this machine does not have.
        """
        from transformers import AutoModel, AutoTokenizer

        device = check_device(device)
        torch_dtype = resolve_dtype(dtype, device)
        if torch_dtype == torch.bfloat16 and torch.device(device or "cpu").type == "cpu":
            warn_if_emulated_bf16()
        folder = resolve_model_path(name_or_path)
        spec: FolderSpec = read_folder_spec(folder)
        try:
            with quiet_transformers():  # e.g. "pooler weights not initialised": we never use the pooler
                transformer = AutoModel.from_pretrained(spec.transformer_dir, dtype=torch_dtype)
                tokenizer = AutoTokenizer.from_pretrained(spec.transformer_dir)
        except Exception as e:  # OSError, ValueError, SafetensorError, ...: a folder we cannot read
            raise ModelLoadError(
                f"cannot load the transformer in {spec.transformer_dir}: {first_line(e)}"
            ) from None
        vocab_size = getattr(transformer.config, "vocab_size", None)
        if vocab_size and len(tokenizer) < vocab_size // 2:
            raise ModelLoadError(
                f"{spec.transformer_dir}: the tokenizer has {len(tokenizer)} tokens but the model expects "
                f"{vocab_size}; are the tokenizer files (tokenizer.json, vocab.txt, ...) missing?"
            )
        model = cls(
            transformer,
            tokenizer,
            pooling_mode=spec.pooling_mode,
            max_seq_length=spec.max_seq_length,
            dim=spec.dim,
            do_lower_case=spec.do_lower_case,
            normalize=spec.normalize,
            name_or_path=str(name_or_path),
            prompts=spec.prompts,
            default_prompt_name=spec.default_prompt_name,
            similarity_fn_name=spec.similarity_fn_name,
            include_prompt=spec.include_prompt,
        )
        rotations = dict(spec.exit_rotations)
        if spec.output_rotation is not None:
            if model.num_layers in rotations:
                raise ModelLoadError(
                    f"{folder}: layer exit {model.num_layers} is rotated twice (by the Dense module and by "
                    "exit_rotations.safetensors)"
                )
            rotations[model.num_layers] = spec.output_rotation
        try:
            model.set_exit_rotations(rotations)
        except InvalidInputError as e:
            raise ModelLoadError(f"{folder}: {e}") from None
        model.metadata = spec.metadata or {}
        model.eval()
        if device is not None:
            model.to(device)
        return model

    def save(
        self,
        path: str | os.PathLike,
        model_card: str | None = None,
        metadata: dict | None = None,
        *,
        overwrite: bool = False,
        inputs: Iterable[str | os.PathLike | None] = (),
        extra_files: Callable[[Path], None] | None = None,
    ) -> Path:
        """Save in the sentence-transformers layout (loadable by sentence-transformers), atomically.

        The folder is written under a temporary name and renamed into place, so an interrupted save never
        leaves a half-written model. ``path`` must be new or empty, or hold a model saved by matryoshka2d
        (replaced only with ``overwrite=True``); a folder holding anything else, the folder the model was
        loaded from (or one containing it) and the current folder are refused
        (:func:`~matryoshka2d.persistence.check_output_folder`).

        Args:
            path: the output folder.
            model_card: README.md text; a short default card if None.
            metadata: extra entries for ``matryoshka2d.json`` (e.g. training settings).
            overwrite: replace a model previously saved at ``path`` by matryoshka2d.
            inputs: other paths the caller read (data files); never written over, into or above.
            extra_files: called with the temporary folder once the model files are in it, to add more
                files in the same atomic save (the ONNX export adds ``onnx/model.onnx``).

        The weights are saved in the dtype the model computes in: a model loaded with ``dtype="bfloat16"``
        (or ``"auto"`` on a CPU with native bfloat16) saves bfloat16 weights, rounded at load, and a
        warning says so; load with ``dtype="float32"`` to save (or truncate and save) at full precision.

        Raises:
            OutputPathError: ``path`` may not be written (the message says what is there).
        """
        path = Path(path)
        if self.dtype != torch.float32:
            warnings.warn(
                f"saving {self.precision} weights (the model computes in {self.precision}; its weights were "
                "rounded when it was loaded): load it with dtype='float32' to save full-precision weights",
                stacklevel=2,
            )
        meta = {**self.metadata, **(metadata or {}), "num_layers": self.num_layers, "dim": self.dim}
        card = model_card or default_model_card(self)
        sources = [*inputs, self.name_or_path]  # never replace the folder the weights came from
        rotations = self._exit_rotations
        with atomic_directory(path, "model", overwrite=overwrite, inputs=sources) as tmp:
            write_folder(
                tmp,
                self.transformer,
                self.tokenizer,
                pooling_mode=self.pooling_mode,
                max_seq_length=self.max_seq_length,
                hidden_size=self.hidden_size,
                dim=self.dim,
                metadata=meta,
                model_card=card,
                do_lower_case=self.do_lower_case,
                normalize=self.normalize,
                exit_rotations={k: r for k, r in rotations.items() if k != self.num_layers},
                output_rotation=rotations.get(self.num_layers),
                prompts=self.prompts,
                default_prompt_name=self.default_prompt_name,
                similarity_fn_name=self.similarity_fn_name,
                include_prompt=self.include_prompt,
            )
            if extra_files is not None:
                extra_files(tmp)
        return path

    # ------------------------------------------------------------------ exit rotations
    @property
    def exit_rotations(self) -> dict[int, torch.Tensor]:
        """``{layer count: rotation}`` of the rotated exits, float32 copies (:meth:`set_exit_rotations`)."""
        return {k: r.clone() for k, r in self._exit_rotations.items()}

    def set_exit_rotations(self, rotations: Mapping[int, torch.Tensor]) -> None:
        """Replace the exit rotations: layer exit k's pooled embedding x becomes ``R_k x``.

        An orthogonal R_k keeps every cosine of the full-size embedding and only changes which directions
        the first d dims hold: :func:`~matryoshka2d.exit_rotations.fit_exit_rotations` puts the exit's
        principal directions first, so that its small dim prefixes keep more. They apply wherever the
        model encodes (``encode``, grids, search, the server, the ONNX backend) and are saved with it; a
        :meth:`truncate` to k layers keeps R_k as a sentence-transformers Dense module. Not to be called
        while another thread encodes.

        Args:
            rotations: ``{k: orthogonal (hidden_size, hidden_size) matrix}`` for k in ``1..num_layers``;
                ``{}`` removes every rotation.

        Raises:
            InvalidInputError: a layer count out of range or a matrix that is not an orthogonal
                ``(hidden_size, hidden_size)`` matrix.
        """
        if not isinstance(rotations, Mapping):
            raise InvalidInputError(
                f"exit rotations must be a dict {{layers: matrix}}, got {type(rotations).__name__}"
            )
        checked = {}
        for k, matrix in rotations.items():
            if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= self.num_layers:
                raise InvalidInputError(
                    f"exit rotation for layer {k!r}: the model has layers 1..{self.num_layers}"
                )
            checked[int(k)] = check_rotation(
                matrix, self.hidden_size, f"exit rotation for layer {k}", error=InvalidInputError
            )
        device = self.device
        self._exit_rotations = {k: checked[k].to(device) for k in sorted(checked)}  # one assignment
        self.rotations_version += 1

    def _rotate(self, k: int, pooled: torch.Tensor) -> torch.Tensor:
        rotation = self._exit_rotations.get(k)
        if rotation is None:
            return pooled
        with torch.autocast(pooled.device.type, enabled=False):  # float32, like pooling, under autocast too
            return pooled.float() @ rotation.to(pooled.device).T

    def _apply(self, fn, recurse: bool = True):
        # .to(device) / .cuda() / .half() reach parameters and buffers; the rotations follow the device only.
        result = super()._apply(fn, recurse)
        if getattr(self, "_exit_rotations", None):
            device = self.device
            self._exit_rotations = {k: r.to(device) for k, r in self._exit_rotations.items()}
        return result

    # ------------------------------------------------------------------ compiled inference
    def compile_for_inference(self, enabled: bool = True, freeze: bool = True) -> EmbeddingModel:
        """Run inference through ``torch.compile`` (inductor): one compiled graph per layer count.

        Every forward pass without gradients (``encode``, the server, evaluation) then runs the compiled
        graph of its deepest layer count, compiled on its first use (``dynamic=True``: one graph serves
        every batch shape, plus one for a batch of one text; 12-28 s per layer count for
        all-MiniLM-L6-v2 on 2 cores: :meth:`warm_up` does it up front). Passes that record gradients
        (training) stay eager. With ``freeze`` (inductor's ``freezing``) the weights are folded into
        the graph as constants, which lets the CPU backend pre-pack its matrix multiplies: on 2 Zen 5
        cores, float32, 1.11-1.15x the eager ``encode`` speed and 1.21x in the server (without freezing
        about 1.05x; docs/BENCHMARKS.md); each compiled layer count then holds its own copy of its
        layers' weights (the MiniLM server: 1.0 GiB RSS against 0.5). Results equal the
        eager ones to float32 rounding (~1e-6). A change of the weights afterwards (an optimizer step,
        fused or not, ``load_state_dict``, ``.to()``) is noticed before the next pass (the storage and
        version counter of every parameter and the first element of a sample of them are compared):
        the graphs are dropped (with
        ``torch._dynamo.reset()``, which drops every compiled graph of the process) and compiled again.
        A write that changes none of these (``p.data[5] = x``) is not seen: call
        ``compile_for_inference()`` again after such edits.

        ``freeze`` sets ``torch._inductor.config.freezing``, a process-wide switch of torch (its graph
        capture reads it; a per-call option does not reach it): it applies to every ``torch.compile``
        of this process that runs without gradients, and stays set (``freeze=False`` does not clear
        it).

        Args:
            enabled: False turns it off again (eager forward passes).
            freeze: fold the weights into the graphs (faster; more memory).

        Returns:
            the model itself.
        """
        if enabled and self.device.type == "cpu" and not _cpp_compiler():
            raise InvalidInputError(
                "compiling for a CPU needs a C++ compiler (inductor builds C++ kernels): none found "
                "(install g++, or set CXX to another one)"
            )
        if enabled and freeze:
            import torch._inductor.config as inductor_config

            inductor_config.freezing = True
        with self._compile_lock:
            self._compile = bool(enabled)
            self._drop_compiled(())
        return self

    @property
    def compiled(self) -> bool:
        """Whether inference runs compiled graphs (:meth:`compile_for_inference`)."""
        return self._compile

    def _drop_compiled(self, weights: tuple) -> None:
        """Forget the compiled graphs (under ``_compile_lock``); the next ones are compiled from
        ``weights``. Dynamo's caches hold the graphs' frozen copies of the weights too: reset them."""
        if self._compiled:
            torch._dynamo.reset()
        self._compiled, self._compiled_weights = {}, weights

    def _runner(self, view: nn.Module, deepest: int) -> Callable:
        """What runs ``deepest`` layers: the compiled graph when compiling is on and no gradient is
        recorded (a graph that cannot be built is an :class:`InvalidInputError`), else ``view`` itself
        (eager)."""
        if not self._compile or _needs_eager_modules():
            return view
        weights = _weights_state(self.transformer)
        with self._compile_lock:
            if not _same_weights(weights, self._compiled_weights):  # frozen copies stale, guards blind
                self._drop_compiled(weights)
            runner = self._compiled.get(deepest)
            if runner is None:
                runner = self._compiled[deepest] = _compiled_runner(view, deepest)
        return runner

    # ------------------------------------------------------------------ fused layers
    def fuse_layers(self, enabled: bool = True, torchscript: bool = True) -> EmbeddingModel:
        """Run inference through torch's fused encoder layers (:mod:`matryoshka2d.fused_layers`).

        Every forward pass without gradients, in eval mode and not compiled (``encode``, the server,
        evaluation) then runs each transformer layer as one native call (``torch.nn.TransformerEncoderLayer``)
        instead of transformers' ~25 Python-level calls: all-MiniLM-L6-v2 on 2 CPU cores, 1.09x / 1.12x the
        ``encode`` speed in bfloat16 at 6 / 3 layers, 1.06x / 1.07x in float32; in the server 1.04x / 1.06x
        and 1.10x / 1.06x (``benchmarks/bench_fused_layers.py``, ``bench_server.py --kinds fused``).
        Results equal transformers' to float rounding (~1e-6 in float32). ``m2d serve`` turns it on
        where the model supports it.

        The fused layers share the model's weights except the query/key/value projections, which they
        hold as one concatenated copy: a change of the weights afterwards is noticed before the next pass,
        as for :meth:`compile_for_inference` (the storage and version counter of every parameter and the
        first element of a sample of them; a write that changes none of these, ``p.data[5] = x``, is not:
        call ``fuse_layers()`` again after such edits), and the fused layers are built again; so is a
        module replaced or wrapped since, or, if the new module is not one of transformers' own, fusing
        turns off with a warning. A forward hook registered on the model's modules, or inputs other than
        ``input_ids``, ``attention_mask`` and ``token_type_ids``, make passes run transformers' layers.
        Passes with gradients (training) always do. The check costs ~0.2 ms a pass (MiniLM).

        Args:
            enabled: False turns it off again.
            torchscript: run each pass (embeddings, the fused layers and pooling) as one TorchScript graph
                per layer count (two where passes ask for several exits), traced on its first use
                (default), else as Python calling the fused layers one by one (see
                :mod:`matryoshka2d.fused_layers`). After a change of the weights that rebuilds traced
                fused layers, passes run from Python (TorchScript never frees a trace's memory, ~3 MB):
                call ``fuse_layers()`` again to trace anew.

        Returns:
            the model itself.

        Raises:
            InvalidInputError: the model's layers cannot be fused (only BERT, RoBERTa and XLM-RoBERTa
                encoders with absolute positions, exact GELU or ReLU and an even number of heads can).
        """
        fused, weights = None, ()
        if enabled:
            try:  # built now: a model that cannot be fused is refused here, not on its first pass
                fused = FusedLayers(self.transformer, torchscript)
                weights = _weights_state(self.transformer)
            except ValueError as e:
                raise InvalidInputError(f"{self.name_or_path}: {e}") from None
        with self._compile_lock:
            self._fuse = bool(enabled)
            self._fused, self._fused_weights = fused, weights
        return self

    @property
    def fused_layers(self) -> bool:
        """Whether inference runs torch's fused encoder layers (:meth:`fuse_layers`)."""
        return self._fuse

    def _fused_runner(self, inputs: Mapping[str, torch.Tensor]) -> FusedLayers | None:
        """The fused layers for this pass (built again if the weights or the modules changed), or None when
        the pass runs transformers' layers: not fused, gradients recorded, train mode, compiled, traced or
        exported, inputs other than ids, mask and token types, or a user's hook on the model. Modules
        changed into ones that cannot be fused turn fusing off, with a warning."""
        if (
            not self._fuse
            or not INPUTS.issuperset(inputs)
            or self.transformer.training
            or self._compile
            or _needs_eager_modules()
        ):
            return None
        weights = _weights_state(self.transformer)
        with self._compile_lock:
            fused = self._fused
            if fused is None or not _same_weights(weights, self._fused_weights) or not fused.unchanged():
                # Fused layers built to trace keep doing so until they have traced graphs; after a change of
                # the weights those are not traced again: TorchScript keeps every trace's memory (~3 MB).
                torchscript = fused is None or (fused.torchscript and not fused.traced)
                try:
                    fused = FusedLayers(self.transformer, torchscript)
                except ValueError as e:  # a module replaced by one the fused layer does not compute
                    warnings.warn(f"fused layers turned off: {e}", stacklevel=3)
                    self._fuse, self._fused, self._fused_weights = False, None, ()
                    return None
                self._fused, self._fused_weights = fused, weights
        return None if fused.has_user_hooks() else fused

    def warm_up(self, layers: Iterable[int] | None = None, exits: bool = False) -> EmbeddingModel:
        """Run every layer count in ``layers`` (default: all) once now, with one text and with two, so
        that compiled graphs (:meth:`compile_for_inference`) and TorchScript graphs of fused layers
        (:meth:`fuse_layers`) are built before the first real request.

        Args:
            layers: layer counts to run.
            exits: when compiled or fused, also the passes that return several exits at once, for every
                layer count but the smallest (graphs of their own; the server's ``shared`` batch mode runs a
                batch of several layer counts as such a pass, to the deepest of them). Eager, they need
                nothing built.
        """
        texts = [["warm up", "a second, longer text to warm up with"], ["warm up"]]
        counts = sorted(set(layers if layers is not None else range(1, self.num_layers + 1)))
        for k in counts:
            check_layers(k, self.num_layers)
            for batch in texts:
                self.encode(batch, layers=k)
                if exits and k > counts[0] and (self._compile or self._fuse):
                    self.encode_layers(batch, layers=[counts[0], k])
        return self

    # ------------------------------------------------------------------ properties
    @property
    def num_layers(self) -> int:
        """Number of transformer layers of the loaded model (never changes while it runs fewer)."""
        return self._num_layers

    @property
    def device(self) -> torch.device:
        return next(self.transformer.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """What the transformer layers compute in (pooling and normalisation are float32 regardless)."""
        return next(self.transformer.parameters()).dtype

    @property
    def precision(self) -> str:
        """``model.dtype`` as a name: ``"float32"``, ``"bfloat16"`` or ``"float16"``."""
        return str(self.dtype).removeprefix("torch.")

    @property
    def pad_multiple(self) -> int:
        """8 for bfloat16 layers on a CPU with right padding, else 1 (:meth:`Encoder.pad_multiple
        <matryoshka2d.encoder.Encoder.pad_multiple>`: the server pads its batches to a multiple of this).

        On a CPU, torch runs bfloat16 linear layers through oneDNN, which builds a kernel for each
        new input shape; a server meets new (rows x width) shapes all the time, and rounding the width cuts
        their number ~8x. Measured on an Intel Xeon with AMX (MiniLM, docs/SERVING.md): the server at 4
        concurrent clients 1.08x (eager) and 1.34x (compiled) faster, at 32 clients 1.16x and 1.0x,
        despite ~10% more padding. float32, float16 (not oneDNN's AMX path here) and ONNX Runtime have no
        such per-shape cost and only pay for the padding (ONNX 7-10% slower with it). ``encode`` does
        not round: its batches, sorted by length, repeat few shapes (rounding cost eager bf16 7% there).
        """
        params = next(self.transformer.parameters())
        bf16 = params.dtype == torch.bfloat16
        # Left padding moves the texts' absolute positions (BERT-style position ids count the padding):
        # extra padding there would change the embeddings, so only right-padded models round.
        right = getattr(self.tokenizer, "padding_side", "right") != "left"
        return 8 if bf16 and right and params.device.type == "cpu" else 1

    # ------------------------------------------------------------------ forward
    def tokenize(self, texts: Sequence[str], padding: bool = True, prompt: str | None = None) -> dict:
        """Tokenise a batch, truncated to ``max_seq_length``, ``prompt`` (default: the model's default
        prompt) prepended.

        With ``padding=True`` (training, one batch): tensors padded to the longest text. With
        ``padding=False``: plain id lists, for :meth:`encode_layers` to sort by token count and pad per batch.
        """
        return self._run_tokenizer(texts, padding, "pt", prompt)

    def _tokenizer_threads(self) -> int:
        """torch's thread count (``torch.set_num_threads``): a long list is tokenised in that many parts."""
        return torch.get_num_threads()

    def pad(
        self, encoded: Mapping[str, Sequence[Sequence[int]]], rows: Sequence[int], multiple: int = 1
    ) -> dict[str, torch.Tensor]:
        """:meth:`Encoder.pad <matryoshka2d.encoder.Encoder.pad>` as torch tensors on the model's device
        (what :meth:`forward` takes; thread-safe)."""
        device = self.device
        padded = super().pad(encoded, rows, multiple)
        return {key: torch.from_numpy(array).to(device) for key, array in padded.items()}

    def forward(
        self, features: dict[str, torch.Tensor], layers: Iterable[int] | None = None
    ) -> dict[int, torch.Tensor]:
        """Pooled embeddings of several layers from one forward pass.

        Only the transformer layers up to the deepest requested one run. Outputs are full-size, float32
        (pooled in float32 whatever dtype the layers run in) and not normalised (callers truncate dims and
        normalise); gradients flow when called outside ``torch.no_grad``.

        Args:
            features: tokenizer output (``input_ids``, ``attention_mask``, ...), on the model's device.
            layers: layer counts to return, each in ``0..num_layers`` (0 = embedding layer only, before
                any transformer layer), or one layer count. Default: the last layer only.

        Returns:
            ``{k: tensor of shape (batch, hidden_size)}`` for every requested ``k``, rotated where layer
            exit k has a rotation (:meth:`set_exit_rotations`).
        """
        num_layers = self.num_layers
        if isinstance(layers, np.ndarray) and layers.ndim == 0:
            layers = layers.item()
        if isinstance(layers, (int, np.integer)):  # one layer count (bool is refused below)
            layers = [layers]
        if layers is not None and not isinstance(layers, Iterable):
            raise InvalidLayersError(f"layers must be a layer count or a list of them, got {layers!r:.50}")
        if (
            not isinstance(features, Mapping)
            or "input_ids" not in features
            or "attention_mask" not in features
        ):
            what = sorted(features) if isinstance(features, Mapping) else type(features).__name__
            raise InvalidInputError(
                f"features must be tokenizer output with input_ids and attention_mask, got {what}"
            )
        wanted = sorted(set(layers)) if layers is not None else [num_layers]
        if not wanted:
            raise InvalidLayersError("layers is empty: request at least one layer")
        for k in wanted:
            if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 0 <= k <= num_layers:
                raise InvalidLayersError(f"layer {k!r} is out of range: the model has layers 0..{num_layers}")
        deepest = max(wanted[-1], 1)
        inputs = {key: value for key, value in features.items() if key in self._input_names}
        need_all = wanted != [deepest]
        mask = features["attention_mask"]
        fused = self._fused_runner(inputs)
        if fused is not None:  # the same embeddings from torch's fused layers (fuse_layers), pooled there
            pooled = fused.pooled(inputs, deepest, wanted, self.pooling_mode)
            return {k: self._rotate(k, pooled[k]) for k in wanted}
        # shares every weight (self is not changed); BERT's pooler head is left out: nothing uses it
        transformer = layer_view(self.transformer, deepest, drop_pooler=True)
        out = self._runner(transformer, deepest)(**inputs, output_hidden_states=need_all, return_dict=True)
        # each exit as a model cut there returns it
        states = exit_states(transformer, out, wanted) if need_all else {deepest: out.last_hidden_state}
        # Pooling in float32 whatever the layers ran in (.float() is a no-op for a float32 model).
        return {k: self._rotate(k, pool(states[k].float(), mask, self.pooling_mode)) for k in wanted}

    # ------------------------------------------------------------------ inference
    # iter_encode, encode and encode_layers come from Encoder, which batches texts through this method.
    def _encode_batch(
        self, encoded: Mapping[str, Sequence[Sequence[int]]], rows: Sequence[int], layers: list[int]
    ) -> dict[int, np.ndarray]:
        """Pooled float32 embeddings (numpy) of ``rows`` of :meth:`tokenize` output for every layer count.

        Gradients are never recorded (padded inside ``inference_mode`` too, as the server's engine does:
        compiled graphs see the same tensors); the model's train/eval mode is used as it is (loaded models
        are in eval mode). Safe from many threads at once (see :func:`~matryoshka2d.truncation.layer_view`).
        """
        with torch.inference_mode():
            pooled = self.forward(self.pad(encoded, rows), layers)
            return {k: emb.float().cpu().numpy() for k, emb in pooled.items()}

    # ------------------------------------------------------------------ export
    def truncate(self, layers: int | None = None, dim: int | None = None) -> EmbeddingModel:
        """A standalone copy with only the first ``layers`` layers and output size ``dim``.

        Only the kept layers are copied. Saving the result writes ``num_hidden_layers = layers`` in its
        config and records ``dim`` (and the kept exit's rotation, if it has one) as a Dense module so that
        sentence-transformers loading the folder produces the same embeddings as
        ``self.encode(texts, layers=layers, dim=dim)``.
        """
        k = check_layers(layers, self.num_layers) if layers is not None else self.num_layers
        d = check_dim(dim, self.dim) if dim is not None else self.dim
        transformer = copy.deepcopy(layer_view(self.transformer, k))  # copies the first k layers only
        keep_first_layers(transformer, k)
        model = EmbeddingModel(
            transformer,
            copy.deepcopy(self.tokenizer),
            pooling_mode=self.pooling_mode,
            max_seq_length=self.max_seq_length,
            dim=d,
            do_lower_case=self.do_lower_case,
            # encode() normalises by default (and re-normalises a dim prefix): the exported folder gets a
            # Normalize module so that sentence-transformers gives the same embeddings.
            normalize=True,
            name_or_path=self.name_or_path,
            exit_rotations={j: r.cpu() for j, r in self.exit_rotations.items() if j <= k},
            prompts=self.prompts,
            default_prompt_name=self.default_prompt_name,
            similarity_fn_name=self.similarity_fn_name,
            include_prompt=self.include_prompt,
        )
        model.metadata = {
            # "onnx" names graph files of this model's folder, which the new one has only if exported so
            **{key: value for key, value in self.metadata.items() if key != "onnx"},
            "truncated_from": {"model": self.name_or_path, "num_layers": self.num_layers, "dim": self.dim},
        }
        model.train(self.training)
        return model

    def extra_repr(self) -> str:
        return (
            f"name_or_path={self.name_or_path!r}, num_layers={self.num_layers}, dim={self.dim}, "
            f"pooling={self.pooling_mode!r}, max_seq_length={self.max_seq_length}"
        )


def _check_token_embeddings(transformer: nn.Module, tokenizer, name: str) -> None:
    """Refuse a tokenizer that gives ids past the model's token embeddings (e.g. tokens added to the
    tokenizer without ``resize_token_embeddings``): such a text would fail deep inside the embedding lookup
    (torch) or the graph (ONNX Runtime), and only for the texts holding one of those tokens."""
    get_embeddings = getattr(transformer, "get_input_embeddings", None)
    embeddings = get_embeddings() if callable(get_embeddings) else None
    rows = getattr(embeddings, "num_embeddings", None)
    try:
        vocab = tokenizer.get_vocab()  # added tokens included
    except (AttributeError, NotImplementedError):
        return
    if rows is None or not vocab:
        return
    highest = max(vocab.values())
    if highest >= rows:
        token = max(vocab, key=vocab.get)
        raise ModelLoadError(
            f"{name}: its tokenizer gives token ids up to {highest} ({token!r}) but the model has only "
            f"{rows} token embeddings; resize them after adding tokens "
            "(model.resize_token_embeddings(len(tokenizer)) in transformers) and save the model again"
        )


def default_model_card(model: EmbeddingModel) -> str:
    """A short README.md for a saved model folder."""
    source = model.metadata.get("truncated_from")
    lines = [
        "---",
        "library_name: sentence-transformers",
        "tags: [sentence-transformers, sentence-similarity, matryoshka, matryoshka2d]",
        "---",
        "",
        f"# {Path(str(model.name_or_path)).name or 'matryoshka2d model'}",
        "",
        f"Sentence embedding model saved by matryoshka2d: {model.num_layers} transformer layers, "
        f"{model.dim}-dim embeddings, {model.pooling_mode} pooling"
        + (", normalised." if model.normalize else "."),
    ]
    if source:
        lines += [
            "",
            f"Truncated from `{source['model']}` ({source['num_layers']} layers, {source['dim']} dims).",
        ]
    rotated = sorted(model.exit_rotations)
    if rotated:
        where = "`exit_rotations.safetensors`" if rotated != [model.num_layers] else ""
        if model.num_layers in rotated:
            where += (" and " if where else "") + "the Dense module (the last layer's)"
        lines += [
            "",
            f"Layer exits {', '.join(map(str, rotated))} are rotated to their principal directions "
            f"(matryoshka2d exit rotations: {where}), so their small dim prefixes keep more.",
        ]
    lines += [
        "",
        "```python",
        "from sentence_transformers import SentenceTransformer",
        'model = SentenceTransformer("path/to/this/folder")',
        "```",
        "",
    ]
    return "\n".join(lines)
