"""Token ids on a vocabulary of the real size (250,002 pieces), against transformers.

nprerank cuts words into pieces with its own Unigram (unigram.py); transformers' fast tokenizer
(the `tokenizers` library) on the same tokenizer.json is the reference. Checked on the parity
corpus (tests/cases.py), on a large seeded random corpus of many scripts, on vocabularies built to
force ties and unknown characters, and against a plain-Python twin of the Viterbi search.
"""

import json
import os
import random
import shutil

import numpy as np
import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import AutoTokenizer

from cases import PAIRS
from nprerank.config import ModelError
from nprerank.synthetic import REAL_SIZE, make_real_size_tokenizer
from nprerank.tokenizer import PairTokenizer
from nprerank.unigram import UNK_PENALTY, Unigram


@pytest.fixture(scope="module")
def real_size():
    return make_real_size_tokenizer()


@pytest.fixture(scope="module")
def hf_real_size(real_size):
    return AutoTokenizer.from_pretrained(str(real_size))


@pytest.fixture(scope="module")
def ours_real_size(real_size):
    return Unigram(real_size / "tokenizer.json")


def _compare(ours: list, theirs: list, texts: list) -> None:
    bad = [i for i in range(len(texts)) if ours[i] != theirs[i]]
    if bad:
        i = bad[0]
        raise AssertionError(
            f"{len(bad)} of {len(texts)} texts differ; first {texts[i][:60]!r}:\n"
            f" ours   {ours[i][:30]}\n theirs {theirs[i][:30]}"
        )


def random_texts(count: int, seed: int) -> list:
    """Seeded text in many scripts: words of the vocabulary's languages, letters of every block,
    combining marks, fullwidth and compatibility forms (NFKC), whitespace of every kind, emoji,
    unassigned and private-use characters (unknown), and special tokens typed in."""
    import wordfreq

    rng = random.Random(seed)
    languages = sorted(wordfreq.available_languages("best"))
    words = {language: wordfreq.top_n_list(language, 3000) for language in rng.sample(languages, 12)}
    blocks = [
        (0x21, 0x7E),
        (0xA0, 0x24F),
        (0x370, 0x52F),
        (0x590, 0x6FF),
        (0x900, 0x97F),
        (0xE00, 0xE7F),
        (0x1100, 0x11FF),
        (0x3040, 0x30FF),
        (0x4E00, 0x9FFF),
        (0xAC00, 0xD7A3),
        (0xFF01, 0xFFEE),
        (0x2460, 0x24FF),
        (0xFB00, 0xFB4F),
        (0x1F300, 0x1FAFF),
        (0xE000, 0xF8FF),
        (0x20000, 0x2A6DF),
        (0x300, 0x36F),
    ]
    spaces = [" ", " ", " ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\u2003", "\u200b", "\u00ad", "▁"]
    specials = ["<s>", "</s>", "<pad>", "<unk>", "<mask>", " <mask> ", "＜ｓ＞"]
    texts = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(0, 30)):
            roll = rng.random()
            if roll < 0.55:
                word = rng.choice(words[rng.choice(list(words))])
                parts.append(word.upper() if rng.random() < 0.1 else word)
            elif roll < 0.85:
                low, high = rng.choice(blocks)
                parts.append("".join(chr(rng.randint(low, high)) for _ in range(rng.randint(1, 6))))
            elif roll < 0.97:
                parts.append(rng.choice(spaces))
            else:
                parts.append(rng.choice(specials))
            if rng.random() < 0.7:
                parts.append(" ")
        texts.append("".join(parts))
    return texts


def test_real_size_tokenizer_is_real_size(real_size, ours_real_size, hf_real_size):
    assert len(hf_real_size) == REAL_SIZE == ours_real_size.vocab_size
    assert PairTokenizer(real_size / "tokenizer.json", 512).vocab_size == REAL_SIZE
    assert hf_real_size.convert_tokens_to_ids("<mask>") == REAL_SIZE - 1 == ours_real_size.token_to_id("<mask>")
    assert os.path.getsize(real_size / "tokenizer.json") > 5_000_000


def test_parity_corpus_matches_transformers(ours_real_size, hf_real_size):
    texts = [text for pair in PAIRS for text in pair]
    theirs = hf_real_size(texts, add_special_tokens=False)["input_ids"]
    _compare(ours_real_size.encode_texts(texts), theirs, texts)


@pytest.mark.parametrize("max_length", [512, 64])
def test_pairs_match_transformers(real_size, hf_real_size, max_length):
    ours = PairTokenizer(real_size / "tokenizer.json", max_length, "longest_first").encode_pairs(PAIRS)
    theirs = hf_real_size([q for q, _ in PAIRS], [p for _, p in PAIRS], truncation=True, max_length=max_length)
    _compare(ours, theirs["input_ids"], [q for q, _ in PAIRS])


