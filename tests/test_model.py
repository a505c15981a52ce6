"""EmbeddingModel: encoding at any (layers, dims), parity with sentence-transformers, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import FAMILIES, SENTENCES, build_tiny_model, prompted_copy

from matryoshka2d import (
    EmbeddingModel,
    InvalidDimError,
    InvalidInputError,
    InvalidLayersError,
    ModelLoadError,
)
from matryoshka2d.truncation import find_layer_stack


def st_model(folder, layers: int | None = None):
    """sentence-transformers on the same folder, optionally after the seed's manual layer surgery."""
    from sentence_transformers import SentenceTransformer

    st = SentenceTransformer(str(folder), device="cpu")
    if layers is not None:
        parent, name = find_layer_stack(st[0].auto_model)
        setattr(parent, name, getattr(parent, name)[:layers])
    return st


@pytest.mark.parametrize("family", FAMILIES)
def test_full_size_equals_sentence_transformers(tiny_model_dirs, family):
    model = EmbeddingModel.load(tiny_model_dirs[family])
    ours = model.encode(SENTENCES, batch_size=5)
    theirs = st_model(tiny_model_dirs[family]).encode(SENTENCES, batch_size=5)
    assert ours.dtype == np.float32 and ours.shape == (len(SENTENCES), model.dim)
    assert np.abs(ours - theirs).max() <= 1e-5


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layers", [1, 2, 3])
def test_layers_equal_sentence_transformers_after_surgery(tiny_model_dirs, family, layers):
    model = EmbeddingModel.load(tiny_model_dirs[family])
    ours = model.encode(SENTENCES, layers=layers)
    theirs = st_model(tiny_model_dirs[family], layers=layers).encode(SENTENCES)
    assert np.abs(ours - theirs).max() <= 1e-5
    assert model.num_layers == 4  # the loaded model is unchanged


def test_layers_run_only_the_first_k_layers(tiny_model):
    calls = [0] * tiny_model.num_layers
    parent, name = find_layer_stack(tiny_model.transformer)
    hooks = [
        layer.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, layer in enumerate(getattr(parent, name))
    ]
    try:
        tiny_model.encode(SENTENCES, layers=2, batch_size=4)
    finally:
        for h in hooks:
            h.remove()
    assert calls[:2] == [3, 3] and calls[2:] == [0, 0]


def test_the_bert_pooler_head_never_runs(tiny_model):
    """The transformer's own pooler (dense + tanh on the first token) is unused by embeddings: a model
    loaded with one (as all-MiniLM-L6-v2 is) never runs it, at full depth or fewer layers, and gives the
    same embeddings as without it."""
    transformer = type(tiny_model.transformer)(tiny_model.transformer.config).eval()  # with the pooler
    transformer.load_state_dict(tiny_model.transformer.state_dict(), strict=False)
    model = EmbeddingModel(transformer, tiny_model.tokenizer)
    calls = []
    hook = transformer.pooler.register_forward_hook(lambda *_: calls.append(1))
    try:
        for layers in (tiny_model.num_layers, 2):
            np.testing.assert_allclose(
                model.encode(SENTENCES, layers=layers), tiny_model.encode(SENTENCES, layers=layers), atol=1e-6
            )
        features = model.tokenize(SENTENCES[:2])
        with torch.inference_mode():
            exits, reference = (m.forward(features, layers=[1, m.num_layers]) for m in (model, tiny_model))
            for k in reference:
                torch.testing.assert_close(exits[k], reference[k], rtol=0, atol=1e-6)
    finally:
        hook.remove()
    assert calls == [] and isinstance(transformer.pooler, torch.nn.Module)


def test_layers_do_not_copy_or_change_weights(tiny_model):
    before = {k: v.clone() for k, v in tiny_model.state_dict().items()}
    ptrs = {k: v.data_ptr() for k, v in tiny_model.state_dict().items()}
    tiny_model.encode(SENTENCES, layers=1)
    after = tiny_model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) and ptrs[k] == after[k].data_ptr() for k in before)


def test_encode_layers_one_pass_matches_per_layer_encode(tiny_model):
    by_layer = tiny_model.encode_layers(SENTENCES, layers=[1, 2, 3, 4])
    for k, emb in by_layer.items():
        single = tiny_model.encode(SENTENCES, layers=k, normalize=False)
        np.testing.assert_allclose(emb, single, atol=1e-5)


def test_dim_is_prefix_renormalised(tiny_model):
    full = tiny_model.encode(SENTENCES, normalize=False)
    small = tiny_model.encode(SENTENCES, dim=8)
    expected = full[:, :8] / np.linalg.norm(full[:, :8], axis=1, keepdims=True)
    np.testing.assert_allclose(small, expected, atol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(small, axis=1), 1.0, atol=1e-6)
    raw = tiny_model.encode(SENTENCES, dim=8, normalize=False)
    np.testing.assert_allclose(raw, full[:, :8], atol=1e-6)


