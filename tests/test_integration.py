"""Integration: the packaged all-MiniLM-L6-v2 against published numbers and sentence-transformers."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import data_path, packaged_minilm

from matryoshka2d import EmbeddingModel
from matryoshka2d.evaluation.sts import evaluate_sts

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def minilm():
    return EmbeddingModel.load(packaged_minilm())


def test_minilm_stsb_test_matches_published_mteb_score(minilm):
    path = data_path("stsb", "test.tsv")
    assert path.is_file(), f"STS Benchmark not found at {path}; set M2D_DATA_DIR"
    result = evaluate_sts(minilm, path, layers=[6], dims=[384])
    assert result.spearman[0][0] == pytest.approx(82.03, abs=0.15)


def test_minilm_equals_sentence_transformers_full_and_after_surgery(minilm):
    from sentence_transformers import SentenceTransformer

    texts = [line.split("\t")[0] for line in data_path("stsb", "test.tsv").read_text().splitlines()[1:200]]
    st = SentenceTransformer(str(packaged_minilm()), device="cpu")
    assert np.abs(minilm.encode(texts) - st.encode(texts)).max() <= 1e-5
    st[0].auto_model.encoder.layer = st[0].auto_model.encoder.layer[:3]
    assert np.abs(minilm.encode(texts, layers=3) - st.encode(texts)).max() <= 1e-5
