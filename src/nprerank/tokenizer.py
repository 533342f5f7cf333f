"""Text pairs to token ids: `<s> query </s></s> passage </s>`, truncated to fit the model.

The vocabulary and the text normalisation come from the checkpoint's tokenizer.json (XLM-R's
sentencepiece Unigram model): unigram.py turns text into ids, with the `tokenizers` library's
normaliser and pre-tokenizer and a compact vocabulary of its own. A BERT cross-encoder's
WordPiece tokenizer.json (wordpiece.py) gives `[CLS] query [SEP] passage [SEP]` instead:
PAIR_LAYOUTS picks the layout from the file's model type. Query and passage are encoded
separately without special tokens, truncated here in id space, then joined with the special
tokens, so that both truncation policies are plain, visible arithmetic:

- "only_second" (FlagEmbedding's current `FlagReranker`): the query alone is cut to
  `query_max_length` tokens, then only the passage is cut so the pair fits `max_length`. A long
  passage never eats the query.
- "longest_first" (transformers' `truncation=True`, sentence-transformers, TEI): tokens are taken
  from the longer of the two until the pair fits, exactly as the `tokenizers` library does it.

Both must give the same ids as transformers' tokenizer on the same text and policy (tests/).

Only what can reach the model is read: each distinct text of a call is tokenized once, and a
long one only as a prefix that provably (cut before a space) or verifiably (cut elsewhere,
checked against a longer prefix) holds the same first ids as the whole text (`_first_tokens`).
So a 1 MB query costs about a kilobyte of tokenizing, not a megabyte per passage. The one
visible consequence: under "longest_first" with an odd token budget and both texts longer than
the model can read, transformers gives the spare token to the longer text, which only reading
both whole could tell; here the passage gets it.

Read next: reranker.py, which batches these ids for the model.
"""

import unicodedata
from pathlib import Path

from .config import ModelError
from .unigram import Unigram, is_cached
from .wordpiece import WordPiece, tokenizer_kind

SPECIAL_TOKENS_IN_PAIR = 4  # <s> ... </s></s> ... </s>: the most any pair layout adds
# tokenizer.json's model type -> (text-to-ids class, first token, separator, last token) of a pair
PAIR_LAYOUTS = {
    "Unigram": (Unigram, "<s>", ("</s>", "</s>"), "</s>"),  # XLM-R: <s> q </s></s> p </s>
    "WordPiece": (WordPiece, "[CLS]", ("[SEP]",), "[SEP]"),  # BERT: [CLS] q [SEP] p [SEP]
}
TRUNCATIONS = ("only_second", "longest_first")


