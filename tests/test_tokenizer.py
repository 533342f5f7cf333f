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
            return (
                f"pair {i} ({q[:30]!r}, {p[:30]!r}):\n ours   {ours[i][:40]} (len {len(ours[i])})\n"
                f" theirs {theirs[i][:40]} (len {len(theirs[i])})"
            )
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


# --- reading only as much text as the model can take ------------------------------------------

# Long texts in several scripts, with the characters that make a cut risky near any cut point
LONG_TEXTS = {  # each a few times longer than the prefix read for 128 tokens, so that cuts are exercised
    "english": "The giant panda lives in the mountains of central China and eats bamboo. " * 50,
    "cjk without spaces": "熊猫是一种生活在中国的熊主要吃竹子。" * 200,
    "emoji sequences": "🐼👩‍👩‍👧🏽🇯🇵❤️" * 300,
    "combining accents": ("cafe\u0301 e\u0301\u0301x \u0301 n\u0303o " * 150),
    "nfkc and odd spaces": "ﬁnal ① Ａ\u00a0ｶﾀｶﾅ\u3000ﷺ\u200b soft\u00adhyphen\t\r\n  " * 100,
    "one long word": "a" * 6000,
    "korean jamo": "\u1100\u1161\u11a8 한국어 " * 400,
}


@pytest.mark.parametrize("name", list(LONG_TEXTS))
def test_first_tokens_are_the_full_texts_first_tokens(tiny_model, name):
    tokenizer = PairTokenizer(tiny_model / "tokenizer.json", 128)
    text = LONG_TEXTS[name]
    full = tokenizer.encode_texts([text])[0]
    for need in [1, 7, 125, 300]:
        first = tokenizer._first_tokens({text: need})[text]
        assert first == full[:need], f"{name}, {need} tokens: first mismatch at {_mismatch(first, full)}"


def _mismatch(first, full):
    return next((i for i, (a, b) in enumerate(zip(first, full)) if a != b), min(len(first), len(full)))


def test_a_prefix_cut_before_a_space_tokenizes_as_the_full_text(tiny_model):
    """The fact the cut relies on, checked at every space of texts made of risky characters."""
    import random

    tokenizer = PairTokenizer(tiny_model / "tokenizer.json", 128)
    pool = [
        "panda",
        "熊猫",
        "ﬁnal",
        "①",
        "\u200b",
        "\u00a0",
        "\t",
        "\n",
        "Ａ",
        "cafe\u0301",
        "🐼",
        "\u0301",
        "e\u0301",
        "\u3000",
        "ﷺ",
        "\u00ad",
        "<s>",
        "ｶ",
        "\u0308",
        "\x1c",
        "\r\n",
        "가",
        "\u1100\u1161",
    ]
    rng = random.Random(1)
    for _ in range(10):
        text = "".join(rng.choice(pool) + rng.choice([" ", "", "", " "]) for _ in range(300))
        full = tokenizer.encode_texts([text])[0]
        cuts = [i for i, char in enumerate(text) if char == " "]
        for cut, ids in zip(cuts, tokenizer.encode_texts([text[:cut] for cut in cuts])):
            assert full[: len(ids)] == ids, repr(text[max(0, cut - 12) : cut + 4])


LONG_PAIRS = (
    [
        (LONG_TEXTS[a], LONG_TEXTS[b])
        for a, b in [
            ("english", "cjk without spaces"),
            ("cjk without spaces", "emoji sequences"),
            ("combining accents", "one long word"),
            ("nfkc and odd spaces", "korean jamo"),
            ("english", "english"),
        ]
    ]
    + [("short query", text) for text in LONG_TEXTS.values()]
    + [(text, "short passage") for text in LONG_TEXTS.values()]
)


@pytest.mark.parametrize("max_length", [128])
def test_long_pairs_match_transformers(tiny_model, hf_tokenizer, max_length):
    """longest_first on long texts in several scripts: the same ids as transformers, which reads them whole.

    (Not at small max_length: the `tokenizers` library then builds every overflowing window of
    both texts, pairwise, which takes minutes and gigabytes; the next test covers small max_length.)
    """
    tokenizer = PairTokenizer(tiny_model / "tokenizer.json", max_length, "longest_first")
    ours = tokenizer.encode_pairs(LONG_PAIRS)
    theirs = hf_tokenizer(
        [q for q, _ in LONG_PAIRS], [p for _, p in LONG_PAIRS], truncation=True, max_length=max_length
    )["input_ids"]
    for (query, passage), mine, expected in zip(LONG_PAIRS, ours, theirs):
        assert mine == expected, f"{query[:20]!r}, {passage[:20]!r}: first mismatch at {_mismatch(mine, expected)}"


@pytest.mark.parametrize("truncation", ["only_second", "longest_first"])
@pytest.mark.parametrize("max_length", [128, 40, 17])
def test_bounded_reading_changes_no_id_and_no_length(tiny_model, truncation, max_length):
    """Against the same policy applied to the texts tokenized whole (the path before bounding)."""
    from nprerank.tokenizer import _longest_first, _query_limit

    tokenizer = PairTokenizer(tiny_model / "tokenizer.json", max_length, truncation)
    pairs = LONG_PAIRS + PAIRS
    owners, sequences, lengths = tokenizer.encode(pairs)
    assert owners == list(range(len(pairs)))
    budget = max_length - 4
    for (query, passage), ids, length in zip(pairs, sequences, lengths):
        q, p = tokenizer.encode_texts([query, passage])
        full = len(q) + len(p) + 4
        assert length == full if full <= max_length else length > max_length
        if truncation == "only_second":
            q = q[: _query_limit(max_length, None)]
            p = p[: max(0, budget - len(q))]
        else:
            if budget % 2 and min(len(q), len(p)) > budget:
                # both longer than the model can read and an odd budget: transformers gives the spare
                # token to the longer text, which only reading both whole could tell; the passage gets it
                q, p = q[: budget // 2], p[: budget // 2 + 1]
            else:
                q, p = _longest_first(q, p, budget)
        assert ids == [0, *q, 2, 2, *p, 2], f"{query[:20]!r}, {passage[:20]!r}"
