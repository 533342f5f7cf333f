"""Each dialect as its own clients meet it: the real SDKs from PyPI, and each service's rules.

The `cohere` SDK (Client, ClientV2, AsyncClientV2) and the `cloudflare` SDK are pointed at a real
server process, as a user would change only the base URL; each must parse the answer into its own
types, and turn each refusal into its own exception type carrying the server's message. The
rules tests send each finding's exact input (issue 9) over HTTP and check the status and value.
The server, helpers and expected scores are tests/test_server.py's.
"""

import asyncio
import json
import time

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from test_server import (  # noqa: E402  (the fixtures are used by name)
    API_KEY,
    CF_LONG,
    CF_SHORT,
    TEXTS,
    check_cloudflare,
    check_ranking,
    check_tei,
    client,
    cloudflare_error,
    cohere_error,
    expected_scores,
    limited_server,
    reranker,
    server,
    tei_error,
)

from nprerank import Reranker, __version__  # noqa: E402
from nprerank.reranker import sigmoid  # noqa: E402
from nprerank.server import CLOUDFLARE_MODEL, Limits  # noqa: E402

_ = (client, limited_server, reranker, server)  # fixtures, imported to be found by name
JSON = {"content-type": "application/json"}


def raw_json(body) -> bytes:
    """JSON with non-ASCII escaped, so a lone surrogate goes out as the six characters \\ud800."""
    return json.dumps(body, ensure_ascii=True).encode()


# --- Cohere v2 ------------------------------------------------------------------------------


def check_cohere_v2(response, reranker, query, texts, top=None):
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"id", "results", "meta"}, body
    assert body["meta"]["api_version"]["version"] == "2"
    results = body["results"]
    assert all(set(result) == {"index", "relevance_score"} for result in results), results
    check_ranking(
        [r["index"] for r in results],
        [r["relevance_score"] for r in results],
        expected_scores(reranker, query, texts),
        top,
    )


def test_cohere_v2(client, reranker):
    query = "which one is cooler?"
    body = {"model": "rerank-v3.5", "query": query, "documents": TEXTS}
    check_cohere_v2(client.post("/v2/rerank", json=body), reranker, query, TEXTS)
    check_cohere_v2(client.post("/v2/rerank", json={**body, "top_n": 3}), reranker, query, TEXTS, top=3)
    # max_tokens_per_doc larger than any document here changes nothing
    check_cohere_v2(client.post("/v2/rerank", json={**body, "max_tokens_per_doc": 4096}), reranker, query, TEXTS)


NEEDS_ENCODE = pytest.mark.skipif(
    not hasattr(Reranker, "encode"), reason="needs Reranker.encode (library-api's side of INTERFACES.md)"
)


@NEEDS_ENCODE
def test_cohere_v2_max_tokens_per_doc_cuts_each_document(client, reranker):
    query, cut = "which one is cooler?", 3
    response = client.post(
        "/v2/rerank", json={"model": "m", "query": query, "documents": TEXTS, "max_tokens_per_doc": cut}
    )
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    expected = sigmoid(reranker.logits([(query, t) for t in TEXTS], passage_max_length=cut))
    check_ranking([r["index"] for r in results], [r["relevance_score"] for r in results], expected)
    assert np.abs(expected - expected_scores(reranker, query, TEXTS)).max() > 1e-3, "the cut changed nothing"


@pytest.mark.parametrize(
    "body, words",
    [
        ({"query": "q", "documents": ["a"]}, ["model", "required"]),
        ({"model": 3, "query": "q", "documents": ["a"]}, ["model", "string"]),
        ({"model": "m", "query": "q", "documents": [{"text": "a"}]}, ["documents[0]", "string"]),
        ({"model": "m", "query": "q", "documents": ["a"], "max_tokens_per_doc": 0}, ["max_tokens_per_doc", ">= 1"]),
        ({"model": "m", "query": "q", "documents": ["a"], "top_n": "2"}, ["top_n", ">= 1"]),
        ({"model": "m", "query": "", "documents": ["a"]}, ["query", "empty"]),
    ],
)
def test_cohere_v2_refuses(client, reranker, body, words):
    cohere_error(client.post("/v2/rerank", json=body), 400, *words)