def test_batch_size_and_order_do_not_change_results(tiny_model):
    a = tiny_model.encode(SENTENCES, batch_size=1)
    b = tiny_model.encode(SENTENCES, batch_size=64)
    c = tiny_model.encode(SENTENCES[::-1], batch_size=3)[::-1]
    assert np.abs(a - b).max() <= 1e-5 and np.abs(a - c).max() <= 1e-5


def test_single_string_gives_a_vector(tiny_model):
    vec = tiny_model.encode("a cat sat on the mat", dim=16)
    assert vec.shape == (16,)
    np.testing.assert_allclose(vec, tiny_model.encode(["a cat sat on the mat"], dim=16)[0])


def test_forward_returns_every_requested_layer_with_gradients(tiny_model):
    tiny_model.train()
    features = tiny_model.tokenize(SENTENCES[:3])
    out = tiny_model.forward(features, layers=[0, 2, 4])
    assert sorted(out) == [0, 2, 4] and all(v.shape == (3, tiny_model.dim) for v in out.values())
    out[2].sum().backward()
    layers = find_layer_stack(tiny_model.transformer)[0].layer
    has_grad = [all(p.grad is not None for p in layer.parameters()) for layer in layers]
    assert has_grad == [True, True, False, False]  # only the layers below the output that was used


@pytest.mark.parametrize("layers", [0, 5, -1, 2.0, True])
def test_bad_layers(tiny_model, layers):
    with pytest.raises(InvalidLayersError, match="layers"):
        tiny_model.encode(SENTENCES, layers=layers)


@pytest.mark.parametrize("dim", [0, 33, -4, "8"])
def test_bad_dim(tiny_model, dim):
    with pytest.raises(InvalidDimError, match="dim"):
        tiny_model.encode(SENTENCES, dim=dim)


@pytest.mark.parametrize("texts", [[], ["ok", 3], ["ok", None], 42])
def test_bad_texts(tiny_model, texts):
    with pytest.raises(InvalidInputError):
        tiny_model.encode(texts)


def test_empty_layer_list(tiny_model):
    with pytest.raises(InvalidLayersError, match="empty"):
        tiny_model.encode_layers(SENTENCES, layers=[])


def test_long_texts_fit_roberta_position_offset(tmp_path):
    model = build_tiny_model(tmp_path / "r", "roberta")
    model.tokenizer.model_max_length = int(1e30)  # a tokenizer without a configured limit
    model = EmbeddingModel(model.transformer, model.tokenizer)
    assert model.max_seq_length == 66 - 1  # max_position_embeddings minus (pad_token_id + 1)
    long_text = " ".join(["cat"] * 200)
    assert model.encode([long_text]).shape == (1, 32)


def test_long_texts_fit_mpnet_position_offset(tmp_path):
    """MPNet's position ids start at 2 (a padding index fixed at 1, whatever pad_token_id says)."""
    model = build_tiny_model(tmp_path / "m", "mpnet")
    model.tokenizer.model_max_length = int(1e30)
    auto = EmbeddingModel(model.transformer, model.tokenizer)
    assert auto.max_seq_length == 64 - 2
    assert auto.encode([" ".join(["cat"] * 200)]).shape == (1, 32)  # past 62 tokens: an IndexError before
    with pytest.raises(ModelLoadError, match="1..62"):
        EmbeddingModel(model.transformer, model.tokenizer, max_seq_length=63)


def test_bad_batch_size(tiny_model):
    with pytest.raises(InvalidInputError, match="batch_size"):
        tiny_model.encode(SENTENCES, batch_size=0)


def test_unknown_architecture_names_the_class(tmp_path):
    model = build_tiny_model(tmp_path / "m")

    class OddEncoder(torch.nn.Module):
        config = model.transformer.config

    with pytest.raises(ModelLoadError, match="OddEncoder"):
        EmbeddingModel(OddEncoder(), model.tokenizer)


def test_truncate_is_a_standalone_copy(tiny_model):
    small = tiny_model.truncate(layers=2, dim=16)
    assert (small.num_layers, small.dim) == (2, 16) and tiny_model.num_layers == 4
    assert small.transformer.config.num_hidden_layers == 2
    np.testing.assert_allclose(
        small.encode(SENTENCES), tiny_model.encode(SENTENCES, layers=2, dim=16), atol=1e-6
    )
    with pytest.raises(InvalidDimError):
        small.encode(SENTENCES, dim=17)
    with pytest.raises(InvalidLayersError):
        tiny_model.truncate(layers=5)


