"""Known answers of the real BAAI/bge-reranker-base, published by its users (REFERENCE.md).

Runs only when NPRERANK_MODEL_DIR points at a real bge-reranker-base folder (config.json,
tokenizer.json, model.safetensors); the real checkpoint cannot be downloaded in CI.
"""

import pytest

from nprerank import Reranker

# FlagEmbedding issue #108: the old FlagReranker (longest_first truncation), fp32, raw logits.
# Computed on another machine with torch, so allow a little more than our 1e-4 parity bar.
FLAG_RERANKER_LOGITS = [
    (("query", "passage"), 0.4474879801273346),
    (("what is panda?", "hi"), -8.15439224243164),
    (
        (
            "what is panda?",
            "The giant panda (Ailuropoda melanoleuca), sometimes called a panda bear or simply panda, "
            "is a bear species endemic to China.",
        ),
        6.182111740112305,
    ),
]
TOLERANCE = 5e-4


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_flagreranker_logits(real_model, engine):
    reranker = Reranker.from_pretrained(real_model, truncation="longest_first", engine=engine)
    logits = reranker.compute_score([pair for pair, _ in FLAG_RERANKER_LOGITS])
    for (pair, expected), got in zip(FLAG_RERANKER_LOGITS, logits):
        assert got == pytest.approx(expected, abs=TOLERANCE), f"{pair}: ours {got}, published {expected}"


def test_tei_snapshot(real_model):
    """TEI's 2023 snapshot: query "test" against ["test", "other", "test"], sigmoid scores."""
    reranker = Reranker.from_pretrained(real_model, truncation="longest_first")
    result = reranker.rerank("test", ["test", "other", "test"])
    scores = {hit["id"]: hit["score"] for hit in result}
    assert [scores[0], scores[1], scores[2]] == pytest.approx([0.9997739, 0.3638598, 0.9997739], abs=1e-5)
    assert [hit["id"] for hit in result] == [0, 2, 1]