class PairTokenizer:
    def __init__(self, path, max_length: int, truncation: str = "only_second", query_max_length: int | None = None):
        path = Path(path)
        if truncation not in TRUNCATIONS:
            raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")
        if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length <= SPECIAL_TOKENS_IN_PAIR + 1:
            raise ValueError(f"max_length must be an int > {SPECIAL_TOKENS_IN_PAIR + 1}, got {max_length!r}")
        if query_max_length is not None and (
            isinstance(query_max_length, bool)
            or not isinstance(query_max_length, int)
            or not 1 <= query_max_length <= max_length - SPECIAL_TOKENS_IN_PAIR
        ):
            raise ValueError(
                f"query_max_length must be an int from 1 to max_length - {SPECIAL_TOKENS_IN_PAIR} "
                f"= {max_length - SPECIAL_TOKENS_IN_PAIR}, got {query_max_length!r}"
            )
        # a Unigram file read before is known by its cached arrays; any other is parsed to find its kind
        kind = "Unigram" if is_cached(path) else tokenizer_kind(path)  # ModelError naming the file if unreadable
        if kind not in PAIR_LAYOUTS:
            raise ModelError(
                f"{path}: a {kind or 'unknown'} tokenizer; nprerank reads Unigram (XLM-R) and "
                "WordPiece (BERT) tokenizer.json files"
            )
        self.kind = kind
        backend, first, separator, last = PAIR_LAYOUTS[kind]
        self.tokenizer = backend(path)  # ModelError naming the file if unusable
        self.bos, self.eos = self._special_id(path, first), self._special_id(path, last)
        self.separator = [self._special_id(path, token) for token in separator]
        self.special_tokens = 2 + len(self.separator)  # special tokens in a pair: 4 for XLM-R, 3 for BERT
        self.max_length = max_length
        self.truncation = truncation
        self.query_max_length = query_max_length

    @property
    def vocab_size(self) -> int:
        """The tokenizer's highest id + 1, added tokens included."""
        return self.tokenizer.vocab_size

    def _special_id(self, path, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ModelError(f"{path}: the vocabulary has no {token} token, which this kind of tokenizer needs")
        return token_id

    def encode(
        self,
        pairs,
        max_length: int | None = None,
        truncation: str | None = None,
        passage_max_length: int | None = None,
        query_max_length: int | None = None,
        chunk: tuple | None = None,
    ) -> tuple:
        """[(query, passage)] * P -> (owners [S], sequences [S], lengths [P]): what the model is given.

        Each sequence is `<s> q </s></s> p </s>`, at most `max_length` long (None: this tokenizer's).
        `truncation` None is this tokenizer's policy. `passage_max_length` first cuts every passage to
        that many tokens (Cohere's `max_tokens_per_doc`). `chunk=(overlap, max_windows)` cuts a long
        passage into windows (see `_windows`) instead of truncating it: `owners[s]` is the pair each
        sequence belongs to. `lengths[i]` is pair i's token count with special tokens before
        max_length cuts it: exact while <= max_length, beyond only guaranteed > max_length, since
        no more text is tokenized than can reach the model (see `_first_tokens`).
        """
        max_length = self.max_length if max_length is None else max_length
        truncation = self.truncation if truncation is None else truncation
        if truncation not in TRUNCATIONS:
            raise ValueError(f"truncation must be one of {TRUNCATIONS}, got {truncation!r}")
        query_max_length = self.query_max_length if query_max_length is None else query_max_length
        pairs = check_pairs(pairs)
        budget = max_length - self.special_tokens  # tokens left for query + passage
        # tokens needed per text: one more than the budget tells "longer than max_length" apart
        query_need = budget + 1
        passage_need = budget + 1 if chunk is None else max(budget + 1, chunk_tokens(budget, chunk[1]))
        if passage_max_length is not None:
            passage_need = min(passage_need, passage_max_length)
        needs = {}
        for query, passage in pairs:  # each distinct text once, however often it comes
            needs[query] = max(needs.get(query, 0), query_need)
            needs[passage] = max(needs.get(passage, 0), passage_need)
        tokens = self._first_tokens(needs)
        owners, sequences, lengths = [], [], []
        query_limit = _query_limit(max_length, query_max_length)
        for i, (query, passage) in enumerate(pairs):
            query_ids, passage_ids = tokens[query][:query_need], tokens[passage][:passage_need]
            lengths.append(len(query_ids) + len(passage_ids) + self.special_tokens)
            if chunk is not None:
                query_ids = query_ids[: min(query_limit, budget - 1)]  # at least one passage token
                windows = _windows(passage_ids, budget - len(query_ids), *chunk)
            elif truncation == "only_second":
                query_ids = query_ids[:query_limit]
                windows = [passage_ids[: max(0, budget - len(query_ids))]]
            else:
                query_ids, passage_ids = _longest_first(query_ids, passage_ids, budget)
                windows = [passage_ids]
            owners += [i] * len(windows)
            sequences += [self._join(query_ids, window) for window in windows]
        return owners, sequences, lengths

    def encode_pairs(self, pairs, max_length: int | None = None, truncation: str | None = None) -> list:
        """[(query, passage)] * B -> [ids] * B, each `<s> q </s></s> p </s>`, at most max_length long."""
        return self.encode(pairs, max_length, truncation)[1]

    def encode_chunked(self, pairs, max_length: int | None = None, overlap: int = 32, max_windows: int = 16) -> list:
        """[(query, passage)] * B -> [[ids] * windows] * B: the passage cut into overlapping windows.

        For long documents: the query is cut to query_max_length as in "only_second", then each
        window of the passage fills the rest of max_length; neighbouring windows share `overlap`
        tokens so that no sentence is only ever seen cut in half; at most `max_windows` per passage.
        """
        owners, sequences, _ = self.encode(pairs, max_length, chunk=(overlap, max_windows))
        grouped = [[] for _ in pairs]
        for owner, sequence in zip(owners, sequences):
            grouped[owner].append(sequence)
        return grouped

    def _join(self, query: list, passage: list) -> list:
        return [self.bos, *query, *self.separator, *passage, self.eos]

    def _first_tokens(self, needs: dict) -> dict:
        """{text: n} -> {text: the first n ids of text} (fewer if the text has fewer), tokenizing
        a prefix of each long text instead of all of it.

        Why a prefix gives the full text's first ids (XLM-R's tokenizer.json: a per-character
        normalizer, then WhitespaceSplit and Metaspace, then a Unigram model applied word by word):
        a prefix cut just before a space holds whole words, each normalized and segmented exactly
        as in the full text, since no normalization step joins a character with a following
        space. So its ids are the full text's first ids. (BERT's WordPiece tokenizer.json holds
        too: BertNormalizer works per character, BertPreTokenizer splits at whitespace and
        punctuation, and WordPiece reads word by word.) A text with no space near the cut (CJK,
        one long "word") is cut at a character that starts a grapheme and verified: the ids of
        that prefix and of one twice as long must agree on the first n, else more is read.
        A prefix starts at CHARS_PER_TOKEN characters per token needed (`prefix_chars`) and doubles
        while it gives too few ids (very long words, or characters the normalizer drops): the
        rounds add up to at most twice the last prefix (three times when verified), so a text is
        never read more than a few times its own length, and ordinary text once, ~1 kB per 128 ids.
        """
        found = {}
        chars = {text: prefix_chars(need) for text, need in needs.items()}
        while len(found) < len(needs):
            cuts = {}  # text -> (end of its prefix, end of a longer prefix to check it against, or None if exact)
            for text in needs.keys() - found.keys():
                cut, exact = _cut(text, chars[text])
                check = None
                if not exact:
                    longer, exact = _cut(text, 2 * cut)
                    cut, check = (longer, None) if exact else (cut, longer)  # an exact longer cut needs no check
                cuts[text] = (cut, check)
            texts = list(cuts)
            checked = [text for text in texts if cuts[text][1] is not None]
            prefixes = [text[: cuts[text][0]] for text in texts] + [text[: cuts[text][1]] for text in checked]
            encoded = self.encode_texts(prefixes)
            ids = dict(zip(texts, encoded))
            for text, longer in zip(checked, encoded[len(texts) :]):
                ids[text] = _common_prefix(ids[text], longer)  # the ids both prefixes agree on
            for text in texts:
                if len(ids[text]) >= needs[text] or cuts[text][0] >= len(text):
                    found[text] = ids[text][: needs[text]]
                else:
                    chars[text] = 2 * chars[text]
        return found

    def encode_texts(self, texts: list) -> list:
        """[text] -> [ids] without special tokens or truncation (special tokens typed in the text
        are kept as their ids, as transformers does)."""
        return self.tokenizer.encode_texts(texts)


CHARS_PER_TOKEN = 8  # a first guess, generous: XLM-R averages ~4 characters per token in English, ~1.5 in CJK


def prefix_chars(tokens: int) -> int:
    """Characters first read from a long text to find its first `tokens` tokens (doubled while short)."""
    return CHARS_PER_TOKEN * tokens + 64


def chunk_tokens(budget: int, max_windows: int) -> int:
    """Most passage tokens chunk mode can score: max_windows windows of at most `budget` tokens."""
    return budget * max_windows


def _windows(passage: list, window: int, overlap: int, max_windows: int) -> list:
    """The passage's ids cut into at most max_windows windows of `window` ids sharing `overlap`."""
    step = window - min(overlap, window // 2)
    starts = range(0, max(1, len(passage) - window + step), step)
    return [passage[start : start + window] for start in starts[:max_windows]]


def _query_limit(max_length: int, query_max_length: int | None) -> int:
    # FlagEmbedding's default is 3/4 of the pair's max_length (which a per-call max_length changes)
    limit = query_max_length or max_length * 3 // 4
    return min(limit, max_length - SPECIAL_TOKENS_IN_PAIR)


def _cut(text: str, chars: int) -> tuple:
    """Where to cut `text` near `chars` characters -> (index, provably exact?).

    Just before the last space in the second half of the first `chars` characters (exact, see
    PairTokenizer._first_tokens); failing that, at the first character from `chars` on that
    starts a grapheme (not a combining mark, joiner or variation selector), to be verified.
    """
    if chars >= len(text):
        return len(text), True
    space = text.rfind(" ", chars // 2, chars)
    if space > 0:
        return space, True
    cut = chars
    while cut < len(text) and _continues_grapheme(text[cut]):
        cut += 1
    return cut, False


def _continues_grapheme(char: str) -> bool:
    return (
        unicodedata.category(char) in ("Mn", "Mc", "Me")  # combining marks
        or char in "\u200c\u200d"  # zero-width (non-)joiner
        or "\ufe00" <= char <= "\ufe0f"
        or "\U000e0100" <= char <= "\U000e01ef"  # variation selectors
        or "\U0001f3fb" <= char <= "\U0001f3ff"  # emoji skin tones
    )


def _longest_first(first: list, second: list, budget: int) -> tuple:
    """Cut the pair to `budget` tokens the way `tokenizers`' LongestFirst strategy does."""
    n1, n2 = len(first), len(second)
    if n1 + n2 <= budget:
        return first, second
    short, long = min(n1, n2), max(n1, n2)
    if short > budget:
        long = short
    else:
        long = max(short, budget - short)
    if short + long > budget:  # both too long for their half: split the budget evenly
        short = budget // 2
        long = short + budget % 2
    keep1, keep2 = (long, short) if n1 > n2 else (short, long)
    return first[:keep1], second[:keep2]


def _common_prefix(first: list, second: list) -> list:
    n = 0
    for a, b in zip(first, second):
        if a != b:
            break
        n += 1
    return first[:n]


def check_text(name: str, value, allow_empty: bool = True) -> str:
    """A str that can be encoded as UTF-8, else ValueError naming `name` (a lone surrogate
    such as "\\ud800" is a valid JSON escape and a valid Python str, but not text)."""
    if not isinstance(value, str) or not (allow_empty or value):
        what = "a string" if allow_empty else "a non-empty string"
        raise ValueError(f"{name} must be {what}, got {value!r:.80}")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(
                f"{name} is not valid Unicode: a lone surrogate {value[e.start]!r} at character {e.start}"
            ) from None
    return value


def check_pairs(pairs) -> list:
    """[(query, passage)] of valid text -> the same as a list of tuples, else ValueError naming the pair."""
    if not isinstance(pairs, (list, tuple)):
        raise ValueError(f"pairs must be a list of (query, passage) pairs, got {type(pairs).__name__}")
    checked, seen = [], set()  # a query shared by every pair is checked once, not once per pair
    for i, pair in enumerate(pairs):
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError(f"pairs[{i}] must be a (query, passage) pair of strings, got {pair!r:.80}")
        for j, text in enumerate(pair):
            if not (isinstance(text, str) and text in seen):
                seen.add(check_text(f"pairs[{i}][{j}]", text))
        checked.append(tuple(pair))
    return checked
