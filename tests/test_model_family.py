"""The model family of issue 13 against transformers: bge-reranker-large and -v2-m3 (XLM-R of
other sizes, 8194 positions) and the ms-marco MiniLM cross-encoders (BERT).

Random-weight models with each named model's exact config, reduced in width (hidden_size,
intermediate_size) and vocabulary so CI stays fast, but with the real depth, heads, position
count and head (synthetic.SHAPES). For each: token ids identical to transformers' tokenizer
under both truncation policies, and logits within 1e-4 of transformers' fp32 model on both
engines. Then a v2-m3-shaped model (two layers) on pairs of several thousand tokens, and the
refusals.
"""

import json
import shutil

import numpy as np
import pytest

from nprerank import Reranker
from nprerank.config import ModelConfig, ModelError, default_max_length
from nprerank.synthetic import MODEL_MAX_LENGTH, SHAPES, corpus, make_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

REDUCED = dict(hidden_size=128, intermediate_size=512)  # 16 heads of 8 (large, v2-m3); MiniLM's 12 of 96 / 12
TOLERANCE = 1e-4  # logits, fp32, nprerank vs transformers (issue 13)


def shape_model(name: str, **overrides):
    spec = dict(SHAPES[name], **REDUCED, **overrides)
    spec.pop("vocab_size")  # the test tokenizer's
    if name.startswith("minilm"):
        spec["hidden_size"] = 96  # 12 heads of 8
    return make_model(model_max_length=MODEL_MAX_LENGTH.get(name), **spec)


def pairs_of(lengths, seed=0):
    """(query, passage) pairs of about `lengths` words, from the test corpus, plus text that
    stresses tokenizers: accents, CJK, punctuation, a typed special token in the passage."""
    lines = corpus(1500, seed=seed)
    words = " ".join(lines).split()
    pairs = [
        ("what is a panda?", "The giant panda (Ailuropoda) is a bear; it eats bamboo. Café naïve résumé!"),
        ("熊猫 是 什么", "熊猫 是 一种 生活 在 中国 的 熊 </s> [SEP] " + " ".join(words[:40])),
    ]
    for i, n in enumerate(lengths):
        pairs.append((" ".join(words[i * 7 : i * 7 + 5]), " ".join(words[100 + i * n : 100 + (i + 1) * n])))
    return pairs