# ---------------------------------------------------------------------------------------------- dtype
def test_default_dtype_is_float32_and_recorded(tiny_model):
    assert tiny_model.dtype == torch.float32 and tiny_model.precision == "float32"
    assert tiny_model.backend == "torch" and "torch float32" in tiny_model.describe()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_low_precision_layers_pool_in_float32(tiny_model_dir, tiny_model, dtype):
    low = EmbeddingModel.load(tiny_model_dir, dtype=dtype)
    assert low.dtype == getattr(torch, dtype) and low.precision == dtype
    features = low.tokenize(SENTENCES[:3])
    assert all(v.dtype == torch.float32 for v in low.forward(features, layers=[1, 4]).values())
    emb = low.encode(SENTENCES, layers=3, dim=16)
    ref = tiny_model.encode(SENTENCES, layers=3, dim=16)
    assert emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)  # normalised in float32
    assert (emb * ref).sum(axis=1).min() > 0.99  # cosine to the float32 embeddings
    assert not np.array_equal(emb, ref)  # the layers really ran in low precision


def test_pad_multiple_is_8_only_for_bf16_layers_on_a_cpu(tiny_model_dir, tiny_model):
    assert tiny_model.pad_multiple == 1
    assert EmbeddingModel.load(tiny_model_dir, dtype="float16").pad_multiple == 1
    low = EmbeddingModel.load(tiny_model_dir, dtype="bfloat16")
    assert low.pad_multiple == 8
    low.tokenizer.padding_side = "left"  # extra padding would move absolute positions: none
    assert low.pad_multiple == 1


@pytest.mark.parametrize(
    "family, pooling",
    [(family, "mean") for family in (*FAMILIES, "modernbert", "llama")]
    + [("bert", mode) for mode in ("cls", "max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")],
)
def test_padding_to_a_multiple_changes_no_embedding(tmp_path, family, pooling):
    """The server rounds batch widths up (Encoder.pad's ``multiple``): the extra padding is masked out
    for every family and pooling mode."""
    model = build_tiny_model(tmp_path, family, pooling_mode=pooling)
    texts = SENTENCES[:5]
    encoded = model.tokenize(texts, padding=False)
    rows = range(len(texts))
    longest = max(len(ids) for ids in encoded["input_ids"])
    padded = model.pad(encoded, rows, multiple=8)
    assert padded["input_ids"].shape[1] == -(-longest // 8) * 8 > longest
    with torch.inference_mode():
        exact, rounded = model.forward(model.pad(encoded, rows), [2, 4]), model.forward(padded, [2, 4])
    for k in (2, 4):
        torch.testing.assert_close(rounded[k], exact[k], atol=1e-5, rtol=1e-5)


def test_auto_dtype_follows_the_hardware(monkeypatch):
    from matryoshka2d import model as model_module

    monkeypatch.setattr(model_module, "cpu_has_native_bf16", lambda: True)
    assert model_module.resolve_dtype("auto") == torch.bfloat16
    monkeypatch.setattr(model_module, "cpu_has_native_bf16", lambda: False)
    assert model_module.resolve_dtype("auto") == torch.float32
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 5))  # T4: emulated
    assert model_module.resolve_dtype("auto", "cuda") == torch.float32
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))  # A100: native
    assert model_module.resolve_dtype("auto", "cuda:1") == torch.bfloat16
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert model_module.resolve_dtype("auto", "cuda") == torch.float32
    assert model_module.resolve_dtype("float16", "cuda") == torch.float16
    assert model_module.resolve_dtype(torch.bfloat16) == torch.bfloat16


