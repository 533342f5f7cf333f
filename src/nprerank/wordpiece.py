"""Text to ids for BERT cross-encoders: the checkpoint's WordPiece tokenizer.json.

The ms-marco MiniLM cross-encoders ship a WordPiece tokenizer.json (BertNormalizer: lowercase,
accents stripped, CJK characters spaced; BertPreTokenizer: whitespace and punctuation splits;
a 30,522-entry vocabulary). The `tokenizers` library runs it as transformers' BertTokenizerFast
does; at this vocabulary size it needs a few MB, so unlike XLM-R's 250,002-piece Unigram
(unigram.py) it needs no compact form of our own. This class gives it the interface tokenizer.py
uses for either: `encode_texts`, `token_to_id`, `vocab_size`.

Read next: tokenizer.py, which joins the ids as `[CLS] q [SEP] p [SEP]`.
"""

import json
from pathlib import Path

from .config import ModelError, open_regular_file


def tokenizer_kind(path) -> str:
    """The model type of the tokenizer.json at `path` ("Unigram", "WordPiece", ...); ModelError
    naming the file if it cannot be read."""
    path = Path(path)
    try:
        with open_regular_file(path) as f:  # a FIFO in its place would block a plain open for ever
            document = json.loads(f.read().decode("utf-8"))
    except FileNotFoundError:
        raise ModelError(f"{path}: tokenizer.json not found") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{path}: not a usable tokenizer.json ({e})") from None
    model = document.get("model") if isinstance(document, dict) else None
    return model.get("type", "") if isinstance(model, dict) else ""


class WordPiece:
    """The WordPiece tokenizer.json at `path`; ModelError naming the file when unusable."""

    def __init__(self, path):
        from tokenizers import Tokenizer

        path = Path(path)
        try:
            self.tokenizer = Tokenizer.from_file(str(path))
        except Exception as e:  # the Rust side raises a plain Exception
            raise ModelError(f"{path}: not a usable tokenizer.json ({e})") from None
        self.tokenizer.no_truncation()  # tokenizer.py truncates, in id space
        self.tokenizer.no_padding()

    @property
    def vocab_size(self) -> int:
        """The highest id + 1, added tokens included."""
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def encode_texts(self, texts: list) -> list:
        """[text] -> [ids] without special tokens or truncation (special tokens typed in a text
        are kept as their ids, as transformers does)."""
        return [encoding.ids for encoding in self.tokenizer.encode_batch(texts, add_special_tokens=False)]
