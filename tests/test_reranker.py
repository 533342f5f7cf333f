"""The Reranker's contracts: Cloudflare's rerank, FlagEmbedding's compute_score, and its errors."""

import math

import numpy as np
import pytest

from nprerank import Reranker


@pytest.fixture(scope="module")
def reranker(tiny_model):
    return Reranker.from_pretrained(tiny_model)


CONTEXTS = [{"text": "a cyberpunk lizzard"}, {"text": "a cyberpunk cat"}, {"text": "熊猫"}, {"text": "bamboo " * 80}]


def test_rerank_is_sigmoid_of_logits_best_first(reranker):
    query = "Which one is cooler?"
    result = reranker.rerank(query, CONTEXTS)
    logits = reranker.compute_score([(query, c["text"]) for c in CONTEXTS])
    assert sorted(r["id"] for r in result) == list(range(len(CONTEXTS)))
    for hit in result:
        assert set(hit) == {"id", "score"} and isinstance(hit["id"], int) and isinstance(hit["score"], float)
        assert hit["score"] == pytest.approx(1 / (1 + math.exp(-logits[hit["id"]])), abs=1e-12)
        assert 0.0 <= hit["score"] <= 1.0
    scores = [hit["score"] for hit in result]
    assert scores == sorted(scores, reverse=True)
    assert len(set(scores)) > 1, "a random model should still tell contexts apart"


def test_rerank_top_k_and_plain_strings(reranker):
    full = reranker.rerank("Which one is cooler?", CONTEXTS)
    assert reranker.rerank("Which one is cooler?", CONTEXTS, top_k=2) == full[:2]
    assert reranker.rerank("Which one is cooler?", CONTEXTS, top_k=99) == full
    assert reranker.rerank("Which one is cooler?", [c["text"] for c in CONTEXTS]) == full
    assert reranker.rerank("Which one is cooler?", []) == []


def test_compute_score_follows_flagreranker(reranker):
    pairs = [("what is panda?", "hi"), ("what is panda?", "The giant panda is a bear."), ("q", "")]
    logits = reranker.compute_score(pairs)
    assert isinstance(logits, list) and len(logits) == 3 and all(isinstance(x, float) for x in logits)
    single = reranker.compute_score(pairs[1])
    assert isinstance(single, list) and single[0] == pytest.approx(logits[1], abs=1e-4)
    normalized = reranker.compute_score(pairs, normalize=True)
    assert normalized == pytest.approx([1 / (1 + math.exp(-x)) for x in logits], abs=1e-12)
    assert reranker.compute_score([]) == []
    short = reranker.compute_score(pairs, max_length=8)  # a per-call max_length truncates harder
    assert short[1] != pytest.approx(logits[1], abs=1e-6)


def test_sigmoid_does_not_saturate_large_logits():
    from nprerank.reranker import sigmoid

    scores = sigmoid(np.array([20.0, 21.0, -800.0], dtype=np.float32))
    assert scores[0] < scores[1] < 1.0 and scores[2] == 0.0


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda r: r.rerank("", CONTEXTS), "query must be a non-empty string"),
        (lambda r: r.rerank(None, CONTEXTS), "query must be a non-empty string"),
        (lambda r: r.rerank("q", "just a string"), "contexts must be a list"),
        (lambda r: r.rerank("q", None), "contexts must be a list"),
        (lambda r: r.rerank("q", [{"text": ""}]), r"contexts\[0\].text must be a non-empty string"),
        (lambda r: r.rerank("q", [{"text": "ok"}, {"txt": "x"}]), r"contexts\[1\].text must be a non-empty string"),
        (lambda r: r.rerank("q", [{"text": 3}]), r"contexts\[0\].text must be a non-empty string"),
        (lambda r: r.rerank("q", [3]), r"contexts\[0\] must be an object with a text field"),
        (lambda r: r.rerank("q", CONTEXTS, top_k=0), "top_k must be an integer >= 1"),
        (lambda r: r.rerank("q", CONTEXTS, top_k=-1), "top_k must be an integer >= 1"),
        (lambda r: r.rerank("q", CONTEXTS, top_k=1.5), "top_k must be an integer >= 1"),
        (lambda r: r.rerank("q", CONTEXTS, top_k="2"), "top_k must be an integer >= 1"),
        (lambda r: r.rerank("q", CONTEXTS, top_k=True), "top_k must be an integer >= 1"),
        (lambda r: r.compute_score("not pairs"), "pairs must be"),
        (lambda r: r.compute_score([("q", "p"), ("q",)]), r"pairs\[1\] must be a \(query, passage\) pair"),
        (lambda r: r.compute_score([("q", None)]), r"pairs\[0\]\[1\] must be a string"),
        (lambda r: r.compute_score([("q", "p")], batch_size=0), "batch_size must be an integer >= 1"),
        (lambda r: r.compute_score([("q", "p")], max_length=2), "max_length must be an integer >= 6"),
    ],
)
def test_bad_input_names_the_problem(reranker, call, message):
    with pytest.raises(ValueError, match=message):
        call(reranker)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(engine="gpu"), "engine must be one of"),
        (dict(long_documents="split"), "long_documents must be one of"),
        (dict(batch_size=0), "batch_size must be an integer >= 1"),
        (dict(max_length=10_000), "exceeds the model's 128 usable positions"),
        (dict(truncation="both"), "truncation must be one of"),
    ],
)
def test_bad_options_name_the_problem(tiny_model, options, message):
    with pytest.raises(ValueError, match=message):
        Reranker.from_pretrained(tiny_model, **options)


# --- the Encoding API: encode -> (run | score) -> pair_logits -----------------------------------


def test_encode_then_score_is_logits(reranker):
    pairs = [("what is panda?", "hi"), ("what is panda?", "bamboo " * 300), ("q", "")]
    encoding = reranker.encode(pairs)
    assert encoding.owners.dtype == np.int64 and encoding.owners.tolist() == [0, 1, 2]
    assert encoding.max_length == reranker.tokenizer.max_length
    assert encoding.sequences == reranker.tokenizer.encode_pairs(pairs)
    full = [len(reranker.tokenizer.encode_texts([q])[0]) + len(reranker.tokenizer.encode_texts([p])[0]) + 4
            for q, p in pairs]
    assert encoding.lengths[0] == full[0] and encoding.lengths[2] == full[2]  # exact while they fit
    assert full[1] > encoding.max_length and encoding.lengths[1] > encoding.max_length
    logits = reranker.score(encoding)
    assert logits.dtype == np.float32 and logits.shape == (3,)
    np.testing.assert_array_equal(logits, reranker.logits(pairs))
    np.testing.assert_array_equal(encoding.pair_logits(reranker.run(encoding.sequences)), logits)
    with pytest.raises(ValueError, match="expected 3 sequence logits"):
        encoding.pair_logits(np.zeros(2))


def test_encoding_in_chunk_mode_scores_a_pair_as_its_best_window(tiny_model):
    chunked = Reranker.from_pretrained(tiny_model, max_length=32, long_documents="chunk", chunk_overlap=4)
    pairs = [("panda", "hi"), ("panda", "the giant panda eats bamboo " * 20), ("panda", "a bear")]
    encoding = chunked.encode(pairs)
    counts = np.bincount(encoding.owners).tolist()
    assert counts[0] == 1 and counts[1] > 2 and counts[2] == 1
    window_logits = chunked.run(encoding.sequences)
    expected = [window_logits[encoding.owners == i].max() for i in range(3)]
    np.testing.assert_array_equal(encoding.pair_logits(window_logits), np.array(expected, dtype=np.float32))
