"""The Python API's sentence-transformers face (`predict`, `rank`) and long documents (chunk mode).

`predict` must be `sigmoid(compute_score)` as float32 (a scalar for one pair), `rank` must be
CrossEncoder.rank's shape best first, and in chunk mode a long document must score exactly as
its best window, the windows being made by `reranker.tokenizer.encode_chunked` and scored by
`reranker.run` here, independently of `Reranker.logits`.
"""

import logging

import numpy as np
import pytest

from nprerank import Reranker
from nprerank.reranker import sigmoid
from nprerank.synthetic import corpus
from nprerank.tokenizer import SPECIAL_TOKENS_IN_PAIR

QUERY = "what is panda?"
DOCUMENTS = [
    "hi",
    "The giant panda (Ailuropoda melanoleuca) is a bear species endemic to China.",
    "a cyberpunk lizard",
    "pandas eat bamboo in the mountains",
    "熊猫 是 一种 生活 在 中国 的 熊",
]
FILLER = "the river bank city night rain music apple orange car search engine model " * 4
TOLERANCE = 1e-4  # logits of the same sequence batched with different neighbours, padded to other lengths


@pytest.fixture(scope="module")
def reranker(tiny_model):
    return Reranker.from_pretrained(tiny_model)


def test_predict_is_float32_sigmoid_of_compute_score(reranker):
    pairs = [(QUERY, d) for d in DOCUMENTS]
    scores = reranker.predict(pairs)
    logits = np.array(reranker.compute_score(pairs))
    assert isinstance(scores, np.ndarray) and scores.dtype == np.float32 and scores.shape == (len(pairs),)
    np.testing.assert_allclose(scores, sigmoid(logits).astype(np.float32), rtol=1e-6)
    np.testing.assert_allclose(scores, reranker.compute_score(pairs, normalize=True), rtol=1e-6)
    assert len(set(scores.tolist())) == len(pairs)  # the calibrated test model spreads its scores
    np.testing.assert_allclose(reranker.predict(pairs, activation_fn=lambda x: x), logits, rtol=1e-6)
    np.testing.assert_allclose(reranker.predict(pairs, batch_size=2), scores, atol=TOLERANCE)


def test_predict_one_pair_is_a_scalar(reranker):
    score = reranker.predict((QUERY, DOCUMENTS[1]))
    assert isinstance(score, np.float32) and np.ndim(score) == 0
    in_a_list = reranker.predict([(QUERY, DOCUMENTS[1]), (QUERY, DOCUMENTS[0])])[0]
    assert abs(score - in_a_list) < TOLERANCE
    (logit,) = reranker.compute_score([QUERY, DOCUMENTS[1]])  # FlagEmbedding: a list even for one pair
    assert score == pytest.approx(float(sigmoid(logit)), rel=1e-6)
    with pytest.raises(ValueError, match="activation_fn must be a callable"):
        reranker.predict([(QUERY, "a")], activation_fn="softmax")


def test_rank_is_best_first_with_corpus_ids(reranker):
    scores = reranker.predict([(QUERY, d) for d in DOCUMENTS])
    ranked = reranker.rank(QUERY, DOCUMENTS, return_documents=True)
    assert [hit["corpus_id"] for hit in ranked] == list(np.argsort(-scores, kind="stable"))
    for hit in ranked:
        assert set(hit) == {"corpus_id", "score", "text"}
        assert hit["text"] == DOCUMENTS[hit["corpus_id"]]
        assert hit["score"] == pytest.approx(float(scores[hit["corpus_id"]]), abs=TOLERANCE)
    assert [h["score"] for h in ranked] == sorted((h["score"] for h in ranked), reverse=True)
    top = reranker.rank(QUERY, DOCUMENTS, top_k=2)
    assert [set(hit) for hit in top] == [{"corpus_id", "score"}] * 2
    assert [hit["corpus_id"] for hit in top] == [hit["corpus_id"] for hit in ranked[:2]]
    assert reranker.rank(QUERY, []) == []
    with pytest.raises(ValueError, match="top_k"):
        reranker.rank(QUERY, DOCUMENTS, top_k=0)
    with pytest.raises(ValueError, match="documents"):
        reranker.rank(QUERY, [DOCUMENTS[0], 3])


