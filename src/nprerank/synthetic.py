"""Random-weight models in bge-reranker-base's format (and the other shapes of docs/models.md,
BERT's included), for tests and benchmarks.

The real checkpoint cannot be fetched everywhere, so the tests and `nprerank bench --random` make
their own: transformers' `XLMRobertaForSequenceClassification` with seeded random weights, saved
with `save_pretrained` (config.json + model.safetensors, exactly the files the real model ships),
and an XLM-R-style tokenizer.json made offline by training a small sentencepiece Unigram model
(nmt_nfkc normalisation, like XLM-R's) and letting transformers' XLMRobertaTokenizer convert it.

That test tokenizer has 800 pieces; bge-reranker-base's has 250,002, and a tokenizer's memory and
load time grow with its vocabulary. So `make_real_size_tokenizer` grows the test tokenizer to the
real size with real words: the most frequent words of the 42 languages of the `wordfreq` package,
each as a word-initial piece ("▁word") and a continuation piece ("word"), so that pieces share
their beginnings as a real vocabulary's do (random strings would not: the size of a trie depends
on that). Its sentencepiece model gets the same pieces and scores (sentencepiece's own library
then gives transformers' ids, shifted by fairseq's offset, on most texts but not all).

The BERT cross-encoders (ms-marco MiniLM) get transformers' `BertForSequenceClassification` and a
WordPiece tokenizer.json trained offline with the `tokenizers` library (make_wordpiece_tokenizer).
`SHAPES` holds each named model's config, for `nprerank bench --random-shape` and the tests.

Every output is deterministic for its arguments and cached outside the repository
($NPRERANK_CACHE, default ~/.cache/nprerank), so a second run costs nothing.

Needs the `test` or `bench` extra (torch, transformers, sentencepiece, wordfreq); nothing at run
time imports this module.
"""

import hashlib
import json
import os
import random
import shutil
import unicodedata
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
    "cjk": (
        "熊猫 是 一种 生活 在 中国 的 熊 竹子 山 森林 搜索 引擎 文档 相关 東京 日本語 の 猫 です 한국어 고양이"
    ).split(),
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


REAL_SIZE = 250002  # pieces in bge-reranker-base's tokenizer.json (<s> <pad> </s> <unk> ... <mask>)


def make_real_size_tokenizer(pieces: int = REAL_SIZE) -> Path:
    """A folder holding an XLM-R-style tokenizer.json of `pieces` pieces, and its sentencepiece model.

    The 800-piece test tokenizer, its ids unchanged, with real words added after its pieces and
    <mask> kept last (id pieces - 1, as in XLM-R). Words come round-robin by frequency rank from
    wordfreq's 42 languages, NFKC-normalised as the tokenizer's normaliser would leave them; each
    gives "▁word" and "word", scores falling slowly with rank like a trained Unigram's.
    """
    from importlib.metadata import version

    folder = cache_dir() / f"tokenizer-{_key(pieces=pieces, wordfreq=version('wordfreq'))}"
    if (folder / "tokenizer.json").exists():
        return folder
    from sentencepiece import sentencepiece_model_pb2

    base = make_tokenizer()
    document = json.loads((base / "tokenizer.json").read_text(encoding="utf-8"))
    vocab = document["model"]["vocab"]  # [[piece, score]]; the last is <mask>
    mask = vocab.pop()
    words = _frequent_words(pieces - len(vocab) - 1, known={piece for piece, _ in vocab})
    scores = [round(-9.0 - 9.0 * i / len(words), 6) for i in range(len(words))]
    vocab += [[word, score] for word, score in zip(words, scores)] + [mask]
    for token in document["added_tokens"]:
        if token["content"] == mask[0]:
            token["id"] = len(vocab) - 1

    model = sentencepiece_model_pb2.ModelProto()  # the same pieces, for sentencepiece and the slow tokenizer
    model.ParseFromString((base / "sentencepiece.bpe.model").read_bytes())
    for word, score in zip(words, scores):
        model.pieces.add(piece=word, score=score)

    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    (tmp / "tokenizer.json").write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")
    (tmp / "sentencepiece.bpe.model").write_bytes(model.SerializeToString())
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (base / name).exists():
            shutil.copy(base / name, tmp / name)
    os.replace(tmp, folder) if not folder.exists() else shutil.rmtree(tmp)
    return folder


