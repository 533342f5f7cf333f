"""Shared fixtures: random-weight models made by nprerank.synthetic, cached outside the repo.

The real checkpoint cannot be downloaded in CI; these models have bge-reranker-base's exact
format (transformers' save_pretrained + an XLM-R-style sentencepiece tokenizer.json), so the
same loading code runs on them. Set NPRERANK_MODEL_DIR to a real bge-reranker-base folder to
also run the known-answer tests.
"""

import os
from pathlib import Path

import pytest

from nprerank.synthetic import BGE_RERANKER_BASE, make_model

# Tiny configs that stress different corners of the maths (see test_parity.py).
TINY_CONFIGS = {
    "tiny": dict(),
    "odd-heads": dict(hidden_size=30, num_attention_heads=5, intermediate_size=50),  # head size 6
    "one-layer": dict(num_hidden_layers=1, hidden_size=48, num_attention_heads=3, intermediate_size=96),
    "short-positions": dict(max_position_embeddings=40),  # forces truncation at 38 tokens
}


@pytest.fixture(scope="session")
def tiny_model() -> Path:
    return make_model()


@pytest.fixture(scope="session", params=list(TINY_CONFIGS))
def tiny_models(request) -> Path:
    return make_model(**TINY_CONFIGS[request.param])


@pytest.fixture(scope="session")
def full_model() -> Path:
    """A random model of bge-reranker-base's full size (1.1 GB, cached after the first run)."""
    return make_model(seed=1, **BGE_RERANKER_BASE)


@pytest.fixture(scope="session")
def real_model() -> Path:
    folder = os.environ.get("NPRERANK_MODEL_DIR")
    if not folder:
        pytest.skip("NPRERANK_MODEL_DIR is not set: known-answer tests need the real bge-reranker-base checkpoint")
    return Path(folder)