def test_predict_takes_sentence_transformers_keywords(reranker, capsys):
    """CrossEncoder.predict(sentences, batch_size, show_progress_bar, activation_fn, apply_softmax,
    convert_to_numpy, convert_to_tensor), and the older activation_fct."""
    import torch

    pairs = [(QUERY, d) for d in DOCUMENTS]
    logits = np.array(reranker.compute_score(pairs), dtype=np.float32)
    scores = reranker.predict(pairs)
    same = dict(atol=1e-6, rtol=1e-6)
    np.testing.assert_allclose(reranker.predict(pairs, activation_fn=torch.nn.Identity()), logits, **same)
    np.testing.assert_allclose(reranker.predict(pairs, activation_fn=torch.nn.Sigmoid()), scores, **same)
    np.testing.assert_allclose(reranker.predict(pairs, activation_fn=np.tanh), np.tanh(logits), **same)
    np.testing.assert_allclose(reranker.predict(pairs, activation_fct=lambda x: 2 * x), 2 * logits, **same)
    np.testing.assert_array_equal(reranker.predict(pairs, apply_softmax=True), scores)  # one logit: no softmax
    listed = reranker.predict(pairs, convert_to_numpy=False)
    assert isinstance(listed, list) and all(isinstance(x, np.float32) for x in listed) and listed == scores.tolist()
    tensor = reranker.predict(pairs, 2, False, None, False, True, True)  # positionally, in CrossEncoder's order
    assert isinstance(tensor, torch.Tensor) and tensor.dtype == torch.float32 and tensor.tolist() == scores.tolist()

    capsys.readouterr()
    reranker.predict(pairs, batch_size=2, show_progress_bar=True)
    bar = capsys.readouterr().err
    assert "Batches" in bar and f"{len(pairs)}/{len(pairs)}" in bar
    reranker.predict(pairs, show_progress_bar=False)
    assert capsys.readouterr().err == ""
    logger = logging.getLogger("nprerank.reranker")  # None: shown when the logger is at INFO, as in s-t
    reranker.predict(pairs)
    assert capsys.readouterr().err == ""
    try:
        logger.setLevel(logging.INFO)
        reranker.predict(pairs)
        assert "Batches" in capsys.readouterr().err
    finally:
        logger.setLevel(logging.NOTSET)

    with pytest.raises(TypeError, match="unexpected keyword argument 'activation'"):
        reranker.predict(pairs, activation=None)
    with pytest.raises(ValueError, match="one score per pair"):
        reranker.predict(pairs, activation_fn=lambda x: x[:1])


def test_rank_takes_sentence_transformers_keywords(reranker, capsys):
    import torch

    logits = np.array(reranker.compute_score([(QUERY, d) for d in DOCUMENTS]), dtype=np.float32)
    ranked = reranker.rank(
        QUERY,
        DOCUMENTS,
        top_k=3,
        return_documents=True,
        batch_size=2,
        show_progress_bar=True,
        activation_fn=torch.nn.Identity(),
        apply_softmax=False,
        convert_to_numpy=True,
        convert_to_tensor=False,
    )
    assert "Batches" in capsys.readouterr().err
    assert [hit["corpus_id"] for hit in ranked] == np.argsort(-logits, kind="stable")[:3].tolist()
    for hit in ranked:
        assert hit["score"] == pytest.approx(float(logits[hit["corpus_id"]]), abs=TOLERANCE)
        assert hit["text"] == DOCUMENTS[hit["corpus_id"]]
    with pytest.raises(TypeError, match="unexpected keyword argument 'top_n'"):
        reranker.rank(QUERY, DOCUMENTS, top_n=2)


def test_compute_score_max_length_wins_up_to_the_model(tiny_model):
    """FlagEmbedding: compute_score(..., max_length=64) on a reranker loaded with max_length=32 cuts at 64."""
    short = Reranker.from_pretrained(tiny_model, max_length=32)
    pairs = [(QUERY, FILLER * 3), (QUERY, "hi"), (FILLER * 3, FILLER * 3)]
    at_64 = Reranker.from_pretrained(tiny_model, max_length=64).compute_score(pairs)
    at_128 = Reranker.from_pretrained(tiny_model, max_length=128).compute_score(pairs)
    np.testing.assert_allclose(short.compute_score(pairs, max_length=64), at_64, atol=TOLERANCE)
    assert short.compute_score(pairs)[0] != pytest.approx(at_64[0], abs=1e-3)  # it did cut differently
    # beyond the model's 128 positions: the model's limit
    np.testing.assert_allclose(short.compute_score(pairs, max_length=10_000), at_128, atol=TOLERANCE)
    encoding = short.encode(pairs, max_length=10_000)
    assert encoding.max_length == 128 and max(map(len, encoding.sequences)) == 128
    # query_max_length per call, as FlagEmbedding's
    cut_query = Reranker.from_pretrained(tiny_model, max_length=64, query_max_length=8).compute_score(pairs)
    np.testing.assert_allclose(short.compute_score(pairs, max_length=64, query_max_length=8), cut_query, atol=TOLERANCE)
    with pytest.raises(ValueError, match="runs on the CPU"):
        short.compute_score(pairs, device="cuda:0")
    with pytest.raises(TypeError, match="unexpected keyword argument 'normalise'"):
        short.compute_score(pairs, normalise=True)


def _windows(reranker, query: str, document: str) -> list:
    return reranker.tokenizer.encode_chunked([(query, document)], None, reranker.chunk_overlap)[0]