# The named models' shapes (docs/models.md), from their config.json files; tests reduce the width
# (hidden_size and intermediate_size) and vocabulary, keeping depth, heads, positions and head.
SHAPES = {
    "base": BGE_RERANKER_BASE,
    "large": dict(
        BGE_RERANKER_BASE, hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096
    ),
    "v2-m3": dict(
        BGE_RERANKER_BASE,
        hidden_size=1024,
        num_hidden_layers=24,
        num_attention_heads=16,
        intermediate_size=4096,
        max_position_embeddings=8194,
    ),
    "minilm-l6": dict(
        architecture="bert",
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=6,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=512,
    ),
    "minilm-l12": dict(
        architecture="bert",
        vocab_size=30522,
        hidden_size=384,
        num_hidden_layers=12,
        num_attention_heads=12,
        intermediate_size=1536,
        max_position_embeddings=512,
    ),
}
MODEL_MAX_LENGTH = {"v2-m3": 8192}  # tokenizer_config.json's model_max_length where not 512


def make_wordpiece_tokenizer(vocab_size: int = 800) -> Path:
    """A folder holding a BERT-style WordPiece tokenizer.json (and vocab.txt, tokenizer_config.json),
    trained offline on corpus() with the `tokenizers` library: BertNormalizer (lowercase, accents
    stripped, CJK spaced), BertPreTokenizer, "[CLS] $A [SEP] $B:1 [SEP]:1", as the ms-marco MiniLM
    cross-encoders' tokenizer.json. Saved through transformers' BertTokenizerFast, so
    AutoTokenizer loads it as it loads theirs."""
    folder = cache_dir() / f"wordpiece-{_key(vocab_size=vocab_size)}"
    if (folder / "tokenizer.json").exists():
        return folder
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece()
    tokenizer.train_from_iterator(corpus(), trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials))
    cls, sep = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1", special_tokens=[("[CLS]", cls), ("[SEP]", sep)]
    )
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    fast = BertTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
        do_lower_case=True,
    )
    fast.save_pretrained(str(tmp))
    os.replace(tmp, folder) if not folder.exists() else shutil.rmtree(tmp)
    return folder


def _frequent_words(count: int, known: set) -> list:
    """`count` distinct pieces "▁word" and "word" from wordfreq's languages, most frequent first."""
    import wordfreq

    languages = sorted(wordfreq.available_languages("best"))
    lists = {language: wordfreq.top_n_list(language, 20000) for language in languages}
    out, seen = [], set(known)
    for rank in range(max(map(len, lists.values()))):
        for language in languages:
            if rank >= len(lists[language]):
                continue
            word = unicodedata.normalize("NFKC", lists[language][rank])
            if not word or any(c.isspace() or c == "▁" for c in word):
                continue
            for piece in ("▁" + word, word):
                if piece not in seen:
                    seen.add(piece)
                    out.append(piece)
                    if len(out) == count:
                        return out
    raise RuntimeError(f"wordfreq's lists hold fewer than {count} distinct words")


def make_model(
    seed: int = 0,
    dtype: str = "float32",
    tokenizer_vocab: int = 800,
    real_size_tokenizer: bool = False,
    architecture: str = "xlm-roberta",
    model_max_length: int | None = None,
    outliers: int = 0,
    **config,
) -> Path:
    """A folder with config.json, model.safetensors and tokenizer.json of a random reranker.

    `config` overrides XLMRobertaConfig fields (tiny defaults; pass **BGE_RERANKER_BASE for the
    full size). Weights are drawn so that every parameter matters: biases and LayerNorm scales are
    random too, and the head is calibrated so that logits spread like a trained model's.
    `real_size_tokenizer` ships `make_real_size_tokenizer()`'s 250,002 pieces instead of the test
    tokenizer's 800 (the model's vocab_size must then be 250,002: pass **BGE_RERANKER_BASE).
    `architecture="bert"` makes a BertForSequenceClassification with a WordPiece tokenizer
    (make_wordpiece_tokenizer) instead, as the ms-marco MiniLM cross-encoders. `model_max_length`
    is written into tokenizer_config.json (bge-reranker-v2-m3's is 8192).

    outliers: that many hidden dimensions get LayerNorm scales and shifts 20-50x larger in every
    LayerNorm, so the residual stream carries a few huge features in every token, as LLM.int8()
    (Dettmers et al. 2022) found in trained transformers: the hard case for int8 activations.
    """
    extra = {"outliers": outliers} if outliers else {}  # keeps the older models' names
    if architecture == "bert":
        return _make_bert_model(seed, dtype, tokenizer_vocab, model_max_length, outliers, **config)
    if model_max_length is not None:
        config["model_max_length"] = model_max_length
    spec = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=130,
        vocab_size=tokenizer_vocab + 2,
        layer_norm_eps=1e-5,
        initializer_range=0.1,
    )
    spec.update(config)
    model_max_length = spec.pop("model_max_length", None)
    tokenizer_spec = {"real_size_tokenizer": True} if real_size_tokenizer else {}  # old cache keys stay valid
    if model_max_length is not None:
        tokenizer_spec["model_max_length"] = model_max_length
    folder = (
        cache_dir()
        / f"model-{_key(seed=seed, dtype=dtype, tokenizer_vocab=tokenizer_vocab, **tokenizer_spec, **spec, **extra)}"
    )
    if (folder / "model.safetensors").exists():
        return folder
    import torch
    from transformers import XLMRobertaConfig, XLMRobertaForSequenceClassification

    tokenizer = make_real_size_tokenizer() if real_size_tokenizer else make_tokenizer(tokenizer_vocab)
    if real_size_tokenizer and spec["vocab_size"] < REAL_SIZE:
        raise ValueError(f"a real-size tokenizer needs vocab_size >= {REAL_SIZE}, got {spec['vocab_size']}")
    torch.manual_seed(seed)
    model = XLMRobertaForSequenceClassification(
        XLMRobertaConfig(num_labels=1, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2, **spec)
    ).eval()
    return _save_random(model, tokenizer, folder, dtype, model_max_length, outliers)