def test_bf16_on_a_cpu_that_emulates_it_warns(tiny_model_dir, monkeypatch):
    import warnings

    from matryoshka2d import model as model_module

    monkeypatch.setattr(model_module, "cpu_has_native_bf16", lambda: False)
    with pytest.warns(RuntimeWarning, match="bfloat16 on this CPU is emulated .*dtype='auto' picks float32"):
        EmbeddingModel.load(tiny_model_dir, dtype="bfloat16")
    monkeypatch.setattr(model_module, "cpu_has_native_bf16", lambda: True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # native bf16, float32, and auto: no warning
        EmbeddingModel.load(tiny_model_dir, dtype="bfloat16")
        monkeypatch.setattr(model_module, "cpu_has_native_bf16", lambda: False)
        EmbeddingModel.load(tiny_model_dir, dtype="auto")
        EmbeddingModel.load(tiny_model_dir)


def test_cpu_bf16_detection_reads_cpu_flags():
    from matryoshka2d.model import cpu_has_native_bf16

    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        flags = []
    assert cpu_has_native_bf16() == bool({"avx512_bf16", "amx_bf16"} & set(flags))


@pytest.mark.parametrize("dtype", ["fp8", "float64", torch.int8, None])
def test_bad_dtype_names_the_value(tiny_model_dir, dtype):
    with pytest.raises(InvalidInputError, match="dtype"):
        EmbeddingModel.load(tiny_model_dir, dtype=dtype)


# ---------------------------------------------------------------- compiled inference (torch.compile)
def test_compiled_inference_equals_eager_and_training_stays_eager(tmp_path):
    model = build_tiny_model(tmp_path, "bert", num_layers=3)
    eager = {k: model.encode(SENTENCES, layers=k, batch_size=4) for k in (1, 3)}
    multi = model.encode_layers(SENTENCES, layers=[1, 2, 3], batch_size=4)
    assert model.compile_for_inference() is model and model.compiled
    for k in (1, 3):
        np.testing.assert_allclose(model.encode(SENTENCES, layers=k, batch_size=4), eager[k], atol=1e-5)
    one = model.encode(SENTENCES[:1], layers=3)  # a batch of one text: its own graph
    np.testing.assert_allclose(one, eager[3][:1], atol=1e-5)
    for k, value in model.encode_layers(SENTENCES, layers=[1, 2, 3], batch_size=4).items():
        np.testing.assert_allclose(value, multi[k], atol=1e-5)
    assert set(model._compiled) == {1, 3}  # one compiled module per deepest layer count
    # a pass that records gradients (training) runs eagerly and gets gradients
    features = model.tokenize(SENTENCES[:2])
    out = model(features, layers=[3])[3]
    assert out.requires_grad
    out.sum().backward()
    assert next(model.transformer.parameters()).grad is not None
    assert model.compile_for_inference(enabled=False) is model and not model.compiled and not model._compiled


def test_compiled_inference_follows_changed_weights(tmp_path):
    model = build_tiny_model(tmp_path, "bert", num_layers=2)
    model.compile_for_inference()
    before = model.encode(SENTENCES, layers=2)
    with torch.no_grad():  # an in-place change, like an optimizer step: frozen graphs are now stale
        next(model.transformer.parameters()).mul_(1.5)
    after = model.encode(SENTENCES, layers=2)
    model.compile_for_inference(enabled=False)
    np.testing.assert_allclose(after, model.encode(SENTENCES, layers=2), atol=1e-5)
    assert np.abs(after - before).max() > 1e-3
    # a fused optimizer step does not bump the version counters: still noticed
    model.compile_for_inference()
    model.encode(SENTENCES, layers=2)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, fused=True)
    model(model.tokenize(SENTENCES), layers=[2])[2].pow(2).sum().backward()
    optimizer.step()
    model.eval()
    stepped = model.encode(SENTENCES, layers=2)
    model.compile_for_inference(enabled=False)
    np.testing.assert_allclose(stepped, model.encode(SENTENCES, layers=2), atol=1e-5)


def test_warm_up_compiles_every_layer_count_asked(tmp_path):
    from torch._dynamo.utils import counters

    model = build_tiny_model(tmp_path, "bert", num_layers=3)
    model.compile_for_inference().warm_up([1, 3], exits=True)
    assert set(model._compiled) == {1, 3}
    graphs = counters["stats"]["unique_graphs"]
    for texts in (SENTENCES, SENTENCES[:1]):  # several exits at once too (the server's shared mode)
        model.encode_layers(texts, layers=[1, 2, 3], batch_size=3)
        model.encode(texts, layers=1)
    assert counters["stats"]["unique_graphs"] == graphs
    with pytest.raises(InvalidLayersError, match="1..3"):
        model.warm_up([4])


def test_compile_needs_a_cpu_compiler(tmp_path, monkeypatch):
    model = build_tiny_model(tmp_path, "bert", num_layers=2)
    monkeypatch.setenv("PATH", str(tmp_path))  # no g++ to be found
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(InvalidInputError, match="C\\+\\+ compiler"):
        model.compile_for_inference()
    assert not model.compiled