# --- the SDKs -------------------------------------------------------------------------------

cohere = pytest.importorskip("cohere")


def test_cohere_sdk_v2(server, reranker):
    """cohere.ClientV2 pointed at the server: LangChain's, LlamaIndex's and Haystack's Cohere rerankers call this."""
    co = cohere.ClientV2(api_key="any", base_url=server.url, max_retries=0)
    query = "which one is cooler?"
    answer = co.rerank(model="rerank-v3.5", query=query, documents=TEXTS, top_n=4)
    assert answer.meta.api_version.version == "2"
    check_ranking(
        [r.index for r in answer.results],
        [r.relevance_score for r in answer.results],
        expected_scores(reranker, query, TEXTS),
        top=4,
    )
    with pytest.raises(cohere.BadRequestError) as refused:
        co.rerank(model="rerank-v3.5", query=query, documents=["fine", " "])
    assert refused.value.status_code == 400 and "documents[1] is blank" in refused.value.body["message"]


def test_cohere_sdk_v1(server, reranker):
    co = cohere.Client(api_key="any", base_url=server.url, max_retries=0)
    query = "which one is cooler?"
    answer = co.rerank(model="rerank-english-v3.0", query=query, documents=TEXTS, top_n=3, return_documents=True)
    check_ranking(
        [r.index for r in answer.results],
        [r.relevance_score for r in answer.results],
        expected_scores(reranker, query, TEXTS),
        top=3,
    )
    assert [r.document.text for r in answer.results] == [TEXTS[r.index] for r in answer.results]
    with pytest.raises(cohere.BadRequestError) as refused:
        co.rerank(model="rerank-english-v3.0", query="", documents=TEXTS)
    assert "query must not be empty" in refused.value.body["message"]


def test_cohere_sdk_async_v2_and_its_errors(server, limited_server, reranker):
    """AsyncClientV2, and the exception type each refusal becomes: 422 (too many documents), 401."""

    async def calls():
        good = cohere.AsyncClientV2(api_key="any", base_url=server.url, max_retries=0)
        answer = await good.rerank(model="m", query="q", documents=TEXTS[:5])
        check_ranking(
            [r.index for r in answer.results],
            [r.relevance_score for r in answer.results],
            expected_scores(reranker, "q", TEXTS[:5]),
        )
        too_many = Limits().max_contexts + 1
        with pytest.raises(cohere.UnprocessableEntityError) as refused:
            await good.rerank(model="m", query="q", documents=["a"] * too_many)
        assert f"documents has {too_many} items" in refused.value.body["message"]
        # the limited server's key is not ASCII, which the SDK cannot send: a wrong key it can
        wrong = cohere.AsyncClientV2(api_key="wrong", base_url=limited_server.url, max_retries=0)
        with pytest.raises(cohere.UnauthorizedError) as unauthorized:
            await wrong.rerank(model="m", query="q", documents=["a"])
        assert "invalid API key" in unauthorized.value.body["message"]

    asyncio.run(calls())


cloudflare = pytest.importorskip("cloudflare")


def test_cloudflare_sdk(server, reranker):
    """The cloudflare SDK percent-encodes the model into the path (@cf%2Fbaai%2Fbge-reranker-base)."""
    cf = cloudflare.Cloudflare(api_token="any", base_url=server.url + "/client/v4", max_retries=0)
    query = "Which one is better?"
    result = cf.ai.run(
        CLOUDFLARE_MODEL,
        account_id="account",
        extra_body={"query": query, "contexts": [{"text": t} for t in TEXTS], "top_k": 5},
    )
    hits = result["response"]
    check_ranking([h["id"] for h in hits], [h["score"] for h in hits], expected_scores(reranker, query, TEXTS), top=5)
    with pytest.raises(cloudflare.BadRequestError) as refused:
        cf.ai.run(CLOUDFLARE_MODEL, account_id="account", extra_body={"query": "", "contexts": [{"text": "a"}]})
    assert "query must not be empty" in str(refused.value)
    # the base URL without /client/v4: Cloudflare's 404 saying which base URL works
    bare = cloudflare.Cloudflare(api_token="any", base_url=server.url, max_retries=0)
    with pytest.raises(cloudflare.NotFoundError) as unrouted:
        bare.ai.run(CLOUDFLARE_MODEL, account_id="account", extra_body={"query": "q", "contexts": [{"text": "a"}]})
    assert "7003" in str(unrouted.value) and "/client/v4" in str(unrouted.value)