def _long_document(tiny_model, max_length: int) -> str:
    """A document longer than max_length whose best part is at its end.

    A random model has no idea of relevance, so "the relevant part" is chosen by the model itself:
    of sample sentences, the ones it scores lowest are the filler, the ones it scores highest the
    ending, and the pair is kept whose last window beats its first by the widest margin.
    """
    chunked = Reranker.from_pretrained(tiny_model, max_length=max_length, long_documents="chunk", chunk_overlap=4)
    sentences = corpus(40, seed=3)
    order = np.argsort(chunked.compute_score([(QUERY, s) for s in sentences]))
    best, best_margin = None, -np.inf
    for low in order[:3]:
        for high in order[-3:]:
            document = (sentences[low] + " ") * 6 + sentences[high]
            logits = chunked.run(_windows(chunked, QUERY, document))
            if logits[-1] - logits[0] > best_margin:
                best, best_margin = document, logits[-1] - logits[0]
    assert best_margin > 0.5, f"no ending outscores the filler (margin {best_margin})"
    return best


@pytest.mark.parametrize("max_length", [24, 40])
def test_chunk_mode_scores_a_long_document_as_its_best_window(tiny_model, max_length):
    chunked = Reranker.from_pretrained(tiny_model, max_length=max_length, long_documents="chunk", chunk_overlap=4)
    truncated = Reranker.from_pretrained(tiny_model, max_length=max_length)
    document = _long_document(tiny_model, max_length)
    windows = _windows(chunked, QUERY, document)

    # the windows: each fits, each starts with the whole query, neighbours share 4 tokens, the last reaches the end
    query_ids = chunked.tokenizer.encode_texts([QUERY])[0]
    passage_ids = chunked.tokenizer.encode_texts([document])[0]
    head = [chunked.tokenizer.bos, *query_ids, chunked.tokenizer.eos, chunked.tokenizer.eos]
    assert len(passage_ids) > max_length and len(windows) >= 2
    pieces = []
    for window in windows:
        assert len(window) <= max_length and window[: len(head)] == head and window[-1] == chunked.tokenizer.eos
        pieces.append(window[len(head) : -1])
    for left, right in zip(pieces, pieces[1:]):
        assert left[-4:] == right[:4]
    assert pieces[0] == passage_ids[: len(pieces[0])] and pieces[-1] == passage_ids[-len(pieces[-1]) :]

    window_logits = chunked.run(windows)
    others = [(QUERY, "hi"), (QUERY, "a cyberpunk lizard")]  # short: one window each
    chunk_logits = np.array(chunked.compute_score(others + [(QUERY, document)]))
    assert abs(chunk_logits[-1] - window_logits.max()) < TOLERANCE, (chunk_logits[-1], window_logits)
    assert window_logits.argmax() > 0  # the best window is not the start: truncation would miss it

    # truncate mode sees only the first window
    truncate_logit = truncated.compute_score([(QUERY, document)])[0]
    assert abs(truncate_logit - window_logits[0]) < TOLERANCE
    assert chunk_logits[-1] > truncate_logit + 0.05
    # short documents are one window: both modes agree on them
    np.testing.assert_allclose(chunk_logits[:2], truncated.compute_score(others), atol=TOLERANCE)
    # and the other entry points agree with compute_score
    hits = {
        hit["id"]: hit["score"]
        for hit in chunked.rerank(QUERY, [{"text": d} for _, d in others] + [{"text": document}])
    }
    assert hits[2] == pytest.approx(float(sigmoid(window_logits.max())), abs=TOLERANCE)
    assert chunked.predict((QUERY, document)) == pytest.approx(float(sigmoid(window_logits.max())), abs=TOLERANCE)


def test_chunk_options_are_checked(tiny_model):
    with pytest.raises(ValueError, match="long_documents"):
        Reranker.from_pretrained(tiny_model, long_documents="split")
    with pytest.raises(ValueError, match="chunk_overlap"):
        Reranker.from_pretrained(tiny_model, long_documents="chunk", chunk_overlap=-1)


def test_default_overlap_windows_fit(tiny_model):
    chunked = Reranker.from_pretrained(tiny_model, max_length=32, long_documents="chunk")
    windows = _windows(chunked, QUERY, FILLER * 3)
    assert len(windows) > 2 and all(len(w) <= 32 for w in windows)
    assert all(len(w) - SPECIAL_TOKENS_IN_PAIR > 0 for w in windows)


def test_docs_api_examples_run(tiny_model, capsys):
    """Every ```python block of docs/api.md, in order, on the tiny model instead of the real one."""
    import re
    from pathlib import Path

    text = (Path(__file__).parent.parent / "docs" / "api.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 7
    namespace = {}
    for block in blocks:
        block = block.replace('"BAAI/bge-reranker-base"', repr(str(tiny_model)))
        block = block.replace("max_length=512", "max_length=128")  # the tiny model has 128 positions
        exec(block, namespace)
    printed = capsys.readouterr().out
    assert "no such model folder" in printed and "query must be a non-empty string" in printed
