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
    full = [
        len(reranker.tokenizer.encode_texts([q])[0]) + len(reranker.tokenizer.encode_texts([p])[0]) + 4
        for q, p in pairs
    ]
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


# --- bounded work: issue 10's one request that killed the server ------------------------------

HUGE_QUERY = "word " * 200_000  # 1 MB, 200,000 tokens
ONE_WORD_CONTEXTS = ["w"] * 1000


def test_a_huge_query_is_read_once_and_only_as_far_as_the_model_can_see(tiny_model, monkeypatch):
    from nprerank.tokenizer import PairTokenizer, prefix_chars

    reranker = Reranker.from_pretrained(tiny_model)
    handed = []
    encode_texts = PairTokenizer.encode_texts
    monkeypatch.setattr(
        PairTokenizer, "encode_texts", lambda self, texts: handed.extend(texts) or encode_texts(self, texts)
    )
    encoding = reranker.encode([(HUGE_QUERY, text) for text in ONE_WORD_CONTEXTS])
    budget = reranker.tokenizer.max_length - 4
    # the query once, cut to the prefix that holds budget + 1 tokens; the context once
    assert sum(text.startswith("word") for text in handed) == 1 and handed.count("w") == 1
    assert sum(map(len, handed)) <= prefix_chars(budget + 1) + 1
    assert all(length > reranker.tokenizer.max_length for length in encoding.lengths)
    query_limit = reranker.tokenizer.max_length * 3 // 4  # only_second: the query is cut to its share
    (w,) = encode_texts(reranker.tokenizer, ["w"])
    assert len(encoding.sequences) == 1000 and all(len(s) == query_limit + len(w) + 4 for s in encoding.sequences)


@pytest.mark.parametrize("long_documents", ["truncate", "chunk"])
def test_chunk_mode_reads_at_most_max_windows(tiny_model, monkeypatch, long_documents):
    from nprerank.tokenizer import PairTokenizer, prefix_chars

    reranker = Reranker.from_pretrained(tiny_model, max_length=32, long_documents=long_documents, max_windows=3)
    handed = []
    encode_texts = PairTokenizer.encode_texts
    monkeypatch.setattr(
        PairTokenizer, "encode_texts", lambda self, texts: handed.extend(texts) or encode_texts(self, texts)
    )
    encoding = reranker.encode([("panda", HUGE_QUERY), (HUGE_QUERY, HUGE_QUERY)])
    windows = np.bincount(encoding.owners).tolist()
    assert windows == ([3, 3] if long_documents == "chunk" else [1, 1])
    most = 28 * 3 if long_documents == "chunk" else 28 + 1  # tokens a passage can need
    assert sum(map(len, handed)) <= len("panda") + prefix_chars(most)