def test_cloudflare_sdk_wrong_token(limited_server):
    cf = cloudflare.Cloudflare(api_token="wrong", base_url=limited_server.url + "/client/v4", max_retries=0)
    with pytest.raises(cloudflare.AuthenticationError) as refused:
        cf.ai.run(CLOUDFLARE_MODEL, account_id="account", extra_body={"query": "q", "contexts": [{"text": "a"}]})
    assert "10000" in str(refused.value) and "invalid API key" in str(refused.value)


def test_cloudflare_percent_encoded_model_path(client, reranker):
    path = "/client/v4/accounts/acc/ai/run/@cf%2Fbaai%2Fbge-reranker-base"
    check_cloudflare(
        client.post(path, json={"query": "q", "contexts": [{"text": "a"}, {"text": "b"}]}), reranker, "q", ["a", "b"]
    )


# --- Jina: the clients read `detail` --------------------------------------------------------


def test_jina_style_errors_carry_detail(client):
    """LlamaIndex JinaRerank, Haystack JinaRanker and LangChain JinaRerank raise from response.json()["detail"]."""
    for body, status in (
        ({"query": "q", "documents": []}, 400),
        ({"query": "q", "documents": ["a"] * 5000}, 422),
        ({"query": 1, "documents": ["a"]}, 400),
    ):
        response = client.post("/v1/rerank", json={"model": "jina-reranker-v2-base-multilingual", **body})
        assert response.status_code == status and response.json()["detail"], response.text


# --- TEI as TEI is today --------------------------------------------------------------------


def test_tei_empty_query_or_text_is_scored(client, reranker):
    """TEI refuses a pair only when both sides are empty (core/src/tokenization.rs)."""
    check_tei(client.post("/rerank", json={"query": "q", "texts": ["", "a"]}), reranker, "q", ["", "a"])
    check_tei(client.post("/rerank", json={"query": "", "texts": ["a", "b c"]}), reranker, "", ["a", "b c"])
    check_tei(
        client.post("/rerank", json={"query": "", "texts": ["a"], "raw_scores": True}), reranker, "", ["a"], raw=True
    )
    tei_error(
        client.post("/rerank", json={"query": "", "texts": ["a", ""]}), 413, "`inputs` cannot be empty", "texts[1]"
    )
    # the other dialects keep their services' minLength 1
    cloudflare_error(client.post(CF_SHORT, json={"query": "q", "contexts": [{"text": ""}]}), 400, "empty")
    cohere_error(client.post("/v1/rerank", json={"query": "q", "documents": [""]}), 400, "empty")


def test_tei_long_input_without_truncate_is_cut(client, reranker):
    """LlamaIndex's TextEmbeddingInference reranker never sends `truncate`: TEI >= 1.9 cuts, and so do we."""
    query, texts = "what is panda?", [" ".join(TEXTS * 20), TEXTS[2]]
    check_tei(client.post("/rerank", json={"query": query, "texts": texts}), reranker, query, texts)


@NEEDS_ENCODE
def test_tei_cuts_longest_first_as_tei_does(client, reranker, tiny_model):
    """Issue 9's case: TEI keeps 121 query tokens of "panda " * 150 against "hi" on a 128-token model
    (transformers' longest_first), where FlagEmbedding's only_second keeps 96; the logit is the model's on them."""
    from transformers import AutoTokenizer
    from test_parity import TOLERANCE as PARITY_TOLERANCE, transformers_logits

    query, texts = "panda " * 150, ["hi"]
    max_length = reranker.tokenizer.max_length
    ids = AutoTokenizer.from_pretrained(str(tiny_model))(
        query, texts[0], truncation="longest_first", max_length=max_length
    )["input_ids"]
    assert max_length == 128 and ids.index(2) - 1 == 121  # <s> then the 121 query tokens kept, then </s>
    expected = transformers_logits(tiny_model, [ids])[0]
    cut_only_second = reranker.logits([(query, texts[0])])[0]  # the server's default for the other routes
    for path in ("/rerank", "/", "/invocations"):
        response = client.post(path, json={"query": query, "texts": texts, "truncate": True, "raw_scores": True})
        assert response.status_code == 200, response.text
        logit = response.json()[0]["score"]
        assert abs(logit - expected) <= PARITY_TOLERANCE, f"server {logit}, transformers longest_first {expected}"
    assert abs(cut_only_second - expected) > 10 * PARITY_TOLERANCE, "the case no longer tells the two cuts apart"