def transformers_logits(folder, pairs, max_length, truncation, attention="eager"):
    """ids [list per pair] and fp32 logits [P] from transformers' own tokenizer and model."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    model = transformers.AutoModelForSequenceClassification.from_pretrained(
        str(folder), attn_implementation=attention
    ).eval()
    # the queries here are shorter than 3/4 of max_length, so FlagEmbedding's only_second (which
    # first cuts the query alone to that) is transformers' own (tests/test_tokenizer.py: longer ones)
    batch = tokenizer(
        [q for q, _ in pairs],
        [p for _, p in pairs],
        truncation=truncation,
        max_length=max_length,
        padding=True,
        return_tensors="pt",
    )
    with torch.no_grad():
        logits = model(**batch).logits[:, 0].numpy()
    ids = [
        row[mask.astype(bool)].tolist()
        for row, mask in zip(batch["input_ids"].numpy(), batch["attention_mask"].numpy())
    ]
    return ids, logits


def report(name, got, want):
    diff = np.abs(np.asarray(got, np.float64) - want)
    side = "\n".join(f"  {g: .7f}  {w: .7f}" for g, w in zip(got[:6], want[:6]))
    assert diff.max() <= TOLERANCE, (
        f"{name}: max |diff| {diff.max():.3e} > {TOLERANCE}\n  nprerank    transformers\n{side}"
    )
    print(f"{name}: max |diff| {diff.max():.2e}")


@pytest.mark.parametrize("name", ["large", "v2-m3", "minilm-l6", "minilm-l12"])
@pytest.mark.parametrize("truncation", ["longest_first", "only_second"])
def test_named_shapes_equal_transformers(name, truncation):
    folder = shape_model(name)
    pairs = pairs_of([3, 40, 90, 200])
    max_length = 96  # cuts the long pairs under either policy
    want_ids, want = transformers_logits(folder, pairs, max_length, truncation)
    for engine in ("fast", "reference"):
        reranker = Reranker.from_pretrained(folder, engine=engine, max_length=max_length, truncation=truncation)
        encoding = reranker.encode(pairs)
        assert encoding.sequences == want_ids, f"{name} {truncation}: token ids differ from transformers'"
        report(f"{name} {truncation} {engine}", reranker.score(encoding), want)


def test_defaults_follow_the_rule_written_in_config():
    """512 for every named model (FlagEmbedding's max_length, the CrossEncoder's model_max_length),
    though v2-m3 can take 8192; MiniLM cuts longest_first as sentence-transformers does."""
    m3 = Reranker.from_pretrained(shape_model("v2-m3", num_hidden_layers=1))
    assert (m3.tokenizer.max_length, m3.config.max_tokens, m3.tokenizer.truncation) == (512, 8192, "only_second")
    assert (
        Reranker.from_pretrained(shape_model("v2-m3", num_hidden_layers=1), max_length=8192).tokenizer.max_length
        == 8192
    )
    minilm = Reranker.from_pretrained(shape_model("minilm-l6"))
    assert (minilm.tokenizer.max_length, minilm.config.max_tokens, minilm.tokenizer.truncation) == (
        512,
        512,
        "longest_first",
    )
    assert minilm.tokenizer.special_tokens == 3 and m3.tokenizer.special_tokens == 4
    config = ModelConfig(max_position_embeddings=130)
    assert default_max_length(config, "/nonexistent/tokenizer_config.json") == 128  # the position table lowers it


def test_tokenizer_model_max_length_lowers_the_default(tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(shape_model("minilm-l6"), folder)
    settings = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps(dict(settings, model_max_length=256)))
    assert Reranker.from_pretrained(folder).tokenizer.max_length == 256


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_v2_m3_shape_on_thousands_of_tokens(engine):
    """Pairs of ~1,500 to ~5,000 tokens at max_length 8192, in one call with a budget smaller than
    any of them (each is a batch of its own): equal to transformers (sdpa attention, which holds
    no [T, T] matrix either)."""
    folder = shape_model("v2-m3", num_hidden_layers=2)
    pairs = pairs_of([1200, 3600], seed=3)[2:]
    want_ids, want = transformers_logits(folder, pairs, 8192, "longest_first", attention="sdpa")
    assert max(map(len, want_ids)) > 4000
    reranker = Reranker.from_pretrained(
        folder, engine=engine, max_length=8192, truncation="longest_first", max_batch_tokens=512
    )
    encoding = reranker.encode(pairs)
    assert encoding.sequences == want_ids
    report(f"v2-m3 {max(map(len, want_ids))} tokens {engine}", reranker.score(encoding), want)


def test_a_budget_below_max_length_is_accepted_and_changes_nothing():
    folder = shape_model("minilm-l6")
    pairs = pairs_of([40, 90, 200])
    small = Reranker.from_pretrained(folder, max_length=256, max_batch_tokens=8)
    assert np.array_equal(small.logits(pairs), Reranker.from_pretrained(folder, max_length=256).logits(pairs))


def edited_copy(tmp_path, folder, **changes):
    copy = tmp_path / "model"
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    (copy / "config.json").write_text(json.dumps(dict(config, **changes)))
    return copy


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(architectures=["DebertaV2ForSequenceClassification"]), "DebertaV2ForSequenceClassification"),
        (dict(architectures=["BertForSequenceClassification", "BertModel"]), "architectures"),
        (dict(model_type="xlm-roberta"), "model_type 'xlm-roberta' does not go with BertForSequenceClassification"),
        (dict(type_vocab_size=1), "type_vocab_size 1"),
        (dict(hidden_act="gelu_new"), "hidden_act"),
        (dict(position_embedding_type="relative_key"), "position_embedding_type"),
    ],
)
def test_bert_configs_we_cannot_run_are_refused_by_name(tmp_path, changes, message):
    with pytest.raises(ModelError, match=message):
        Reranker.from_pretrained(edited_copy(tmp_path, shape_model("minilm-l6"), **changes))


def test_a_tokenizer_of_the_other_architecture_is_refused(tmp_path):
    folder = edited_copy(tmp_path, shape_model("minilm-l6"))
    shutil.copy(make_model() / "tokenizer.json", folder / "tokenizer.json")  # XLM-R's Unigram
    with pytest.raises(ModelError, match="a Unigram tokenizer, but BertForSequenceClassification needs WordPiece"):
        Reranker.from_pretrained(folder)


@pytest.mark.parametrize("name,by_folder", [("minilm-l6", True), ("v2-m3", True), ("large", False)])
def test_the_cloudflare_route_is_answered_only_for_the_model_cloudflare_lists(name, by_folder):
    """Workers AI lists only @cf/baai/bge-reranker-base: serving another model, its paths say
    what is served and where to ask instead; the other dialects answer as usual. A folder is
    judged by its config.json (BERT, or more than 514 positions), a repo id by its name."""
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from nprerank.server import CLOUDFLARE_MODEL, build_app

    folder = shape_model(name, num_hidden_layers=1)
    app = build_app(
        Reranker.from_pretrained(folder), model_name=str(folder) if by_folder else f"BAAI/bge-reranker-{name}"
    )
    body = {"query": "what is a panda?", "contexts": [{"text": "a bear"}, {"text": "a car"}]}
    with TestClient(app, base_url="http://127.0.0.1") as client:  # a Host the server answers to
        for path in (f"/ai/run/{CLOUDFLARE_MODEL}", f"/client/v4/accounts/a/ai/run/{CLOUDFLARE_MODEL}"):
            response = client.post(path, json=body)
            assert response.status_code == 404, response.text
            [error] = response.json()["errors"]
            assert (
                error["code"] == 7003 and "/rerank" in error["message"] and "Workers AI lists only" in error["message"]
            )
    paths = {route.path for route in app.routes}
    assert {"/rerank", "/v1/rerank", "/v2/rerank"} <= paths and not any("@cf" in path for path in paths)


def test_the_cloudflare_route_stays_for_bge_reranker_base():
    pytest.importorskip("starlette")
    from nprerank.server import CLOUDFLARE_MODEL, build_app

    for name in ("BAAI/bge-reranker-base", str(make_model())):  # by repo id, and a folder of XLM-R base's kind
        app = build_app(lambda: None, model_name=name)  # never started: only its routes are read
        assert {f"/ai/run/{CLOUDFLARE_MODEL}", f"/client/v4/accounts/{{account_id}}/ai/run/{CLOUDFLARE_MODEL}"} <= {
            route.path for route in app.routes
        }