def test_default_prompt_is_prepended_as_sentence_transformers_does(tiny_model_dir, tmp_path):
    """A folder's default prompt changes its embeddings in sentence-transformers: ours equal them."""
    folder = prompted_copy(tiny_model_dir, tmp_path / "prompted", {"query": "query: ", "doc": ""}, "query")
    model = EmbeddingModel.load(folder)
    assert model.prompt == "query: "
    ours = model.encode(SENTENCES, layers=2)
    theirs = st_model(folder, layers=2).encode(SENTENCES)
    assert np.abs(ours - theirs).max() <= 1e-5
    plain = EmbeddingModel.load(tiny_model_dir).encode(SENTENCES, layers=2)
    assert np.abs(ours - plain).max() > 1e-3  # the prompt does change them
    # tokenize (the server's and training's path) counts the prompt's tokens too
    assert len(model.tokenize(["x"], padding=False)["input_ids"][0]) > 3


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_a_call_picks_a_prompt_as_sentence_transformers_does(tiny_model_dir, tmp_path, backend):
    """encode(prompt_name=) / encode(prompt=) as sentence-transformers' encode: a named prompt, a given
    one, or "" for none even where the folder has a default prompt; on every backend."""
    from matryoshka2d.backends import load_encoder

    prompts = {"query": "query: ", "document": "passage: "}
    folder = prompted_copy(tiny_model_dir, tmp_path / "prompted", prompts, "query")
    model = load_encoder(folder, backend=backend)
    st = st_model(folder)
    atol = 1e-5 if backend == "torch" else 1e-4
    for kwargs in ({}, {"prompt_name": "document"}, {"prompt": "search: "}, {"prompt": ""}):
        ours = model.encode(SENTENCES, **kwargs)
        np.testing.assert_allclose(ours, st.encode(SENTENCES, **kwargs), atol=atol, err_msg=str(kwargs))
    assert np.abs(model.encode(SENTENCES, prompt_name="document") - model.encode(SENTENCES)).max() > 1e-3
    plain = load_encoder(tiny_model_dir, backend=backend)
    np.testing.assert_allclose(model.encode(SENTENCES, prompt=""), plain.encode(SENTENCES), atol=1e-6)
    # every cell of one pass gets the prompt, and encode_layers too
    (batch,) = model.iter_encode(SENTENCES, layers=[2, 4], dims=[8], prompt_name="document")
    np.testing.assert_allclose(
        batch[(2, 8)], model.encode(SENTENCES, 2, 8, prompt_name="document"), atol=1e-6
    )
    full = model.encode_layers(SENTENCES[:2], layers=[4], prompt="search: ")[4]
    unit = full / np.linalg.norm(full, axis=1, keepdims=True)
    np.testing.assert_allclose(unit, model.encode(SENTENCES[:2], prompt="search: "), atol=1e-5)
    with pytest.raises(
        InvalidInputError,
        match=r"prompt_name 'doc' is not one of the model's prompts \('document', 'query'\)",
    ):
        model.encode(SENTENCES, prompt_name="doc")
    with pytest.raises(InvalidInputError, match="not both"):
        model.encode(SENTENCES, prompt_name="query", prompt="q: ")
    # as in sentence-transformers 6, "query" and "document" are prompts of every model: "" if undefined
    np.testing.assert_allclose(
        plain.encode(SENTENCES, prompt_name="query"), plain.encode(SENTENCES), atol=1e-7
    )
    np.testing.assert_allclose(
        plain.encode(SENTENCES, prompt_name="document"),
        st_model(tiny_model_dir).encode(SENTENCES, prompt_name="document"),
        atol=atol,
    )
    with pytest.raises(InvalidInputError, match="prompt must be a string"):
        model.encode(SENTENCES, prompt=3)


def test_prompts_are_kept_when_saved_and_truncated(tiny_model_dir, tmp_path):
    import json

    folder = prompted_copy(tiny_model_dir, tmp_path / "prompted", {"query": "query: ", "doc": ""}, "query")
    model = EmbeddingModel.load(folder)
    model.truncate(layers=2, dim=16).save(tmp_path / "out")
    config = json.loads((tmp_path / "out" / "config_sentence_transformers.json").read_text())
    assert config["prompts"] == {"query": "query: ", "doc": ""} and config["default_prompt_name"] == "query"
    saved = EmbeddingModel.load(tmp_path / "out")
    assert np.abs(saved.encode(SENTENCES) - model.encode(SENTENCES, layers=2, dim=16)).max() <= 1e-5
    assert np.abs(saved.encode(SENTENCES) - st_model(tmp_path / "out").encode(SENTENCES)).max() <= 1e-5