def _save_random(
    model, tokenizer: Path, folder: Path, dtype: str, model_max_length: int | None, outliers: int = 0
) -> Path:
    """Randomise the biases and LayerNorm scales too (so every parameter matters), give `outliers`
    hidden dimensions 20-50x larger LayerNorm parameters (make_model), calibrate the head, and save
    the model with its tokenizer's files into `folder`, atomically."""
    import torch

    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "LayerNorm.weight" in name:
                parameter.copy_(1.0 + 0.1 * torch.randn_like(parameter))
            elif name.endswith("bias"):
                parameter.copy_(0.05 * torch.randn_like(parameter))
        if outliers:
            dims = torch.randperm(model.config.hidden_size)[:outliers]
            scales = 20 + 30 * torch.rand(outliers)  # 20-50x
            for name, parameter in model.named_parameters():
                if "LayerNorm" in name:
                    parameter[dims] *= scales
        _calibrate_head(model, tokenizer)
    model = model.to(getattr(torch, dtype))
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    _copy_tokenizer(tokenizer, tmp, model_max_length)
    os.replace(tmp, folder) if not folder.exists() else shutil.rmtree(tmp)
    return folder


def _copy_tokenizer(tokenizer: Path, folder: Path, model_max_length: int | None) -> None:
    for name in (
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "sentencepiece.bpe.model",
        "vocab.txt",
    ):
        if (tokenizer / name).exists():
            shutil.copy(tokenizer / name, folder / name)
    if model_max_length is not None:
        path = folder / "tokenizer_config.json"
        settings = json.loads(path.read_text(encoding="utf-8"))
        path.write_text(json.dumps(dict(settings, model_max_length=model_max_length), indent=2), encoding="utf-8")


def _make_bert_model(
    seed: int, dtype: str, tokenizer_vocab: int, model_max_length: int | None, outliers: int = 0, **config
) -> Path:
    """make_model's BERT cross-encoder: BertForSequenceClassification (two token types, positions
    from 0, layer_norm_eps 1e-12, pooler + classifier) with a WordPiece tokenizer."""
    tokenizer = make_wordpiece_tokenizer(tokenizer_vocab)
    spec = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=128,
        type_vocab_size=2,
        layer_norm_eps=1e-12,
        initializer_range=0.1,
        pad_token_id=0,
    )
    spec.update(config)
    words = json.loads((tokenizer / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
    spec.setdefault("vocab_size", len(words))  # a reduced vocabulary: the tokenizer's (bench: MiniLM's 30,522)
    if spec["vocab_size"] < len(words):
        raise ValueError(f"vocab_size {spec['vocab_size']} is smaller than the tokenizer's {len(words)} entries")
    extra = {"outliers": outliers} if outliers else {}  # keeps the older models' names
    folder = (
        cache_dir()
        / f"bert-{_key(seed=seed, dtype=dtype, tokenizer_vocab=tokenizer_vocab, max=model_max_length, **spec, **extra)}"
    )
    if (folder / "model.safetensors").exists():
        return folder
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    model = BertForSequenceClassification(BertConfig(num_labels=1, **spec)).eval()
    return _save_random(model, tokenizer, folder, dtype, model_max_length, outliers)


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
    head = getattr(model.classifier, "out_proj", model.classifier)  # XLM-R's head, or BERT's Linear
    head.weight.mul_(2.0 / (logits.std() + 1e-6))
    head.bias.sub_(model(**batch).logits[:, 0].mean())