@pytest.mark.parametrize("seed", [0, 1])
def test_random_multiscript_corpus_matches_transformers(ours_real_size, hf_real_size, seed):
    texts = random_texts(1500, seed)
    theirs = hf_real_size(texts, add_special_tokens=False)["input_ids"]
    _compare(ours_real_size.encode_texts(texts), theirs, texts)
    assert sum(map(len, theirs)) > 30_000  # the corpus is not trivially small
    assert any(3 in ids for ids in theirs)  # unknown characters were met


def test_the_real_checkpoints_tokenizer_matches_transformers(real_model):
    """bge-reranker-base's own tokenizer.json (its <mask> takes the space before it: lstrip), when
    NPRERANK_MODEL_DIR points at the real checkpoint."""
    texts = [text for pair in PAIRS for text in pair] + random_texts(1000, seed=2)
    theirs = AutoTokenizer.from_pretrained(str(real_model))(texts, add_special_tokens=False)["input_ids"]
    _compare(Unigram(real_model / "tokenizer.json").encode_texts(texts), theirs, texts)


@pytest.mark.parametrize("variant", ["mask takes the space before it", "older Metaspace format", "no normalizer"])
def test_tokenizer_json_variants_match_tokenizers(real_size, tmp_path, monkeypatch, variant):
    """What differs between XLM-R tokenizer.json files in the wild: bge-reranker-base's <mask> has
    lstrip (it takes the whitespace before it), older files write Metaspace with add_prefix_space
    and no WhitespaceSplit."""
    monkeypatch.setenv("NPRERANK_CACHE", str(tmp_path / "cache"))
    document = json.loads((real_size / "tokenizer.json").read_text(encoding="utf-8"))
    if variant == "mask takes the space before it":
        next(t for t in document["added_tokens"] if t["content"] == "<mask>")["lstrip"] = True
    elif variant == "older Metaspace format":
        document["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁", "add_prefix_space": True}
    else:
        document["normalizer"] = None
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")
    texts = [text for pair in PAIRS for text in pair] + random_texts(300, seed=3) + ["a <mask> b", "a  \t<mask>"]
    theirs = [e.ids for e in Tokenizer.from_file(str(path)).encode_batch(texts, add_special_tokens=False)]
    _compare(Unigram(path).encode_texts(texts), theirs, texts)


