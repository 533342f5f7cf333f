"""The model's configuration, read from a checkpoint's config.json.

This module owns one thing: turning config.json into a small frozen `ModelConfig` holding only
the fields the forward pass uses, and refusing any checkpoint we cannot run exactly. It must
agree with transformers' `XLMRobertaConfig` on what each field means.

Read next: weights.py (which tensors the config asks for) and reference.py (how they are used).
"""

import json
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from .architectures import ARCHITECTURES, Architecture


FLOAT32_TINY, FLOAT32_MAX = 1.1754943508222875e-38, 3.4028234663852886e38  # float32's normal range


MAX_CONFIG_BYTES = 10 << 20  # a config.json is a few KB; more is not one (and is refused as bad JSON)


class ModelError(ValueError):
    """A model folder or file we cannot use; the message names the file and the problem."""


def open_regular_file(path):
    """`path` opened for reading in binary, after checking that it is a regular file: a FIFO
    would block the open until something writes to it, a device could be endless or have side
    effects, and a directory cannot be read. ModelError names the path and what it is instead;
    FileNotFoundError and other OSErrors pass through. The check is made again on the opened
    file (O_NONBLOCK: a FIFO swapped in between does not block the open either)."""
    kinds = {
        stat.S_IFIFO: "a FIFO",
        stat.S_IFCHR: "a character device",
        stat.S_IFBLK: "a block device",
        stat.S_IFDIR: "a directory",
        stat.S_IFSOCK: "a socket",
    }

    def refuse(mode):
        raise ModelError(f"{path}: is {kinds.get(stat.S_IFMT(mode), 'not a regular file')}, not a regular file")

    mode = os.stat(path).st_mode
    if not stat.S_ISREG(mode):
        refuse(mode)
    descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(descriptor).st_mode
        if not stat.S_ISREG(mode):
            refuse(mode)
        return os.fdopen(descriptor, "rb")
    except BaseException:
        os.close(descriptor)
        raise


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int = 250002  # rows of the word embedding table
    hidden_size: int = 768  # C: width of every token vector
    num_hidden_layers: int = 12  # encoder layers, each attention + feed-forward
    num_attention_heads: int = 12  # H: heads; head size D = C / H
    intermediate_size: int = 3072  # F: width of the feed-forward layer
    max_position_embeddings: int = 514  # rows of the position table (2 are never used, see below)
    type_vocab_size: int = 1  # token-type rows; XLM-R uses only type 0
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1  # also RoBERTa's padding_idx for positions
    architecture_name: str = "XLMRobertaForSequenceClassification"  # config.json's `architectures` entry

    @property
    def architecture(self) -> Architecture:
        """What differs between XLM-R and BERT cross-encoders (architectures.py)."""
        return ARCHITECTURES[self.architecture_name]

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_tokens(self) -> int:
        # RoBERTa numbers real tokens from padding_idx + 1, so the first padding_idx + 1 rows of
        # the position table are never used by a real token; BERT numbers them from 0.
        return self.max_position_embeddings - self.architecture.position_offset(self.pad_token_id)

    @property
    def default_max_length(self) -> int:
        # 512, the length bge-reranker-base was trained at, unless the position table is shorter
        # (default_max_length() below also reads the tokenizer's model_max_length)
        return min(512, self.max_tokens)

    @classmethod
    def from_json(cls, path) -> "ModelConfig":
        path = Path(path)
        try:
            with open_regular_file(path) as f:
                raw = json.loads(f.read(MAX_CONFIG_BYTES + 1).decode("utf-8"))
        except FileNotFoundError:
            raise ModelError(f"{path}: config.json not found") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ModelError(f"{path}: not a readable JSON file ({e})") from None
        except RecursionError:  # json's parser recurses once per level of nesting
            raise ModelError(f"{path}: nested too deeply to be a model's config.json") from None
        if not isinstance(raw, dict):
            raise ModelError(f"{path}: expected a JSON object, got {type(raw).__name__}")
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict, source: str = "config") -> "ModelConfig":
        _refuse_unsupported(raw, source)
        values = {"architecture_name": _architecture(raw, source).name}
        for name, field in cls.__dataclass_fields__.items():
            if name in values:
                continue
            value = raw.get(name, field.default)
            kind = float if field.type in (float, "float") else int
            smallest = 0 if name == "pad_token_id" else 1e-12
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float) if kind is float else int)
                or value < smallest
            ):
                raise ModelError(f"{source}: {name} must be a positive {kind.__name__}, got {value!r}")
            if kind is float and not FLOAT32_TINY <= value <= FLOAT32_MAX:  # NaN fails both comparisons
                # the kernels compute in float32: 1e300 would be inf there, and inf or NaN gives NaN scores
                raise ModelError(
                    f"{source}: {name} must be a finite positive number that float32 can hold "
                    f"({FLOAT32_TINY:.3g} to {FLOAT32_MAX:.3g}), got {value!r}"
                )
            values[name] = kind(value)
        config = cls(**values)
        if config.hidden_size % config.num_attention_heads:
            raise ModelError(
                f"{source}: hidden_size {config.hidden_size} is not divisible by "
                f"num_attention_heads {config.num_attention_heads}"
            )
        if config.type_vocab_size < config.architecture.segments:
            raise ModelError(
                f"{source}: type_vocab_size {config.type_vocab_size} is too small: "
                f"{config.architecture_name} gives query and passage {config.architecture.segments} token types"
            )
        if config.max_tokens < 4:
            raise ModelError(
                f"{source}: max_position_embeddings {config.max_position_embeddings} leaves no room for a pair"
            )
        return config