def test_a_huge_request_stays_in_bounded_memory(tiny_model):
    """Issue 10's body (a 200,000-word query, 1,000 one-word contexts), peak memory of the call
    measured in a fresh process: tens of MB, where tokenizing the query for each context took GBs."""
    import subprocess
    import sys

    code = """
import sys
from nprerank import Reranker
reranker = Reranker.from_pretrained(sys.argv[1], engine="reference")
query, contexts = "word " * 200_000, ["w"] * 1000
reranker.rerank("q", ["w"])
open("/proc/self/clear_refs", "w").write("5")  # restart the peak (VmHWM) from here
reranker.rerank(query, contexts)
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM"))
rss = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmRSS"))
print(peak - rss)
"""
    done = subprocess.run([sys.executable, "-c", code, str(tiny_model)], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    grown_mb = int(done.stdout.split()[-1]) / 1024
    assert grown_mb < 100, f"the call's peak was {grown_mb:.0f} MB above the resident memory around it"


# --- text that is not Unicode: a lone surrogate ("\ud800" is valid JSON and a valid Python str) ---

LONE = "caf\ud800e"


@pytest.mark.parametrize(
    "call, name",
    [
        (lambda r: r.rerank(LONE, ["a"]), "query"),
        (lambda r: r.rerank("q", ["a", LONE]), r"contexts\[1\].text"),
        (lambda r: r.rerank("q", [{"text": "a"}, {"text": LONE}]), r"contexts\[1\].text"),
        (lambda r: r.compute_score([("q", "a"), (LONE, "p")]), r"pairs\[1\]\[0\]"),
        (lambda r: r.compute_score(("q", LONE)), r"pairs\[0\]\[1\]"),
        (lambda r: r.predict([("q", "a"), ("q", "b"), ("q", LONE)]), r"pairs\[2\]\[1\]"),
        (lambda r: r.predict((LONE, "a")), r"pairs\[0\]\[0\]"),
        (lambda r: r.rank(LONE, ["a"]), "query"),
        (lambda r: r.rank("q", ["a", "b", LONE]), r"documents\[2\]"),
        (lambda r: r.encode([("q", "a"), ("q", LONE)]), r"pairs\[1\]\[1\]"),
        (lambda r: r.logits([(LONE, "a")]), r"pairs\[0\]\[0\]"),
        (lambda r: r.tokenizer.encode_pairs([("q", "\udfff")]), r"pairs\[0\]\[1\]"),
        (lambda r: Reranker.from_pretrained("/tmp/\ud800"), "path"),
    ],
)
def test_text_that_is_not_unicode_is_refused_naming_the_field(reranker, call, name):
    with pytest.raises(ValueError, match=name + r" is not valid Unicode: a lone surrogate '\\ud[8f]"):
        call(reranker)


# --- per-call truncation, passage_max_length, lengths -------------------------------------------


@pytest.mark.parametrize("loaded, asked", [("only_second", "longest_first"), ("longest_first", "only_second")])
def test_truncation_per_call(tiny_model, loaded, asked):
    """TEI cuts longest_first whatever the server was started with: one call, one policy."""
    reranker = Reranker.from_pretrained(tiny_model, truncation=loaded)
    other = Reranker.from_pretrained(tiny_model, truncation=asked)
    pairs = [("panda " * 150, "hi"), ("what is panda?", "bamboo " * 300), ("panda " * 100, "bamboo " * 100)]
    encoding = reranker.encode(pairs, truncation=asked)
    assert encoding.sequences == other.encode(pairs).sequences != reranker.encode(pairs).sequences
    np.testing.assert_array_equal(reranker.logits(pairs, truncation=asked), other.logits(pairs))
    with pytest.raises(ValueError, match="truncation must be one of"):
        reranker.encode(pairs, truncation="longest")


def test_tei_long_query_keeps_what_tei_keeps(tiny_model):
    """Issue 9: query "panda " * 150 and text "hi", max_length 128, longest_first: the query keeps
    128 - 4 - len(hi) tokens, as transformers (TEI's tokenizer) does, not the 3/4 share of only_second."""
    from transformers import AutoTokenizer

    reranker = Reranker.from_pretrained(tiny_model)  # only_second by default
    query, text = "panda " * 150, "hi"
    (ids,) = reranker.encode([(query, text)], truncation="longest_first").sequences
    expected = AutoTokenizer.from_pretrained(str(tiny_model))(query, text, truncation=True, max_length=128)["input_ids"]
    assert ids == expected and len(ids) == 128


def test_passage_max_length_cuts_every_passage_first(reranker):
    """Cohere v2's max_tokens_per_doc: each document cut to that many tokens, then the pair as usual."""
    tokenizer = reranker.tokenizer
    pairs = [("q", "bamboo " * 300), ("q", "hi"), ("q", "the giant panda eats bamboo every day")]
    query_ids = tokenizer.encode_texts(["q"])[0]
    encoding = reranker.encode(pairs, passage_max_length=5)
    for (_, passage), ids, length in zip(pairs, encoding.sequences, encoding.lengths):
        passage_ids = tokenizer.encode_texts([passage])[0][:5]
        assert ids == [0, *query_ids, 2, 2, *passage_ids, 2] and length == len(ids)
    with pytest.raises(ValueError, match="passage_max_length must be an integer >= 1"):
        reranker.encode(pairs, passage_max_length=0)


@pytest.mark.parametrize("max_length", [128, 40, 16])
def test_lengths_are_exact_up_to_max_length(reranker, max_length):
    from cases import PAIRS

    pairs = PAIRS + [("q", "word " * n) for n in range(0, 140, 7)]
    encoding = reranker.encode(pairs, max_length=max_length)
    for (query, passage), length in zip(pairs, encoding.lengths):
        full = sum(map(len, reranker.tokenizer.encode_texts([query, passage]))) + 4
        assert length == full if full <= max_length else length > max_length, (query[:20], passage[:20])


def test_each_distinct_text_is_checked_once(reranker, monkeypatch):
    from nprerank import tokenizer

    checked = []
    check_text = tokenizer.check_text
    monkeypatch.setattr(
        tokenizer, "check_text", lambda name, text, **kw: checked.append(name) or check_text(name, text, **kw)
    )
    reranker.encode([("熊猫 " * 1000, f"passage {i % 10}") for i in range(1000)])
    assert len(checked) == 1 + 10