def test_prompt_folders_we_cannot_reproduce_are_refused(tiny_model_dir, tmp_path):
    import json

    excluded = prompted_copy(
        tiny_model_dir, tmp_path / "a", {"query": "query: "}, "query", include_prompt=False
    )
    with pytest.raises(ModelLoadError, match="include_prompt: false"):
        EmbeddingModel.load(excluded)
    # without a default prompt, include_prompt changes nothing: loaded, kept when saved, and a prompt
    # asked for in a call is refused (sentence-transformers would pool without its tokens)
    model = EmbeddingModel.load(
        prompted_copy(tiny_model_dir, tmp_path / "b", {"query": "q: "}, None, include_prompt=False)
    )
    with pytest.raises(InvalidInputError, match="include_prompt: false"):
        model.encode(SENTENCES, prompt_name="query")
    assert model.encode(SENTENCES, prompt="").shape == (len(SENTENCES), model.dim)
    model.save(tmp_path / "b-saved")
    pooling = json.loads((tmp_path / "b-saved" / "1_Pooling" / "config.json").read_text())
    assert pooling["include_prompt"] is False
    with pytest.raises(InvalidInputError, match="include_prompt: false"):
        EmbeddingModel.load(tmp_path / "b-saved").encode(SENTENCES, prompt="q: ")
    with pytest.raises(ModelLoadError, match="include_prompt=False"):  # built in code: the same rule
        EmbeddingModel(
            model.transformer,
            model.tokenizer,
            prompts={"q": "q: "},
            default_prompt_name="q",
            include_prompt=False,
        )
    with pytest.raises(ModelLoadError, match="default_prompt_name 'other' is not one of its prompts"):
        EmbeddingModel.load(prompted_copy(tiny_model_dir, tmp_path / "c", {"query": "q: "}, "other"))
    bad = prompted_copy(tiny_model_dir, tmp_path / "d", {"query": 3}, None)
    with pytest.raises(ModelLoadError, match="prompts must map prompt names to strings"):
        EmbeddingModel.load(bad)
    (tmp_path / "d" / "config_sentence_transformers.json").write_text(json.dumps([1]))
    with pytest.raises(ModelLoadError, match="expected a JSON object"):
        EmbeddingModel.load(bad)


@pytest.mark.parametrize(
    "device, message",
    [
        ("gpu", "unknown device 'gpu'"),
        (1.5, "device must be a name"),
        (-1, "unknown device"),
        (torch.cuda.device_count(), "CUDA GPU"),  # an index past the last GPU (cuda:0 without one)
        (True, "device must be a name"),
        ("cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}", "CUDA GPU"),
    ],
)
def test_bad_devices_are_one_clear_error_before_loading(tiny_model_dir, device, message):
    with pytest.raises(InvalidInputError, match=message):
        EmbeddingModel.load(tiny_model_dir, device=device)


def test_forward_takes_one_layer_count_and_checks_its_features(tiny_model):
    features = tiny_model.pad(tiny_model.tokenize(SENTENCES[:3], padding=False), [0, 1, 2])
    with torch.no_grad():
        one = tiny_model.forward(features, layers=2)
        listed = tiny_model.forward(features, layers=[2])
        zero_d = tiny_model.forward(features, layers=np.array(2))
    assert list(one) == [2] and torch.equal(one[2], listed[2]) and torch.equal(zero_d[2], listed[2])
    with pytest.raises(InvalidLayersError, match="layers must be a layer count or a list"):
        tiny_model.forward(features, layers=2.5)
    with pytest.raises(InvalidInputError, match="input_ids and attention_mask"):
        tiny_model.forward({"input_ids": features["input_ids"]})
    with pytest.raises(InvalidInputError, match="input_ids and attention_mask"):
        tiny_model.forward(features["input_ids"])


# ---------------------------------------------------------------------- unpadded tokenising
TRICKY_TEXTS = [
    "Héllo Wörld, naïve café!",  # accents stripped and lower-cased by BERT's normaliser
    "the [SEP] and [MASK] tokens written in the text",
    "",
    "   spaces   around   ",
    "中文 and emoji 🙂 mixed",
    " ".join(["word"] * 200),  # past max_seq_length: truncated
]


def hf_unpadded(model, texts):
    """What the tokenizer's own call gives (the path every padded call still takes)."""
    tokenizer_texts = model.tokenizer_input(texts)
    return dict(model.tokenizer(tokenizer_texts, truncation=True, max_length=model.max_seq_length))


@pytest.mark.parametrize("family", FAMILIES)
def test_unpadded_tokenize_equals_the_tokenizers_own_call(tiny_model_dirs, family):
    model = EmbeddingModel.load(tiny_model_dirs[family])
    texts = TRICKY_TEXTS + SENTENCES
    got = model.tokenize(texts, padding=False)
    assert list(got) == list(hf_unpadded(model, texts))  # the same keys, in the same order
    assert got == hf_unpadded(model, texts)
    assert max(len(ids) for ids in got["input_ids"]) == model.max_seq_length


