"""Random-weight models in bge-reranker-base's format, for tests and benchmarks.

The real checkpoint cannot be fetched everywhere, so the tests and `nprerank bench --random` make
their own: transformers' `XLMRobertaForSequenceClassification` with seeded random weights, saved
with `save_pretrained` (config.json + model.safetensors, exactly the files the real model ships),
and an XLM-R-style tokenizer.json made offline by training a small sentencepiece Unigram model
(nmt_nfkc normalisation, like XLM-R's) and letting transformers' XLMRobertaTokenizer convert it.

Every output is deterministic for its arguments and cached outside the repository
($NPRERANK_CACHE, default ~/.cache/nprerank), so a second run costs nothing.

Needs the `test` or `bench` extra (torch, transformers, sentencepiece); nothing at run time
imports this module.
"""

import hashlib
import json
import os
import random
import shutil
from pathlib import Path

from .layout import cache_dir

GENERATOR_VERSION = 2  # bump when the recipe changes, so caches are rebuilt

# The full bge-reranker-base shape (REFERENCE.md): 278M parameters.
BGE_RERANKER_BASE = dict(
    vocab_size=250002,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    max_position_embeddings=514,
)

_WORDS = {
    "latin": "the a panda bear species endemic to china giant bamboo eats lives mountains forest query passage "
    "what is how why cyberpunk lizard cat car cooler better search engine ranking relevant document model "
    "transformer attention layer token vector score river bank money city night rain music apple orange "
    "café naïve résumé façade über straße Ærø cœur".split(),
    "cjk": "熊猫 是 一种 生活 在 中国 的 熊 竹子 山 森林 搜索 引擎 文档 相关 東京 日本語 の 猫 です 한국어 고양이".split(),
    "arabic": "الباندا حيوان يعيش في الصين ويأكل الخيزران البحث عن المستندات ذات الصلة مرحبا".split(),
    "other": "Привет мир панда медведь γεια σου κόσμε नमस्ते दुनिया 🐼 🐱 🚀 ① ｆｕｌｌｗｉｄｔｈ ﬁ".split(),
}


def _key(**spec) -> str:
    blob = json.dumps({"version": GENERATOR_VERSION, **spec}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def corpus(lines: int = 6000, seed: int = 0) -> list:
    """A deterministic multilingual training text for the test tokenizer."""
    rng = random.Random(seed)
    syllables = "ka ri to na me su lo pe an ing tion er re de qu ba zo ch st ou ly ex".split()
    scripts = list(_WORDS.values())
    out = []
    for _ in range(lines):
        words = rng.choice(scripts)
        line = []
        for _ in range(rng.randint(3, 20)):
            roll = rng.random()
            if roll < 0.6:
                line.append(rng.choice(words))
            elif roll < 0.85:  # made-up Latin words, so the vocabulary has subwords to learn
                line.append("".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))))
            else:  # common CJK characters
                line.append("".join(chr(0x4E00 + rng.randrange(300)) for _ in range(rng.randint(1, 3))))
        out.append(" ".join(line))
    return out


def make_tokenizer(vocab_size: int = 800) -> Path:
    """A folder holding an XLM-R-style tokenizer.json (and its sentencepiece model)."""
    folder = cache_dir() / f"tokenizer-{_key(vocab_size=vocab_size)}"
    if (folder / "tokenizer.json").exists():
        return folder
    import sentencepiece as spm
    from transformers import XLMRobertaTokenizer

    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "corpus.txt").write_text("\n".join(corpus()), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(tmp / "corpus.txt"),
        model_prefix=str(tmp / "sentencepiece.bpe"),
        model_type="unigram",
        vocab_size=vocab_size,
        normalization_rule_name="nmt_nfkc",
        character_coverage=1.0,
        num_threads=1,  # one thread: training is then deterministic
        minloglevel=2,
    )
    XLMRobertaTokenizer.from_pretrained(str(tmp)).save_pretrained(str(tmp))
    os.replace(tmp, folder) if not folder.exists() else shutil.rmtree(tmp)
    return folder


def make_model(seed: int = 0, dtype: str = "float32", tokenizer_vocab: int = 800, outliers: int = 0, **config) -> Path:
    """A folder with config.json, model.safetensors and tokenizer.json of a random reranker.

    `config` overrides XLMRobertaConfig fields (tiny defaults; pass **BGE_RERANKER_BASE for the
    full size). Weights are drawn so that every parameter matters: biases and LayerNorm scales are
    random too, and the head is calibrated so that logits spread like a trained model's.

    outliers: that many hidden dimensions get LayerNorm scales and shifts 20-50x larger in every
    LayerNorm, so the residual stream carries a few huge features in every token, as LLM.int8()
    (Dettmers et al. 2022) found in trained transformers: the hard case for int8 activations.
    """
    spec = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                max_position_embeddings=130, vocab_size=tokenizer_vocab + 2, layer_norm_eps=1e-5,
                initializer_range=0.1)
    spec.update(config)
    extra = {"outliers": outliers} if outliers else {}  # keeps the older models' names
    folder = cache_dir() / f"model-{_key(seed=seed, dtype=dtype, tokenizer_vocab=tokenizer_vocab, **spec, **extra)}"
    if (folder / "model.safetensors").exists():
        return folder
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

    tokenizer = make_tokenizer(tokenizer_vocab)
    torch.manual_seed(seed)
    model = XLMRobertaForSequenceClassification(
        XLMRobertaConfig(num_labels=1, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2, **spec)
    ).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "LayerNorm.weight" in name:
                parameter.copy_(1.0 + 0.1 * torch.randn_like(parameter))
            elif name.endswith("bias"):
                parameter.copy_(0.05 * torch.randn_like(parameter))
        if outliers:
            dims = torch.randperm(spec["hidden_size"])[:outliers]
            scales = 20 + 30 * torch.rand(outliers)  # 20-50x
            for name, parameter in model.named_parameters():
                if "LayerNorm" in name:
                    parameter[dims] *= scales
        _calibrate_head(model, tokenizer)
    model = model.to(getattr(torch, dtype))

    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "sentencepiece.bpe.model"):
        if (tokenizer / name).exists():
            shutil.copy(tokenizer / name, tmp / name)
    os.replace(tmp, folder) if not folder.exists() else shutil.rmtree(tmp)
    return folder


def _calibrate_head(model, tokenizer_folder: Path) -> None:
    """Shift and scale the last layer so that logits on sample pairs have mean 0 and spread 2.

    Random encoders give every pair nearly the same logit; this makes rankings and sigmoid
    scores of a random model as varied as a trained model's, so tests of them can fail.
    """
    from transformers import AutoTokenizer

    texts = corpus(16, seed=1)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_folder))
    max_length = min(64, model.config.max_position_embeddings - model.config.pad_token_id - 1)
    batch = tokenizer(texts[:8], texts[8:], truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    logits = model(**batch).logits[:, 0]
    head = model.classifier.out_proj
    head.weight.mul_(2.0 / (logits.std() + 1e-6))
    head.bias.sub_(model(**batch).logits[:, 0].mean())
