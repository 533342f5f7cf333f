"""Token ids must equal transformers' on the same text and truncation policy."""

import pytest
from transformers import AutoTokenizer

from cases import PAIRS
from nprerank.tokenizer import PairTokenizer


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_model):
    return AutoTokenizer.from_pretrained(str(tiny_model))


def _first_mismatch(ours, theirs):
    for i, (q, p) in enumerate(PAIRS):
        if ours[i] != theirs[i]:
            return f"pair {i} ({q[:30]!r}, {p[:30]!r}):\n ours   {ours[i][:40]} (len {len(ours[i])})\n theirs {theirs[i][:40]} (len {len(theirs[i])})"
    return None


@pytest.mark.parametrize("max_length", [512, 64, 16])
def test_longest_first_matches_transformers(tiny_model, hf_tokenizer, max_length):
    ours = PairTokenizer(tiny_model / "tokenizer.json", max_length, "longest_first").encode_pairs(PAIRS)
    batch = hf_tokenizer([q for q, _ in PAIRS], [p for _, p in PAIRS], truncation=True, max_length=max_length)
    theirs = batch["input_ids"]
    assert ours == theirs, _first_mismatch(ours, theirs)
    assert max(map(len, ours)) <= max_length


@pytest.mark.parametrize("max_length, query_max_length", [(512, None), (64, None), (64, 10), (16, None)])
def test_only_second_matches_flagembedding(tiny_model, hf_tokenizer, max_length, query_max_length):
    """FlagEmbedding: cut the query alone to query_max_length, then cut only the passage."""
    tokenizer = PairTokenizer(tiny_model / "tokenizer.json", max_length, "only_second", query_max_length)
    ours = tokenizer.encode_pairs(PAIRS)
    query_limit = query_max_length or max_length * 3 // 4
    for (query, passage), ids in zip(PAIRS, ours):
        query_ids = hf_tokenizer(query, add_special_tokens=False, truncation=True, max_length=query_limit)["input_ids"]
        passage_ids = hf_tokenizer(passage, add_special_tokens=False)["input_ids"]
        if len(hf_tokenizer(query, add_special_tokens=False)["input_ids"]) <= query_limit:
            # the query fits: transformers' own only_second on the pair must give the same ids
            # (batched form: a lone call reads an empty passage as "no pair")
            expected = hf_tokenizer([query], [passage], truncation="only_second", max_length=max_length)["input_ids"][0]
            assert ids == expected, f"{query[:30]!r}, {passage[:30]!r}:\n ours {ids[:30]}\n hf   {expected[:30]}"
        # in every case: <s> query(cut to its limit) </s></s> passage(cut to fit) </s>
        assert ids[: len(query_ids) + 3] == [0, *query_ids, 2, 2], query[:30]
        passage_part = ids[len(query_ids) + 3 : -1]
        assert passage_part == passage_ids[: len(passage_part)] and ids[-1] == 2
        assert len(ids) == min(max_length, len(query_ids) + len(passage_ids) + 4)


def test_only_second_never_eats_the_query(tiny_model):
    tokenizer = PairTokenizer(tiny_model / "tokenizer.json", 64, "only_second")
    short = tokenizer.encode_texts(["what is panda?"])[0]
    ids = tokenizer.encode_pairs([("what is panda?", "bamboo " * 500)])[0]
    assert ids[1 : 1 + len(short)] == short and len(ids) == 64


def test_chunked_windows_cover_the_passage(tiny_model):
    tokenizer = PairTokenizer(tiny_model / "tokenizer.json", 32, "only_second")
    query_ids, passage_ids = tokenizer.encode_texts(["panda", "the giant panda eats bamboo " * 20])
    windows = tokenizer.encode_chunked([("panda", "the giant panda eats bamboo " * 20)], overlap=4)[0]
    assert len(windows) > 1 and all(len(w) <= 32 for w in windows)
    parts = [w[len(query_ids) + 3 : -1] for w in windows]
    assert all(w[: len(query_ids) + 3] == [0, *query_ids, 2, 2] for w in windows)
    for before, after in zip(parts, parts[1:]):
        assert before[-4:] == after[:4]  # neighbours overlap by 4 tokens
    covered = parts[0] + [t for part in parts[1:] for t in part[4:]]
    assert covered == passage_ids


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(truncation="longest"), "truncation must be one of"),
        (dict(max_length=3), "max_length must be an int"),
        (dict(max_length="512"), "max_length must be an int"),
        (dict(query_max_length=0), "query_max_length must be an int"),
        (dict(query_max_length=600), "query_max_length must be an int"),
    ],
)
def test_bad_options_are_refused(tiny_model, options, message):
    options = {"max_length": 128, **options}
    with pytest.raises(ValueError, match=message):
        PairTokenizer(tiny_model / "tokenizer.json", **options)


def test_non_string_text_is_refused(tiny_model):
    with pytest.raises(ValueError, match="must be a string"):
        PairTokenizer(tiny_model / "tokenizer.json", 128).encode_pairs([("query", 3)])
