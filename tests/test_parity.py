"""Logits must equal transformers' XLMRobertaForSequenceClassification (eager, fp32) to 1e-4.

Both engines run: "reference" (reference.py, plain NumPy) and "fast" (model.py, the Numba path).
The models are random (synthetic.py) but in bge-reranker-base's exact format, so the same
loading, tokenizing and scoring code runs as on the real checkpoint.
"""

import numpy as np
import pytest
import torch
from transformers import XLMRobertaForSequenceClassification

from cases import PAIRS
from nprerank import Reranker
from nprerank.reference import pad

TOLERANCE = 1e-4  # model vs transformers, fp32, absolute on logits


def transformers_logits(folder, sequences, pad_token_id=1):
    model = XLMRobertaForSequenceClassification.from_pretrained(str(folder), attn_implementation="eager").eval()
    input_ids, attention_mask = (torch.from_numpy(a) for a in pad(sequences, pad_token_id))
    with torch.inference_mode():
        return model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].numpy()


def assert_close(ours, theirs, pairs, tolerance=TOLERANCE):
    ours, theirs = np.asarray(ours, dtype=np.float64), np.asarray(theirs, dtype=np.float64)
    diff = np.abs(ours - theirs)
    worst = int(diff.argmax())
    report = (
        f"max |diff| {diff.max():.3g} at pair {worst} {pairs[worst][0][:30]!r} / {pairs[worst][1][:30]!r}\n"
        f"  ours         {np.round(ours[:6], 6)}\n  transformers {np.round(theirs[:6], 6)}"
    )
    assert diff.max() <= tolerance, report
    assert list(np.argsort(-ours, kind="stable")) == list(np.argsort(-theirs, kind="stable")), (
        "rankings differ\n" + report
    )


@pytest.mark.parametrize("engine", ["reference", "fast"])
@pytest.mark.parametrize("truncation", ["only_second", "longest_first"])
def test_tiny_models_match_transformers(tiny_models, engine, truncation):
    reranker = Reranker.from_pretrained(tiny_models, engine=engine, truncation=truncation, batch_size=5)
    sequences = reranker.tokenizer.encode_pairs(PAIRS)
    assert_close(reranker.compute_score(PAIRS), transformers_logits(tiny_models, sequences), PAIRS)


@pytest.mark.parametrize("engine", ["reference", "fast"])
def test_full_size_model_matches_transformers(full_model, engine):
    reranker = Reranker.from_pretrained(full_model, engine=engine)
    sequences = reranker.tokenizer.encode_pairs(PAIRS)
    assert max(map(len, sequences)) == 512  # the long cases fill the whole window
    assert_close(reranker.compute_score(PAIRS), transformers_logits(full_model, sequences), PAIRS)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_checkpoints_load(dtype):
    """fp16/bf16 storage is widened to fp32 at load; transformers computes in that dtype, so we
    compare with transformers on the same weights widened to fp32."""
    from nprerank.synthetic import make_model

    folder = make_model(dtype=dtype)
    reranker = Reranker.from_pretrained(folder, engine="reference")
    sequences = reranker.tokenizer.encode_pairs(PAIRS)
    model = XLMRobertaForSequenceClassification.from_pretrained(str(folder), dtype=torch.float32).eval()
    input_ids, attention_mask = (torch.from_numpy(a) for a in pad(sequences, 1))
    with torch.inference_mode():
        expected = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, 0].numpy()
    assert_close(reranker.compute_score(PAIRS), expected, PAIRS)


def test_batching_and_order_do_not_change_scores(tiny_model):
    reranker = Reranker.from_pretrained(tiny_model)
    alone = np.array([reranker.compute_score(pair)[0] for pair in PAIRS])
    together = np.array(reranker.compute_score(PAIRS, batch_size=4))
    shuffled = np.random.default_rng(0).permutation(len(PAIRS))
    reordered = np.array(reranker.compute_score([PAIRS[i] for i in shuffled], batch_size=4))
    assert np.abs(alone - together).max() < TOLERANCE  # BLAS may round differently per batch shape
    assert np.array_equal(reordered, together[shuffled])  # same inputs, same batches: bit-identical