@pytest.mark.parametrize("path", ["/", "/invocations"])
def test_tei_deployment_routes_rerank(client, reranker, path):
    """POST / and POST /invocations rerank on a reranker, as TEI answers on Inference Endpoints and SageMaker."""
    query = "what is panda?"
    check_tei(
        client.post(path, json={"query": query, "texts": TEXTS, "return_text": True}),
        reranker,
        query,
        TEXTS,
        return_text=True,
    )
    tei_error(client.post(path, json={"query": "q", "texts": []}), 400, "empty", error_type="empty")


def test_tei_probes(client, reranker):
    for path in ("/ping", "/", "/health"):
        assert client.get(path).status_code == 200, path
    info = client.get("/info").json()
    limits = Limits()
    assert info["model_type"] == {"reranker": {"id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}}
    assert info["max_input_length"] == reranker.tokenizer.max_length
    assert info["max_client_batch_size"] == limits.max_contexts and info["max_batch_tokens"] == limits.batch_tokens
    assert info["auto_truncate"] is True and info["version"] == __version__ and info["model_id"]


def test_tei_info_needs_the_key_and_probes_do_not(limited_server):
    url = limited_server.url
    tei_error(httpx.get(url + "/info", timeout=30), 401, "missing API key", error_type="unauthorized")
    assert (
        httpx.get(url + "/info", headers={"Authorization": f"Bearer {API_KEY}".encode()}, timeout=30).json()[
            "auto_truncate"
        ]
        is False
    )  # the limited server runs with --no-auto-truncate
    for path in ("/ping", "/"):
        assert httpx.get(url + path, timeout=30).status_code == 200


# --- Cohere's validation --------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/v1/rerank", "/v2/rerank"])
@pytest.mark.parametrize("blank", [" ", "\n\t ", "\u3000", "\u00a0"])
def test_cohere_refuses_blank_text(client, path, blank):
    cohere_error(
        client.post(path, json={"model": "m", "query": "q", "documents": ["a", blank]}), 400, "documents[1]", "blank"
    )
    cohere_error(client.post(path, json={"model": "m", "query": blank, "documents": ["a"]}), 400, "query", "blank")


# --- text that is not valid Unicode ---------------------------------------------------------

SURROGATE = "\ud800"  # valid JSON ("\ud800"), but no text: UTF-8 cannot encode it

# (path, body, the field named) for every field of every dialect that carries text
SURROGATE_CASES = [
    ("/rerank", {"query": "q", "texts": [SURROGATE]}, "texts[0]"),
    ("/rerank", {"query": "a" + SURROGATE, "texts": ["a"]}, "query"),
    ("/invocations", {"query": "q", "texts": ["a", "b\udfff"]}, "texts[1]"),
    (CF_SHORT, {"query": SURROGATE, "contexts": [{"text": "a"}]}, "query"),
    (CF_LONG, {"query": "q", "contexts": [{"text": "a"}, {"text": SURROGATE}]}, "contexts[1].text"),
    ("/v1/rerank", {"query": SURROGATE, "documents": ["a"]}, "query"),
    ("/v1/rerank", {"query": "q", "documents": [SURROGATE]}, "documents[0]"),
    ("/v1/rerank", {"query": "q", "documents": [{"text": SURROGATE}]}, "documents[0].text"),
    ("/v1/rerank", {"model": SURROGATE, "query": "q", "documents": ["a"]}, "model"),
    ("/v2/rerank", {"model": "m", "query": SURROGATE, "documents": ["a"]}, "query"),
    ("/v2/rerank", {"model": "m", "query": "q", "documents": ["a", SURROGATE]}, "documents[1]"),
    ("/v2/rerank", {"model": SURROGATE, "query": "q", "documents": ["a"]}, "model"),
]


@pytest.mark.parametrize("path, body, field", SURROGATE_CASES)
def test_lone_surrogates_are_bad_input(client, reranker, path, body, field):
    response = client.post(path, content=raw_json(body), headers=JSON)
    words = (field, "not valid Unicode", "surrogate")
    if path in (CF_SHORT, CF_LONG):
        cloudflare_error(response, 400, *words)
    elif path.startswith("/v"):
        cohere_error(response, 400, *words)
    else:
        tei_error(response, 422, *words)
    check_tei(client.post("/rerank", json={"query": "still", "texts": ["here"]}), reranker, "still", ["here"])


def test_lone_surrogate_in_an_ignored_field_is_harmless(client, reranker):
    body = raw_json({"query": "q", "texts": ["a"], SURROGATE: SURROGATE, "user": SURROGATE})
    check_tei(client.post("/rerank", content=body, headers=JSON), reranker, "q", ["a"])


def test_openapi_has_both_cohere_versions(client):
    paths = client.get("/openapi.json").json()["paths"]
    v2 = paths["/v2/rerank"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert v2["required"] == ["model", "query", "documents"] and "max_tokens_per_doc" in v2["properties"]
    assert "/v1/rerank" in paths and "/info" in paths and paths["/"].keys() == {"get", "post"}


# --- Cohere v1's rank_fields ----------------------------------------------------------------


@pytest.mark.parametrize("fields", [["title"], ["title", "text"], ["text", "author"], [], "text"])
def test_cohere_v1_refuses_rank_fields_it_cannot_follow(client, fields):
    """Cohere ranks on the keys rank_fields names: scoring `text` instead would be silently wrong."""
    documents = [{"title": "a cat", "text": "a dog"}, {"title": "a bird", "text": "a fish"}]
    cohere_error(
        client.post("/v1/rerank", json={"query": "cat", "documents": documents, "rank_fields": fields}),
        400,
        "rank_fields",
        "text",
    )


def test_cohere_v1_rank_fields_text_is_the_default(client, reranker):
    documents = [{"title": "a cat", "text": "a dog"}, {"title": "a bird", "text": "a fish"}]
    for fields in (["text"], None):
        response = client.post("/v1/rerank", json={"query": "cat", "documents": documents, "rank_fields": fields})
        assert response.status_code == 200, response.text
        results = response.json()["results"]
        check_ranking(
            [r["index"] for r in results],
            [r["relevance_score"] for r in results],
            expected_scores(reranker, "cat", ["a dog", "a fish"]),
        )


def test_cohere_sdk_v1_rank_fields_refused(server):
    co = cohere.Client(api_key="any", base_url=server.url, max_retries=0)
    with pytest.raises(cohere.BadRequestError) as refused:
        co.rerank(model="m", query="cat", documents=[{"title": "a cat", "text": "a dog"}], rank_fields=["title"])
    assert "rank_fields" in refused.value.body["message"]


@pytest.mark.parametrize("precision,dtype", [("fp32", "float32"), ("int8", "int8"), ("bf16", "bfloat16")])
def test_tei_info_names_the_precision_served(tiny_model, precision, dtype):
    """GET /info's model_dtype says what the encoder runs at (TEI's name where it has one), not
    float32 whatever --precision was; scores come from that precision too."""
    from starlette.testclient import TestClient

    from nprerank.server import build_app

    reranker = Reranker.from_pretrained(tiny_model, precision=precision)
    with TestClient(build_app(reranker), base_url="http://127.0.0.1") as client:
        deadline = time.monotonic() + 300  # the warm-up runs in the model thread first
        while client.get("/health").json()["status"] != "ready" and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.get("/info").json()["model_dtype"] == dtype
        [best, *_] = client.post("/rerank", json={"query": "q", "texts": ["a", "b c"]}).json()
        assert best["score"] == pytest.approx(
            float(np.max(reranker.compute_score([["q", "a"], ["q", "b c"]], normalize=True)))
        )