def test_unpadded_tokenize_of_a_real_tokenizer_in_parts_on_threads(monkeypatch):
    """MiniLM's tokenizer (BERT normaliser, ~30k word pieces); a long list is cut into parts tokenised on
    torch's thread count of threads, joined back in input order."""
    from concurrent import futures

    from conftest import packaged_minilm

    model = EmbeddingModel.load(packaged_minilm())
    tricky, plain = TRICKY_TEXTS, SENTENCES
    texts = [f"{i}: {tricky[i % len(tricky)]} {plain[i % len(plain)]}" for i in range(1300)]
    started = []
    real_pool = futures.ThreadPoolExecutor

    def counting_pool(workers, *args, **kwargs):
        started.append(workers)
        return real_pool(workers, *args, **kwargs)

    monkeypatch.setattr(futures, "ThreadPoolExecutor", counting_pool)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    got = model.tokenize(texts, padding=False)
    assert started == [1]  # 1,300 texts: two parts of >= 512 (the caller runs one), not three
    assert got == hf_unpadded(model, texts)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)
    assert model.tokenize(texts, padding=False) == got and started == [1]  # one thread: one call


def test_unpadded_tokenize_follows_changed_settings(tiny_model):
    texts = [" ".join(["word"] * 30), "the [SEP] token"]
    first = tiny_model.tokenize(texts, padding=False)["input_ids"]
    tiny_model.max_seq_length = 8
    assert tiny_model.tokenize(texts, padding=False) == hf_unpadded(tiny_model, texts)
    assert len(tiny_model.tokenize(texts, padding=False)["input_ids"][0]) == 8 < len(first[0])
    tiny_model.tokenizer.truncation_side = "left"
    tiny_model.tokenizer.split_special_tokens = True
    assert tiny_model.tokenize(texts, padding=False) == hf_unpadded(tiny_model, texts)
    assert tiny_model.tokenize(texts, padding=False)["input_ids"][1] != first[1]  # [SEP] split now


def test_unpadded_tokenize_from_many_threads_beside_padded_calls(tiny_model):
    """No lock: the private copy is never changed, while padded calls keep switching the shared
    tokenizer's state (a fast tokenizer raises "Already borrowed" if one is changed while in use)."""
    import threading

    texts = [f"{SENTENCES[i % len(SENTENCES)]} {i}" for i in range(40)]
    expected = hf_unpadded(tiny_model, texts)
    padded_expected = tiny_model.tokenize(texts[:3])["input_ids"]
    errors, barrier = [], threading.Barrier(8)

    def unpadded():
        if tiny_model.tokenize(texts, padding=False) != expected:
            errors.append("wrong ids")

    def padded():
        if not torch.equal(tiny_model.tokenize(texts[:3])["input_ids"], padded_expected):
            errors.append("wrong padded ids")

    def repeat(call):
        barrier.wait()
        try:
            for _ in range(60):
                call()
        except Exception as e:  # e.g. RuntimeError("Already borrowed") from the tokenizers library
            errors.append(repr(e))

    threads = [threading.Thread(target=repeat, args=(unpadded,)) for _ in range(6)] + [
        threading.Thread(target=repeat, args=(padded,)) for _ in range(2)
    ]
    try:
        for t in threads:
            t.start()
    finally:
        for t in threads:
            t.join()
    assert errors == []


def test_unpadded_tokenize_follows_changes_to_the_tokenizer_itself(tiny_model):
    """Added tokens, a new normaliser or post-processor after the first call: the private copy is rebuilt."""
    from tokenizers import normalizers, processors

    texts = ["newword and the TOKEN", "café"]
    tiny_model.tokenize(texts, padding=False)  # builds the private copy
    tiny_model.tokenizer.add_tokens(["newword"])
    assert tiny_model.tokenize(texts, padding=False) == hf_unpadded(tiny_model, texts)
    backend = tiny_model.tokenizer.backend_tokenizer
    backend.normalizer = normalizers.Sequence([normalizers.NFD(), normalizers.Lowercase()])
    assert tiny_model.tokenize(texts, padding=False) == hf_unpadded(tiny_model, texts)
    backend.post_processor = processors.TemplateProcessing(single="[CLS] $A", special_tokens=[("[CLS]", 2)])
    got = tiny_model.tokenize(texts, padding=False)
    assert got == hf_unpadded(tiny_model, texts) and got["input_ids"][0][-1] != 3  # no [SEP] now


def test_a_tokenizer_with_a_custom_python_component_still_tokenises(tiny_model):
    """A custom pre-tokeniser cannot be copied (or compared): the tokenizer's own call is used."""
    from tokenizers import pre_tokenizers

    class Whitespace:
        def pre_tokenize(self, pretok):
            pretok.split(lambda i, s: s.split(" ", "removed"))

    tiny_model.tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.PreTokenizer.custom(Whitespace())
    texts = ["the cat", "a dog runs"]
    assert tiny_model.tokenize(texts, padding=False) == hf_unpadded(tiny_model, texts)
    assert tiny_model.encode(texts).shape == (2, tiny_model.dim)


