"""Text pairs to token ids: `<s> query </s></s> passage </s>`, truncated to fit the model.

The vocabulary and the text normalisation come from the checkpoint's tokenizer.json (XLM-R's
sentencepiece Unigram model, run by the `tokenizers` library). Query and passage are encoded
separately without special tokens, truncated here in id space, then joined with the special
tokens, so that both truncation policies are plain, visible arithmetic:

- "only_second" (FlagEmbedding's current `FlagReranker`): the query alone is cut to
  `query_max_length` tokens, then only the passage is cut so the pair fits `max_length`. A long
  passage never eats the query.
- "longest_first" (transformers' `truncation=True`, sentence-transformers, TEI): tokens are taken
  from the longer of the two until the pair fits, exactly as the `tokenizers` library does it.

Both must give the same ids as transformers' tokenizer on the same text and policy (tests/).

Read next: reranker.py, which batches these ids for the model.
"""

from pathlib import Path

from .config import ModelError, open_regular_file

SPECIAL_TOKENS_IN_PAIR = 4  # <s> ... </s></s> ... </s>
TRUNCATIONS = ("only_second", "longest_first")


class PairTokenizer:
    def __init__(self, path, max_length: int, truncation: str = "only_second", query_max_length: int | None = None):
        from tokenizers import Tokenizer

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
        try:
            open_regular_file(path).close()  # a FIFO would block the Rust reader for ever
            self.tokenizer = Tokenizer.from_file(str(path))
        except FileNotFoundError:
            raise ModelError(f"{path}: tokenizer.json not found") from None
        except Exception as e:  # the Rust side raises a plain Exception for bad JSON
            raise ModelError(f"{path}: not a usable tokenizer.json ({e})") from None
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self.bos, self.eos = (self._special_id(path, token) for token in ("<s>", "</s>"))
        self.max_length = max_length
        self.truncation = truncation
        self.query_max_length = query_max_length

    @property
    def vocab_size(self) -> int:
        """The highest token id this tokenizer can give, plus one (added tokens included): the
        rows of the word-embedding table it needs."""
        added = self.tokenizer.get_added_tokens_decoder()  # {id: AddedToken}
        return max(self.tokenizer.get_vocab_size(with_added_tokens=False), max(added, default=-1) + 1)

    def _special_id(self, path, token: str) -> int:
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise ModelError(f"{path}: the vocabulary has no {token} token; not an XLM-R tokenizer")
        return token_id

    def encode_pairs(self, pairs, max_length: int | None = None) -> list:
        """[(query, passage)] * B -> [ids] * B, each `<s> q </s></s> p </s>`, at most max_length long."""
        max_length = self.max_length if max_length is None else max_length
        if not all(isinstance(t, str) for pair in pairs for t in pair):
            raise ValueError("every query and passage must be a string")
        queries = self.encode_texts([query for query, _ in pairs])
        passages = self.encode_texts([passage for _, passage in pairs])
        budget = max_length - SPECIAL_TOKENS_IN_PAIR  # tokens left for query + passage
        encoded = []
        for query, passage in zip(queries, passages):
            if self.truncation == "only_second":
                query = query[: self._query_limit(max_length)]
                passage = passage[: max(0, budget - len(query))]
            else:
                query, passage = _longest_first(query, passage, budget)
            encoded.append(self._join(query, passage))
        return encoded

    def encode_chunked(self, pairs, max_length: int | None = None, overlap: int = 32) -> list:
        """[(query, passage)] * B -> [[ids] * windows] * B: the passage cut into overlapping windows.

        For long documents: the query is cut to query_max_length as in "only_second", then each
        window of the passage fills the rest of max_length; neighbouring windows share `overlap`
        tokens so that no sentence is only ever seen cut in half.
        """
        max_length = self.max_length if max_length is None else max_length
        queries = self.encode_texts([query for query, _ in pairs])
        passages = self.encode_texts([passage for _, passage in pairs])
        encoded = []
        for query, passage in zip(queries, passages):
            query = query[: min(self._query_limit(max_length), max_length - SPECIAL_TOKENS_IN_PAIR - 1)]
            window = max_length - SPECIAL_TOKENS_IN_PAIR - len(query)
            step = window - min(overlap, window // 2)
            starts = range(0, max(1, len(passage) - window + step), step)
            encoded.append([self._join(query, passage[start : start + window]) for start in starts])
        return encoded

    def _query_limit(self, max_length: int) -> int:
        # FlagEmbedding's default is 3/4 of the pair's max_length (which a per-call max_length changes)
        limit = self.query_max_length or max_length * 3 // 4
        return min(limit, max_length - SPECIAL_TOKENS_IN_PAIR)

    def _join(self, query: list, passage: list) -> list:
        return [self.bos, *query, self.eos, self.eos, *passage, self.eos]

    def encode_texts(self, texts: list) -> list:
        """[text] -> [ids] without special tokens or truncation."""
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]


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