def test_every_piece_is_found_with_its_id(real_size, ours_real_size):
    vocab = json.loads((real_size / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    sample = random.Random(0).sample(range(len(vocab)), 3000) + [0, 1, 2, 3, len(vocab) - 1]
    assert [ours_real_size.token_to_id(vocab[i][0]) for i in sample] == sample
    assert ours_real_size.token_to_id("no such piece, surely") is None


# --- small vocabularies made to test the corners, against tokenizers' own Unigram -------------


def _unigram_file(folder, vocab: list, unk_id: int = 0) -> tuple:
    """A tokenizer.json with this Unigram vocabulary, XLM-R's pre-tokenizer, NFKC; (path, Tokenizer)."""
    tokenizer = Tokenizer(models.Unigram(vocab, unk_id=unk_id, byte_fallback=False))
    tokenizer.normalizer = normalizers.NFKC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")]
    )
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tokenizer.json"
    tokenizer.save(str(path))
    return path, tokenizer


def naive_viterbi(word: str, vocab: list, unk_id: int) -> list:
    """The plain-Python twin of viterbi_forward: every piece at every character, best path, unk fused."""
    ids = {piece: i for i, (piece, _) in enumerate(vocab)}
    unk_score = min(score for _, score in vocab) - UNK_PENALTY
    data = word.encode()
    best = {0: (0.0, None, None)}  # byte end -> (score, start, id)
    starts = [i for i in range(len(data)) if (data[i] & 0xC0) != 0x80]
    for i in starts:
        width = len(word.encode()[i:].decode(errors="ignore")[:1].encode())
        single = False
        for end in range(i + 1, len(data) + 1):
            piece = data[i:end].decode(errors="ignore") if (end == len(data) or (data[end] & 0xC0) != 0x80) else None
            if piece is not None and piece.encode() == data[i:end] and piece in ids:
                candidate = vocab[ids[piece]][1] + best[i][0]
                if end not in best or candidate > best[end][0]:
                    best[end] = (candidate, i, ids[piece])
                single |= end - i == width
        if not single and (i + width not in best or unk_score + best[i][0] > best[i + width][0]):
            best[i + width] = (unk_score + best[i][0], i, unk_id)
    out, end = [], len(data)
    while end > 0:
        _, start, token = best[end]
        if not (token == unk_id and out and out[-1] == unk_id):
            out.append(token)
        end = start
    return out[::-1]


@pytest.mark.parametrize("seed", range(4))
def test_ties_and_unknowns_match_tokenizers_and_the_naive_twin(tmp_path, monkeypatch, seed):
    """Few letters, many pieces with equal scores: every tie-break and <unk> fusion is exercised."""
    monkeypatch.setenv("NPRERANK_CACHE", str(tmp_path / "cache"))
    rng = random.Random(seed)
    letters = "abcdé熊猫"
    pieces = {"".join(rng.choice(letters) for _ in range(rng.randint(1, 4))) for _ in range(60)}
    pieces |= {"▁" + p for p in list(pieces)[:20]} | {"▁"}
    pieces -= {"d", "猫"}  # letters with no piece of their own: unknown when alone
    vocab = [("<unk>", 0.0)] + [(p, float(-rng.choice([1, 2, 2.5, 3, 4]))) for p in sorted(pieces)]
    path, reference = _unigram_file(tmp_path / "tok", vocab)
    texts = [
        " ".join("".join(rng.choice(letters + "xy") for _ in range(rng.randint(1, 9))) for _ in range(5))
        for _ in range(300)
    ]
    ours = Unigram(path).encode_texts(texts)
    theirs = [e.ids for e in reference.encode_batch(texts, add_special_tokens=False)]
    _compare(ours, theirs, texts)
    for text, ids in zip(texts[:100], ours):
        naive = [i for word in text.split() for i in naive_viterbi("▁" + word, vocab, 0)]
        assert ids == naive, text


def test_trie_handles_prefixes_duplicates_and_long_pieces(tmp_path, monkeypatch):
    monkeypatch.setenv("NPRERANK_CACHE", str(tmp_path / "cache"))
    long_piece = "▁" + "ab" * 40
    vocab = [
        ("<unk>", 0.0),
        ("▁a", -1.0),
        ("▁ab", -2.0),
        ("▁a", -1.5),
        ("b", -3.0),
        ("a", -3.0),
        (long_piece, -1.0),
        ("\u00e9", -2.0),
        ("▁", -4.0),
    ]
    path, reference = _unigram_file(tmp_path / "tok", vocab)
    ours = Unigram(path)
    assert ours.token_to_id("▁a") == 3 == reference.token_to_id("▁a")  # a duplicate keeps its last id
    assert ours.token_to_id(long_piece) == 6 and ours.token_to_id("▁ab" * 2) is None
    texts = ["a ab aba abab " + "ab" * 40, "ab" * 41, "é e\u0301 ée", ""]
    _compare(ours.encode_texts(texts), [e.ids for e in reference.encode_batch(texts, add_special_tokens=False)], texts)


# --- the cache of arrays --------------------------------------------------------------------


def test_arrays_are_memory_mapped_from_the_cache_and_rebuilt_when_the_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("NPRERANK_CACHE", str(tmp_path / "cache"))
    path, _ = _unigram_file(tmp_path / "tok", [("<unk>", 0.0), ("▁a", -1.0), ("▁b", -1.0)])
    first = Unigram(path)
    assert first.encode_texts(["a b"]) == [[1, 2]]
    again = Unigram(path)
    assert isinstance(again.labels.base, np.memmap) or isinstance(getattr(again.labels.base, "base", None), np.memmap)
    assert len(list((tmp_path / "cache").glob("unigram-*"))) == 1
    _unigram_file(tmp_path / "tok", [("<unk>", 0.0), ("▁b", -1.0), ("▁a", -1.0)])  # same path, new vocabulary
    assert Unigram(path).encode_texts(["a b"]) == [[2, 1]]


def test_a_cached_tokenizer_is_not_parsed_again_and_a_replaced_one_is(tmp_path, monkeypatch):
    """The cache's stamp tells the kind of a file read before (parsing 17 MB of JSON took 0.3 s of
    every start); the same path holding another kind of tokenizer since is parsed and read as such."""
    import nprerank.tokenizer

    monkeypatch.setenv("NPRERANK_CACHE", str(tmp_path / "cache"))
    vocab = [("<unk>", 0.0), ("<s>", 0.0), ("</s>", 0.0), ("▁a", -1.0), ("▁b", -1.0)]
    path, _ = _unigram_file(tmp_path / "tok", vocab)
    assert PairTokenizer(path, 16).kind == "Unigram"  # parsed once: the cache is written
    parse = nprerank.tokenizer.tokenizer_kind
    monkeypatch.setattr(nprerank.tokenizer, "tokenizer_kind", lambda path: pytest.fail("parsed a cached tokenizer"))
    assert PairTokenizer(path, 16).encode([("a", "b a")])[1] == [[1, 3, 2, 2, 4, 3, 2]]
    wordpiece = Tokenizer(models.WordPiece({"[UNK]": 0, "[CLS]": 1, "[SEP]": 2, "a": 3}, unk_token="[UNK]"))
    wordpiece.pre_tokenizer = pre_tokenizers.Whitespace()
    wordpiece.save(str(path))
    monkeypatch.setattr(nprerank.tokenizer, "tokenizer_kind", parse)
    replaced = PairTokenizer(path, 16)
    assert replaced.kind == "WordPiece" and replaced.encode([("a", "a")])[1] == [[1, 3, 2, 3, 2]]


def test_writing_the_cache_deletes_that_of_tokenizers_gone_or_changed(tmp_path, monkeypatch):
    monkeypatch.setenv("NPRERANK_CACHE", str(tmp_path / "cache"))
    vocab = [("<unk>", 0.0), ("▁a", -1.0), ("▁b", -1.0)]
    paths = [_unigram_file(tmp_path / name, vocab)[0] for name in ("kept", "deleted", "changed", "new")]
    for path in paths[:3]:
        Unigram(path)
    shutil.rmtree(tmp_path / "deleted")
    _unigram_file(tmp_path / "changed", vocab[::-1])
    (tmp_path / "cache" / "unigram-x.tmp").mkdir()  # a writer killed long ago
    os.utime(tmp_path / "cache" / "unigram-x.tmp", (0, 0))
    Unigram(paths[3])  # a write: prunes
    left = sorted(
        json.loads((folder / "stamp.json").read_text())["path"] for folder in (tmp_path / "cache").glob("unigram-*")
    )
    assert left == sorted(str(path.resolve()) for path in (paths[0], paths[3]))


def test_damaged_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("NPRERANK_CACHE", str(tmp_path / "cache"))
    path, _ = _unigram_file(tmp_path / "tok", [("<unk>", 0.0), ("▁a", -1.0), ("▁b", -1.0)])
    Unigram(path)
    (folder,) = (tmp_path / "cache").glob("unigram-*")
    (folder / "piece.npy").write_bytes(b"not numpy")
    assert Unigram(path).encode_texts(["b a"]) == [[2, 1]]


def test_unwritable_cache_keeps_the_arrays_in_memory_with_a_warning(tmp_path, monkeypatch):
    (tmp_path / "a-file").write_text("")
    monkeypatch.setenv("NPRERANK_CACHE", str(tmp_path / "a-file"))
    path, _ = _unigram_file(tmp_path / "tok", [("<unk>", 0.0), ("▁a", -1.0), ("▁b", -1.0)])
    with pytest.warns(UserWarning, match="cannot cache the tokenizer's arrays"):
        ours = Unigram(path)
    assert ours.encode_texts(["a b"]) == [[1, 2]]


# --- the same errors as before: ModelError naming the file ------------------------------------


def _small_json() -> str:
    tokenizer = Tokenizer(models.Unigram([("<unk>", 0.0), ("▁a", -1.0)], unk_id=0, byte_fallback=False))
    return tokenizer.to_str()


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda d: d.update(model={"type": "BPE", "vocab": {}, "merges": []}), "model is BPE"),
        (lambda d: d["model"].update(unk_id=None), "no <unk> piece"),
        (lambda d: d["model"].update(unk_id=7), "no <unk> piece"),
        (lambda d: d["model"].update(byte_fallback=True), "byte fallback"),
        (lambda d: d["model"].update(vocab=[["▁a", "high"]]), "not a usable tokenizer.json"),
        (lambda d: d["model"].update(vocab=[]), "not a usable tokenizer.json"),
        (
            lambda d: d.update(
                pre_tokenizer={"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": True}
            ),
            "prepend_scheme 'first'",
        ),
        (lambda d: d.update(pre_tokenizer={"type": "NoSuchThing"}), "not a usable tokenizer.json"),
    ],
)
def test_unusable_tokenizers_are_refused_naming_the_file(tmp_path, monkeypatch, edit, message):
    monkeypatch.setenv("NPRERANK_CACHE", str(tmp_path / "cache"))
    document = json.loads(_small_json())
    edit(document)
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(document))
    with pytest.raises(ModelError, match=message) as error:
        Unigram(path)
    assert str(path) in str(error.value)


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "not found"),
        (b"{not json", "not a usable tokenizer.json"),
        (b"\xff\xfe", "not a usable tokenizer.json"),
        ("folder", "is a directory, not a regular file"),
        ("fifo", "not a regular file"),
    ],
)
def test_missing_or_broken_files_are_refused(tmp_path, monkeypatch, content, message):
    monkeypatch.setenv("NPRERANK_CACHE", str(tmp_path / "cache"))
    path = tmp_path / "tokenizer.json"
    if content == "folder":
        path.mkdir()
    elif content == "fifo":  # nothing ever writes to it: reading it would block for ever
        os.mkfifo(path)
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(ModelError, match=message):
        PairTokenizer(path, 128)
