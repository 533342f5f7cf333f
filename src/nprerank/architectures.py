"""The two cross-encoder architectures nprerank runs, and the few places where they differ.

Everything else is one shared forward pass (reference.py, model.py): embeddings, post-LN encoder
layers, and a head of dense -> tanh -> one logit on the first token. What differs is chosen once,
from config.json's `architectures`, as an `Architecture` holding a small function per difference:

                     XLMRobertaForSequenceClassification     BertForSequenceClassification
    models           bge-reranker-base/-large/-v2-m3         cross-encoder/ms-marco-MiniLM-L-6/12-v2
    pair             <s> q </s></s> p </s>  (4 special)      [CLS] q [SEP] p [SEP]  (3 special)
    tokenizer        sentencepiece Unigram (unigram.py)      WordPiece (the `tokenizers` library)
    position ids     pad_token_id + 1, + 2, ... (RoBERTa)    0, 1, 2, ...
    usable positions max_position_embeddings - pad - 1       max_position_embeddings
    token types      all 0 (type_vocab_size 1)               0 up to the first [SEP], 1 after
    head             classifier.dense, tanh,                 bert.pooler.dense, tanh,
                     classifier.out_proj                     classifier (the same maths)
    checkpoint names roberta.*                               bert.*

Sources: transformers' modeling_xlm_roberta.py (create_position_ids_from_input_ids,
XLMRobertaClassificationHead) and modeling_bert.py (BertEmbeddings: position_ids from 0,
token_type_ids; BertPooler; BertForSequenceClassification), and the tokenizers' post-processors
(RobertaProcessing, TemplateProcessing "[CLS] $A [SEP] $B:1 [SEP]:1").

Read next: config.py (which picks one), weights.py (its checkpoint names), reference.py.
"""

from dataclasses import dataclass
from typing import Callable

import numpy as np


def roberta_position_ids(input_ids, attention_mask, pad_token_id: int):
    # RoBERTa numbers real tokens pad_token_id + 1, pad_token_id + 2, ...; pads get pad_token_id.
    # (transformers' create_position_ids_from_input_ids: a "<pad>" typed in a text is id
    # pad_token_id too, and is skipped by the count like padding)
    mask = (input_ids != pad_token_id).astype(np.int64)  # [B, T]
    return np.cumsum(mask, axis=1) * mask + pad_token_id  # [B, T]


def bert_position_ids(input_ids, attention_mask, pad_token_id: int):
    # BERT numbers every token from 0 (BertEmbeddings' position_ids buffer, arange)
    return np.broadcast_to(np.arange(input_ids.shape[1], dtype=np.int64), input_ids.shape)  # [B, T]


def single_segment(input_ids, attention_mask):
    # XLM-R has one token type, row 0 of a [1, C] table, for every token
    return np.zeros(input_ids.shape, dtype=np.int64)  # [B, T]


def two_segments(input_ids, attention_mask):
    # [CLS] q [SEP] are type 0, p [SEP] type 1 (the tokenizer's "$B:1 [SEP]:1"). The pair ends
    # with [SEP], so its id is read from each sequence's last real token: the model needs no
    # tokenizer to split a pair. (A "[SEP]" typed inside a query would end segment 0 early
    # here, where transformers, told the segments by the tokenizer, would not.)
    last = attention_mask.sum(axis=1) - 1  # [B]
    sep = input_ids[np.arange(len(input_ids)), last][:, None]  # [B, 1]
    is_sep = (input_ids == sep).astype(np.int64)  # [B, T]
    return ((np.cumsum(is_sep, axis=1) - is_sep) > 0).astype(np.int64) * attention_mask  # [B, T]


@dataclass(frozen=True)
class Architecture:
    name: str  # transformers' class, as config.json's `architectures` names it
    model_types: tuple  # config.json's `model_type` values that go with it
    prefix: str  # the encoder's checkpoint names start "<prefix>."
    head: tuple  # checkpoint names of the head's (dense, out) linears
    extras: str  # a regex of checkpoint tensors the forward pass does not use
    position_ids: Callable  # (input_ids [B, T], attention_mask [B, T], pad_token_id) -> [B, T]
    token_type_ids: Callable  # (input_ids [B, T], attention_mask [B, T]) -> [B, T]
    segments: int  # token types it uses: rows of the token-type table it needs
    tokenizer: str  # the model type of its tokenizer.json
    truncation: str  # the default policy of the library its models are used with (tokenizer.py)
    position_offset: Callable  # pad_token_id -> rows of the position table no real token uses


XLM_ROBERTA = Architecture(
    name="XLMRobertaForSequenceClassification",
    model_types=("xlm-roberta", "roberta"),
    prefix="roberta",
    head=("classifier.dense", "classifier.out_proj"),
    extras=r"roberta\.embeddings\.position_ids|roberta\.pooler\.dense\.(weight|bias)",
    position_ids=roberta_position_ids,
    token_type_ids=single_segment,
    segments=1,
    tokenizer="Unigram",
    truncation="only_second",  # FlagEmbedding's FlagReranker
    position_offset=lambda pad_token_id: pad_token_id + 1,
)

BERT = Architecture(
    name="BertForSequenceClassification",
    model_types=("bert",),
    prefix="bert",
    head=("bert.pooler.dense", "classifier"),
    extras=r"bert\.embeddings\.position_ids",
    position_ids=bert_position_ids,
    token_type_ids=two_segments,
    segments=2,
    tokenizer="WordPiece",
    truncation="longest_first",  # sentence-transformers' CrossEncoder (tokenizer truncation=True)
    position_offset=lambda pad_token_id: 0,
)

# config.json's `architectures` entry -> Architecture (RoBERTa's own class is XLM-R's maths)
ARCHITECTURES = {a.name: a for a in (XLM_ROBERTA, BERT)} | {"RobertaForSequenceClassification": XLM_ROBERTA}