def test_workers_divide_torchs_threads_in_the_worker_threads_only(tiny_model):
    """encode(workers=2) on 2 torch threads: each worker thread runs torch with 1, the caller keeps 2 (so
    what it runs next with OpenMP, e.g. faiss, is not slowed), and torch's default is 2 again afterwards."""
    import threading

    seen: dict[str, int] = {}
    real = tiny_model._encode_batch

    def spy(encoded, rows, layers):
        seen[threading.current_thread().name] = torch.get_num_threads()
        return real(encoded, rows, layers)

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        tiny_model._encode_batch = spy
        tiny_model.encode(SENTENCES * 4, batch_size=4, workers=2)
        assert torch.get_num_threads() == 2
        result = {}
        worker = threading.Thread(target=lambda: result.update(n=torch.get_num_threads()))
        worker.start()
        worker.join()
        assert result["n"] == 2  # a thread started afterwards gets torch's default, put back
    finally:
        del tiny_model._encode_batch
        torch.set_num_threads(threads)
    assert len(seen) == 2 and set(seen.values()) == {1}


def test_concurrent_worker_pools_leave_every_thread_count_as_it_was(tiny_model):
    """Three fresh threads encode with workers=2 at once beside a fourth running torch: every worker gets 1
    of the 2 threads, every other thread keeps 2, and a thread started afterwards gets 2 (a pool's setting
    does not leak; only a thread whose very first torch op falls in the moment a pool starts its workers
    would copy their count)."""
    import threading

    seen, counts, errors = [], {}, []
    real = tiny_model._encode_batch

    def spy(encoded, rows, layers):
        seen.append(torch.get_num_threads())
        return real(encoded, rows, layers)

    def caller(name):
        try:
            out = tiny_model.encode(SENTENCES * 3, batch_size=2, workers=2)
            counts[name] = (torch.get_num_threads(), out.shape)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    def bystander(started):
        torch.get_num_threads()  # set up before the callers start
        started.set()
        for _ in range(50):
            counts.setdefault("bystander", []).append(torch.get_num_threads())
            torch.ones(64, 64) @ torch.ones(64, 64)

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        tiny_model._encode_batch = spy
        for _ in range(3):
            counts.clear()
            started = threading.Event()
            runners = [threading.Thread(target=bystander, args=(started,))]
            runners += [threading.Thread(target=caller, args=(f"c{i}",)) for i in range(3)]
            runners[0].start()
            started.wait()
            for t in runners[1:]:
                t.start()
            for t in runners:
                t.join()
            assert errors == []
            assert [counts[f"c{i}"][0] for i in range(3)] == [2, 2, 2]
            assert set(counts["bystander"]) == {2}
            fresh: dict[str, int] = {}
            t = threading.Thread(target=lambda out=fresh: out.update(n=torch.get_num_threads()))
            t.start()
            t.join()
            assert fresh["n"] == 2 and torch.get_num_threads() == 2
    finally:
        del tiny_model._encode_batch
        torch.set_num_threads(threads)
    assert set(seen) == {1}


@pytest.mark.parametrize(
    "value,message",
    [
        (10_000, r"max_seq_length=10000 is out of range: .* has 64 position embeddings, so 1..64"),
        (0, "max_seq_length=0 is out of range"),
        ("128", "max_seq_length must be an integer, got '128'"),
        (None, "max_seq_length must be an integer, got None"),
    ],
)
def test_setting_a_bad_max_seq_length_is_refused(tiny_model, value, message):
    before = tiny_model.max_seq_length
    with pytest.raises(InvalidInputError, match=message):
        tiny_model.max_seq_length = value
    assert tiny_model.max_seq_length == before  # unchanged: encoding still works
    tiny_model.max_seq_length = 64  # the position embeddings' limit itself is allowed
    assert tiny_model.encode([" ".join(["word"] * 200)]).shape == (1, tiny_model.dim)


def test_a_tokenizer_with_ids_past_the_token_embeddings_is_refused_at_load(tiny_model_dir, tmp_path):
    folder = tmp_path / "added-token"
    model = EmbeddingModel.load(tiny_model_dir)
    model.tokenizer.add_tokens(["<newtok>"])  # added to the tokenizer, the embeddings not resized
    model.save(folder)
    with pytest.raises(ModelLoadError, match=r"token ids up to \d+ \('<newtok>'\) but the model has only"):
        EmbeddingModel.load(folder)
    model.transformer.resize_token_embeddings(len(model.tokenizer))
    fixed = EmbeddingModel(model.transformer, model.tokenizer)  # what the message asks for
    assert fixed.encode(["a <newtok> cat"]).shape == (1, fixed.dim)