# Options that change the maths. Anything but the value we implement is refused by name, so an
# unsupported checkpoint fails loudly instead of producing plausible but wrong scores.
_REQUIRED = {
    "hidden_act": "gelu",  # the exact erf GELU; "gelu_new"/"gelu_pytorch_tanh" are other functions
    "position_embedding_type": "absolute",
}


def _architecture(raw: dict, source: str) -> Architecture:
    """The Architecture config.json names (XLM-R when it names none, as older checkpoints)."""
    architectures = raw.get("architectures") or ["XLMRobertaForSequenceClassification"]
    if not isinstance(architectures, list) or len(architectures) != 1 or architectures[0] not in ARCHITECTURES:
        raise ModelError(
            f"{source}: architectures is {architectures!r}; nprerank runs "
            f"{' and '.join(sorted(set(a.name for a in ARCHITECTURES.values())))} cross-encoders only"
        )
    architecture = ARCHITECTURES[architectures[0]]
    model_type = raw.get("model_type", architecture.model_types[0])
    if model_type not in architecture.model_types:
        raise ModelError(
            f"{source}: model_type {model_type!r} does not go with {architectures[0]} "
            f"(expected {' or '.join(map(repr, architecture.model_types))})"
        )
    return architecture


def _refuse_unsupported(raw: dict, source: str) -> None:
    _architecture(raw, source)
    for name, wanted in _REQUIRED.items():
        value = raw.get(name, wanted)
        if value != wanted:
            raise ModelError(f"{source}: {name} is {value!r}; only {wanted!r} is supported")
    labels = raw.get("num_labels", len(raw.get("id2label") or {"0": "LABEL_0"}))
    if labels != 1:
        raise ModelError(f"{source}: num_labels/id2label gives {labels} labels; a reranker has exactly 1")
    if raw.get("is_decoder") or raw.get("add_cross_attention"):
        raise ModelError(f"{source}: decoder/cross-attention configs are not supported")


def default_max_length(config: ModelConfig, tokenizer_config) -> int:
    """Tokens per pair when the caller names none: min(512, the tokenizer's model_max_length, the
    positions the model can use).

    The rule, and whom it follows:
    - FlagEmbedding's FlagReranker (bge-reranker-base, -large, -v2-m3) cuts every pair to its
      `max_length` argument, 512 by default, whatever the model (BaseReranker.__init__);
      bge-reranker-v2-m3's 8192 positions are used only when asked (`max_length=8192`).
    - sentence-transformers' CrossEncoder (the ms-marco MiniLM models) with no max_length lets
      the tokenizer cut at its model_max_length from tokenizer_config.json (512 for MiniLM; 512
      for bge-reranker-base/-large, 8192 for -v2-m3), as transformers' `truncation=True` does.
    Both give 512 for all five models named in docs/models.md; the tokenizer's model_max_length
    and the position table only ever lower it. A missing or unreadable tokenizer_config.json
    (or transformers' "no limit" value, 1e30) leaves 512.
    """
    limit = min(512, config.max_tokens)
    try:
        value = json.loads(Path(tokenizer_config).read_text(encoding="utf-8")).get("model_max_length")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        return limit
    if isinstance(value, int) and not isinstance(value, bool) and value > 5:
        limit = min(limit, value)
    return limit
