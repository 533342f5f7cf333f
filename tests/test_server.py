"""The HTTP server, tested as users meet it: a real process on a loopback port, spoken to over HTTP.

One server per module runs the tiny synthetic model with default limits; a second one
(`limited_server`) adds an API key and small limits. Expected answers come from a `Reranker` in
this process on the same model folder, so every score the server sends is checked against the
library's own result for that request. Needs the `test` extra (httpx, starlette, uvicorn).
"""

import functools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from nprerank import Reranker  # noqa: E402
from nprerank.reranker import sigmoid  # noqa: E402
from nprerank.server import CLOUDFLARE_MODEL, Limits, build_app, openapi_spec  # noqa: E402

CF_SHORT = f"/ai/run/{CLOUDFLARE_MODEL}"
CF_LONG = f"/client/v4/accounts/test-account/ai/run/{CLOUDFLARE_MODEL}"
JSON = {"content-type": "application/json"}
API_KEY = "test-key-\u00e9-not-secret"  # non-ASCII on purpose: compared as bytes
# Server vs library. The server batches a request with others, so its pairs are padded to other
# lengths than in the library's own call, and float32 sums then round differently: measured up to
# 4.7e-6 in scores and 1.9e-5 in logits on the tiny model (whose head is scaled up, see
# synthetic.py), in-process, with no server involved. A mixed-up answer is off by ~1e-2.
SCORE_TOLERANCE, LOGIT_TOLERANCE = 2e-5, 1e-4

# generous: the first request may wait for the fast engine's JIT, and the machine may be busy
post = functools.partial(httpx.post, timeout=60)
get = functools.partial(httpx.get, timeout=60)

TEXTS = [
    "a cyberpunk lizzard",
    "a cyberpunk cat",
    "the giant panda lives in the mountains of china",
    "熊猫 是 一种 生活 在 中国 的 熊",
    "الباندا حيوان يعيش في الصين",
    "Привет мир панда медведь 🐼",
    "café naïve résumé façade",
    "search engine ranking relevant document",
    "river bank money city night",
    "how why what is attention layer token vector",
    "apple orange music rain",
    "über straße cœur Ærø",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess on a loopback port, with its log kept for failure messages."""

    def __init__(self, args: list, log: Path, env: dict | None = None, script: str | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        command = [sys.executable, "-c", script] if script else [sys.executable, "-m", "nprerank.server"]
        self.process = subprocess.Popen(
            [*command, *args, "--port", str(self.port), "--log-level", "warning"],
            stdout=open(log, "wb"),
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, status: int = 200, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"server exited with {self.process.returncode}:\n{self.log()}"
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == status:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.05)
        raise AssertionError(f"/health did not answer {status} within {timeout}s:\n{self.log()}")

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@pytest.fixture(scope="module")
def reranker(tiny_model) -> Reranker:
    return Reranker.from_pretrained(tiny_model)


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    running = Server(["--model", str(tiny_model)], tmp_path_factory.mktemp("server") / "log")
    running.wait()
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        yield http


LIMITED = dict(max_contexts=8, max_body_bytes=20000, queue_size=1)
LIMITED_FLAGS = ["--no-auto-truncate"]  # TEI's default before 1.9: refuse an over-long pair unless told to cut


@pytest.fixture(scope="module")
def limited_server(tiny_model, tmp_path_factory):
    """API key from the environment, and small limits, each set by its flag."""
    args = ["--model", str(tiny_model), *LIMITED_FLAGS]
    for name, value in LIMITED.items():
        args += [f"--{name.replace('_', '-')}", str(value)]
    running = Server(args, tmp_path_factory.mktemp("limited") / "log", env={"NPRERANK_API_KEY": API_KEY})
    running.wait()
    yield running
    running.stop()


# --- helpers --------------------------------------------------------------------------------


def expected_scores(reranker, query, texts) -> np.ndarray:
    return sigmoid(reranker.logits([(query, t) for t in texts]))


def check_ranking(ids: list, scores: list, expected: np.ndarray, top=None, tolerance=SCORE_TOLERANCE) -> None:
    """The answer's scores equal the library's, it is sorted best first, and it has the right length."""
    want = min(len(expected), top or len(expected))
    assert len(ids) == want, f"{len(ids)} results, expected {want}"
    assert len(set(ids)) == len(ids), f"duplicate ids {ids}"
    got = np.array(scores)
    diff = np.abs(got - expected[ids]).max()
    assert diff <= tolerance, f"max |server - library| = {diff:.2e}\nserver  {got[:4]}\nlibrary {expected[ids][:4]}"
    assert all(a >= b for a, b in zip(scores, scores[1:])), f"not best first: {scores}"
    best = np.sort(expected)[::-1][:want]
    assert np.abs(got - best).max() <= tolerance, "the top results are not the best ones"


def check_cloudflare(response, reranker, query, texts, top=None):
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["success"] is True and body["errors"] == [] and body["messages"] == [], body
    hits = body["result"]["response"]
    check_ranking([h["id"] for h in hits], [h["score"] for h in hits], expected_scores(reranker, query, texts), top)


def check_tei(response, reranker, query, texts, raw=False, return_text=False):
    assert response.status_code == 200, response.text
    ranks = response.json()
    expected = reranker.logits([(query, t) for t in texts]) if raw else expected_scores(reranker, query, texts)
    check_ranking(
        [r["index"] for r in ranks],
        [r["score"] for r in ranks],
        np.asarray(expected, np.float64),
        tolerance=LOGIT_TOLERANCE if raw else SCORE_TOLERANCE,
    )
    for rank in ranks:
        assert ("text" in rank) == return_text
        if return_text:
            assert rank["text"] == texts[rank["index"]]


def check_cohere(response, reranker, query, texts, top=None, return_documents=False):
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["id"] and body["meta"]["api_version"]["version"] == "1" and body["usage"]["total_tokens"] > 0
    results = body["results"]
    check_ranking(
        [r["index"] for r in results],
        [r["relevance_score"] for r in results],
        expected_scores(reranker, query, texts),
        top,
    )
    for result in results:
        assert ("document" in result) == return_documents
        if return_documents:
            assert result["document"] == {"text": texts[result["index"]]}


def check_retry_after(response):
    """429 and 503 tell the client when to retry, in every dialect: the SDKs' retry logic reads it."""
    if response.status_code in (429, 503):
        assert response.headers.get("retry-after", "").isdigit(), response.headers


def cloudflare_error(response, status, *words, code=5006):
    assert response.status_code == status, f"{response.status_code} {response.text}"
    check_retry_after(response)
    body = response.json()
    assert body["success"] is False and body["result"] == {} and body["messages"] == [], body
    [error] = body["errors"]
    assert error["code"] == code, body
    # model errors are "AiError: <title>: ..."; a path Cloudflare cannot route is "Could not route to ..."
    assert error["message"].startswith("Could not route to " if code == 7003 else "AiError: "), body
    for word in words:
        assert word in error["message"], f"{word!r} not in {error['message']!r}"


def tei_error(response, status, *words, error_type="validation"):
    assert response.status_code == status, f"{response.status_code} {response.text}"
    check_retry_after(response)
    body = response.json()
    assert set(body) == {"error", "error_type"} and body["error_type"] == error_type, body
    for word in words:
        assert word in body["error"], f"{word!r} not in {body['error']!r}"


def cohere_error(response, status, *words):
    """Cohere's SDK reads `message`, the Jina clients `detail`: both carry the same text."""
    assert response.status_code == status, f"{response.status_code} {response.text}"
    check_retry_after(response)
    body = response.json()
    assert set(body) == {"message", "detail"} and body["detail"] == body["message"], body
    for word in words:
        assert word in body["message"], f"{word!r} not in {body['message']!r}"


def still_serving(client, reranker):
    query, texts = "still there?", TEXTS[:3]
    check_tei(client.post("/rerank", json={"query": query, "texts": texts}), reranker, query, texts)


# --- routes and dialects ---------------------------------------------------------------------


def test_health_reports_ready(client):
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json()["status"] == "ready"


def test_openapi_lists_every_route(client):
    app = build_app(lambda: None)  # never started: only its routes are read
    routes = {(route.path, method.lower()) for route in app.routes for method in route.methods if method != "HEAD"}
    spec = client.get("/openapi.json").json()
    documented = {(path, method) for path, operations in spec["paths"].items() for method in operations}
    assert routes == documented, f"undocumented: {routes - documented}; documented but absent: {documented - routes}"
    assert spec == openapi_spec(Limits())


@pytest.mark.parametrize("path", [CF_SHORT, CF_LONG])
def test_cloudflare(client, reranker, path):
    query, texts = "Which one is cooler?", TEXTS
    contexts = [{"text": t} for t in texts]
    check_cloudflare(client.post(path, json={"query": query, "contexts": contexts}), reranker, query, texts)
    check_cloudflare(
        client.post(path, json={"query": query, "contexts": contexts, "top_k": 3}), reranker, query, texts, 3
    )
    check_cloudflare(
        client.post(path, json={"query": query, "contexts": contexts, "top_k": 99}), reranker, query, texts
    )


def test_cloudflare_seed_curl_example(server, reranker):
    """The curl command of Cloudflare's model page, unchanged apart from the host."""
    account, token = "0123456789abcdef", "any-token"
    body = (
        '{ "query": "Which one is better?", '
        '"contexts": [{ "text": "a cyberpunk lizzard" }, {"text": "a cyberpunk cat"}]}'
    )
    if shutil.which("curl"):
        command = (
            f"curl -s {server.url}/client/v4/accounts/$CLOUDFLARE_ACCOUNT_ID/ai/run/@cf/baai/bge-reranker-base \\\n"
            f"  -X POST \\\n  -H \"Authorization: Bearer $CLOUDFLARE_AUTH_TOKEN\" \\\n  -d '{body}'"
        )
        env = {**os.environ, "CLOUDFLARE_ACCOUNT_ID": account, "CLOUDFLARE_AUTH_TOKEN": token}
        out = subprocess.run(
            ["bash", "-c", command], env=env, capture_output=True, text=True, timeout=30, check=True
        ).stdout
        response = httpx.Response(200, content=out)
    else:  # the same request: curl -d sends form-urlencoded
        response = post(
            f"{server.url}/client/v4/accounts/{account}/ai/run/@cf/baai/bge-reranker-base",
            content=body,
            headers={"Authorization": f"Bearer {token}", "content-type": "application/x-www-form-urlencoded"},
        )
    check_cloudflare(response, reranker, "Which one is better?", ["a cyberpunk lizzard", "a cyberpunk cat"])


def test_tei(client, reranker):
    query, texts = "what is panda?", TEXTS
    check_tei(client.post("/rerank", json={"query": query, "texts": texts}), reranker, query, texts)
    check_tei(
        client.post("/rerank", json={"query": query, "texts": texts, "raw_scores": True, "return_text": True}),
        reranker,
        query,
        texts,
        raw=True,
        return_text=True,
    )
    check_tei(
        client.post("/rerank", json={"query": query, "texts": texts, "truncation_direction": "Right"}),
        reranker,
        query,
        texts,
    )


def test_tei_truncate(client, limited_server, reranker):
    """TEI since 1.9: a pair longer than the model takes is cut unless the request says truncate: false
    (then 413); a server started with --no-auto-truncate refuses it unless the request says truncate: true."""
    query, long_text = "what is panda?", " ".join(TEXTS * 20)
    texts = [TEXTS[0], long_text]
    check_tei(client.post("/rerank", json={"query": query, "texts": texts}), reranker, query, texts)
    check_tei(client.post("/rerank", json={"query": query, "texts": texts, "truncate": True}), reranker, query, texts)
    tei_error(
        client.post("/rerank", json={"query": query, "texts": texts, "truncate": False}),
        413,
        "must have less than",
        "texts[1]",
    )
    tei_error(
        client.post("/rerank", json={"query": query, "texts": texts, "truncation_direction": "Left"}), 422, "Left"
    )
    url, key = limited_server.url, {"Authorization": f"Bearer {API_KEY}".encode()}
    tei_error(post(url + "/rerank", json={"query": query, "texts": texts}, headers=key), 413, "must have less than")
    check_tei(
        post(url + "/rerank", json={"query": query, "texts": texts, "truncate": True}, headers=key),
        reranker,
        query,
        texts,
    )


def test_cohere_and_jina(client, reranker):
    query, texts = "which one is cooler?", TEXTS
    documents = [t if i % 2 else {"text": t} for i, t in enumerate(texts)]  # both spellings in one list
    check_cohere(client.post("/v1/rerank", json={"query": query, "documents": documents}), reranker, query, texts)
    response = client.post(
        "/v1/rerank",
        json={"model": "jina-reranker-v2", "query": query, "documents": texts, "top_n": 4, "return_documents": True},
    )
    check_cohere(response, reranker, query, texts, top=4, return_documents=True)
    assert response.json()["model"] == "jina-reranker-v2"


def test_unicode(client, reranker):
    query = "熊猫 🐼 naïve Ærø مرحبا \u0301 ﬁ ｆｕｌｌｗｉｄｔｈ"
    texts = [t + " \u200b\u00a0" + q for t, q in zip(TEXTS, "αβγδεζηθικλμ")]
    check_tei(
        client.post("/rerank", json={"query": query, "texts": texts, "return_text": True}),
        reranker,
        query,
        texts,
        return_text=True,
    )
    raw = json.dumps({"query": query, "contexts": [{"text": t} for t in texts]}, ensure_ascii=False).encode()
    check_cloudflare(client.post(CF_SHORT, content=raw, headers=JSON), reranker, query, texts)
    check_cohere(client.post("/v1/rerank", json={"query": query, "documents": texts}), reranker, query, texts)


def test_unknown_routes(client):
    """A path a Cloudflare client sends but this server does not route: Cloudflare's 404 (code 7003),
    naming the routes this server does serve; the model it runs is never called unknown."""
    for path in (
        "/ai/run/@cf/baai/bge-reranker-v2-m3",
        "/client/v4/accounts/a/ai/run/@cf/meta/llama-3-8b",
        f"/accounts/a/ai/run/{CLOUDFLARE_MODEL}",
        f"/client/v4/ai/run/{CLOUDFLARE_MODEL}",
        "/client/v4/accounts/a/ai/models",
    ):
        response = client.post(path, json={"query": "q", "contexts": [{"text": "a"}]})
        cloudflare_error(
            response,
            404,
            path,
            f"runs only {CLOUDFLARE_MODEL}",
            "/client/v4/accounts/<account_id>/ai/run/",
            "base_url is http://<host>:<port>/client/v4",
            code=7003,
        )
        assert "No such model" not in response.text
    response = client.get("/nothing-here")
    assert response.status_code == 404 and "no route" in response.json()["message"]
    response = client.get("/rerank")
    assert response.status_code == 405 and "not allowed" in response.json()["message"]
    # a long path is named, not echoed whole: a 20 kB path makes no 20 kB answer
    for path in ("/" + "a" * 20000, "/ai/run/" + "b" * 20000):
        response = client.post(path, json={})
        assert response.status_code == 404 and len(response.content) < 1000, len(response.content)


# --- bad input, in each dialect's shape ------------------------------------------------------

# (body, message words) -> checked in all three dialects; "contexts" is renamed per dialect
BAD_BODIES = [
    ({"query": "", "contexts": [{"text": "a"}]}, ["query", "empty"]),
    ({"query": 5, "contexts": [{"text": "a"}]}, ["query", "string"]),
    ({"contexts": [{"text": "a"}]}, ["query", "required"]),
    ({"query": "q"}, ["{name}", "required"]),
    ({"query": "q", "contexts": "a"}, ["{name}", "list"]),
    ({"query": "q", "contexts": {"text": "a"}}, ["{name}", "list"]),
    ({"query": "q", "contexts": [{"text": "a"}, {"text": ""}]}, ["[1]", "empty"]),
    ({"query": "q", "contexts": [{"text": "a"}, {"text": 7}]}, ["[1]", "string"]),
    ({"query": "q", "contexts": [{"text": "a"}, 7]}, ["[1]"]),
    ({"query": "q", "contexts": [{"text": "a"}, {"title": "no text"}]}, ["[1]", "text"]),
    (["not", "an", "object"], ["object"]),
]
TOP_BAD = [0, -3, "2", 1.5, 2.0, True]


def rename(body, dialect: str):
    """A Cloudflare body in another dialect: contexts -> texts (strings) or documents."""
    if not isinstance(body, dict) or "contexts" not in body or dialect == "cloudflare":
        return body
    body = dict(body)
    items = body.pop("contexts")
    if dialect == "tei" and isinstance(items, list):
        items = [item["text"] if isinstance(item, dict) and "text" in item else item for item in items]
    body["texts" if dialect == "tei" else "documents"] = items
    return body


@pytest.mark.parametrize("body, words", BAD_BODIES)
def test_bad_input_cloudflare(client, reranker, body, words):
    words = [w.replace("{name}", "contexts") for w in words]
    cloudflare_error(client.post(CF_SHORT, json=body), 400, "Bad input", *words)
    still_serving(client, reranker)


@pytest.mark.parametrize("body, words", [case for case in BAD_BODIES if "empty" not in case[1]])
def test_bad_input_tei(client, reranker, body, words):
    """Every bad body but the empty-text ones: TEI scores an empty query or text (tests/test_dialects.py)."""
    words = [w.replace("{name}", "texts") for w in words]
    tei_error(client.post("/rerank", json=rename(body, "tei")), 422, *words)
    still_serving(client, reranker)


@pytest.mark.parametrize("body, words", BAD_BODIES)
def test_bad_input_cohere(client, reranker, body, words):
    cohere_error(
        client.post("/v1/rerank", json=rename(body, "cohere")), 400, *[w.replace("{name}", "documents") for w in words]
    )
    still_serving(client, reranker)


@pytest.mark.parametrize("top", TOP_BAD)
def test_bad_top_k(client, reranker, top):
    cloudflare_error(
        client.post(CF_SHORT, json={"query": "q", "contexts": [{"text": "a"}], "top_k": top}),
        400,
        "top_k",
        "integer >= 1",
    )
    cohere_error(
        client.post("/v1/rerank", json={"query": "q", "documents": ["a"], "top_n": top}), 400, "top_n", "integer >= 1"
    )
    still_serving(client, reranker)


def test_bad_flags_tei(client):
    for field in ("raw_scores", "return_text", "truncate"):
        tei_error(
            client.post("/rerank", json={"query": "q", "texts": ["a"], field: "yes"}), 422, field, "true or false"
        )
    cohere_error(
        client.post("/v1/rerank", json={"query": "q", "documents": ["a"], "return_documents": 1}),
        400,
        "return_documents",
    )


def test_empty_list(client, reranker):
    cloudflare_error(client.post(CF_SHORT, json={"query": "q", "contexts": []}), 400, "contexts", "empty")
    tei_error(client.post("/rerank", json={"query": "q", "texts": []}), 400, "texts", "empty", error_type="empty")
    cohere_error(client.post("/v1/rerank", json={"query": "q", "documents": []}), 400, "documents", "empty")
    still_serving(client, reranker)


@pytest.mark.parametrize(
    "raw", [b'{"query": "q", "contexts": [', b"", b"\xff\xfe{}", b"[" * 100000, b"query=q&contexts=a"]
)
def test_malformed_json(client, reranker, raw):
    cloudflare_error(client.post(CF_SHORT, content=raw, headers=JSON), 400, "JSON")
    tei_error(client.post("/rerank", content=raw, headers=JSON), 400, "JSON")
    cohere_error(client.post("/v1/rerank", content=raw, headers=JSON), 400, "JSON")
    still_serving(client, reranker)


def test_content_type(client, reranker):
    body = json.dumps({"query": "q", "texts": ["a"], "documents": ["a"], "contexts": [{"text": "a"}]})
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"content-type": content_type} if content_type else {}
        tei_error(client.post("/rerank", content=body, headers=headers), 415, "Content-Type: application/json")
        cohere_error(client.post("/v1/rerank", content=body, headers=headers), 415, "Content-Type: application/json")
        # Cloudflare's own curl example sends JSON labelled form-urlencoded: the body is what counts
        check_cloudflare(client.post(CF_SHORT, content=body, headers=headers), reranker, "q", ["a"])
    check_tei(
        client.post("/rerank", content=body, headers={"content-type": "application/json; charset=utf-8"}),
        reranker,
        "q",
        ["a"],
    )


def test_a_refused_body_that_was_read_keeps_the_connection(client, reranker):
    """A 415 comes after the body is read, so the connection stays open for the next request.
    Refusing a body left unread must close it, and a close on unread bytes makes the kernel send a
    reset that can destroy the answer before the client reads it (seen as transport errors with
    --workers 2, 3 in 180 requests)."""
    body = json.dumps({"query": "q", "texts": ["a"]})
    for _ in range(3):
        refused = client.post("/rerank", content=body, headers={"content-type": "text/plain"})
        assert refused.status_code == 415 and refused.headers.get("connection") != "close"
        check_tei(
            client.post("/rerank", content=body, headers={"content-type": "application/json"}), reranker, "q", ["a"]
        )


def test_oversized_body(client, reranker):
    limit = Limits().max_body_bytes
    texts = ["x" * 1000] * (limit // 1000 + 1)
    cloudflare_error(
        client.post(CF_SHORT, json={"query": "q", "contexts": [{"text": t} for t in texts]}),
        413,
        "too large",
        str(limit),
        code=3006,
    )
    tei_error(client.post("/rerank", json={"query": "q", "texts": texts}), 413, str(limit))
    cohere_error(client.post("/v1/rerank", json={"query": "q", "documents": texts}), 413, str(limit))

    def chunks():  # no Content-Length: the bytes actually read are counted
        for _ in range(limit // 65536 + 2):
            yield b" " * 65536

    tei_error(client.post("/rerank", content=chunks(), headers=JSON), 413, "larger than")
    still_serving(client, reranker)


def test_too_many_contexts(client, reranker):
    count = 5000
    texts = [f"context {i}" for i in range(count)]
    cloudflare_error(
        client.post(CF_SHORT, json={"query": "q", "contexts": [{"text": t} for t in texts]}),
        413,
        "5000",
        "--max-contexts",
        code=3006,
    )
    tei_error(client.post("/rerank", json={"query": "q", "texts": texts}), 413, "5000")
    cohere_error(client.post("/v1/rerank", json={"query": "q", "documents": texts}), 422, "5000")
    still_serving(client, reranker)


# --- API key and limits -----------------------------------------------------------------------


def test_api_key(limited_server, reranker):
    url, good = limited_server.url, {"Authorization": f"Bearer {API_KEY}"}
    assert get(url + "/health").status_code == 200  # /health needs no key
    for headers, word in (
        ({}, "missing"),
        ({"Authorization": "Bearer wrong"}, "invalid"),
        ({"Authorization": API_KEY}, "missing"),
        ({"Authorization": "Basic " + API_KEY}, "missing"),
    ):
        headers = {k: v.encode() for k, v in headers.items()}
        cloudflare_error(
            post(url + CF_LONG, json={"query": "q", "contexts": [{"text": "a"}]}, headers=headers),
            401,
            word,
            code=10000,
        )
        tei_error(
            post(url + "/rerank", json={"query": "q", "texts": ["a"]}, headers=headers),
            401,
            word,
            error_type="unauthorized",
        )
        cohere_error(post(url + "/v1/rerank", json={"query": "q", "documents": ["a"]}, headers=headers), 401, word)
        assert get(url + "/openapi.json", headers=headers).status_code == 401
    good = {k: v.encode() for k, v in good.items()}
    check_cloudflare(
        post(url + CF_LONG, json={"query": "q", "contexts": [{"text": "a"}]}, headers=good), reranker, "q", ["a"]
    )
    check_tei(post(url + "/rerank", json={"query": "q", "texts": ["a"]}, headers=good), reranker, "q", ["a"])
    assert get(url + "/openapi.json", headers=good).status_code == 200


def test_limit_flags(limited_server, reranker):
    url, key = limited_server.url, {"Authorization": f"Bearer {API_KEY}".encode()}
    nine = [f"text {i}" for i in range(9)]
    tei_error(post(url + "/rerank", json={"query": "q", "texts": nine}, headers=key), 413, "at most 8")
    check_tei(post(url + "/rerank", json={"query": "q", "texts": nine[:8]}, headers=key), reranker, "q", nine[:8])
    cohere_error(post(url + "/v1/rerank", json={"query": "q", "documents": ["x" * 30000]}, headers=key), 413, "20000")


def test_full_queue_answers_429(limited_server, reranker):
    """Queue of one: a burst of slow requests gets some 429s in each dialect's shape, and the rest right answers."""
    url, key = limited_server.url, {"Authorization": f"Bearer {API_KEY}".encode()}
    query, texts = "queue", [" ".join(TEXTS) * 2 + str(i) for i in range(8)]  # 8 full-length pairs per request
    calls = [
        (CF_SHORT, {"query": query, "contexts": [{"text": t} for t in texts]}),
        ("/rerank", {"query": query, "texts": texts, "truncate": True}),
        ("/v1/rerank", {"query": query, "documents": texts}),
    ]

    def call(i):
        path, body = calls[i % 3]
        return path, post(url + path, json=body, headers=key)

    with ThreadPoolExecutor(24) as pool:
        answers = list(pool.map(call, range(72)))
    refused = 0
    for path, response in answers:
        if response.status_code == 429:
            refused += 1
            {
                CF_SHORT: lambda r: cloudflare_error(r, 429, "Out of capacity", "--queue-size", code=3040),
                "/rerank": lambda r: tei_error(r, 429, "busy", error_type="overloaded"),
                "/v1/rerank": lambda r: cohere_error(r, 429, "busy"),
            }[path](response)
        elif path == CF_SHORT:
            check_cloudflare(response, reranker, query, texts)
        elif path == "/rerank":
            check_tei(response, reranker, query, texts)
        else:
            check_cohere(response, reranker, query, texts)
    assert 0 < refused < len(answers), f"{refused} of {len(answers)} refused"


# --- concurrency ------------------------------------------------------------------------------


def test_concurrent_clients_get_their_own_answers(server, client, reranker):
    """16 clients x 20 mixed requests at once: each answer is the library's for that very request."""
    before = client.get("/health").json()
    clients, per_client = 16, 20

    def make_request(rng):
        texts = rng.sample(TEXTS, rng.randint(1, len(TEXTS)))
        query = rng.choice(TEXTS) + f" #{rng.randrange(10**6)}"  # unique, so a mixed-up answer cannot match
        top = rng.choice([None, 1, 3])
        dialect = rng.choice(["cloudflare", "tei", "tei-raw", "cohere"])
        return dialect, query, texts, top

    def run(seed):
        rng, results = random.Random(seed), []
        with httpx.Client(base_url=server.url, timeout=60) as http:
            for _ in range(per_client):
                dialect, query, texts, top = request = make_request(rng)
                if dialect == "cloudflare":
                    body = {"query": query, "contexts": [{"text": t} for t in texts], "top_k": top}
                    results.append((request, http.post(CF_LONG, json=body)))
                elif dialect.startswith("tei"):
                    body = {"query": query, "texts": texts, "raw_scores": dialect == "tei-raw", "return_text": True}
                    results.append((request, http.post("/rerank", json=body)))
                else:
                    body = {"query": query, "documents": texts, "top_n": top, "return_documents": True}
                    results.append((request, http.post("/v1/rerank", json=body)))
        return results

    barrier_start = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for batch in pool.map(run, range(clients)) for r in batch]
    elapsed = time.monotonic() - barrier_start
    assert len(results) == clients * per_client
    for (dialect, query, texts, top), response in results:
        if dialect == "cloudflare":
            check_cloudflare(response, reranker, query, texts, top)
        elif dialect == "tei":
            check_tei(response, reranker, query, texts, return_text=True)
        elif dialect == "tei-raw":
            check_tei(response, reranker, query, texts, raw=True, return_text=True)
        else:
            check_cohere(response, reranker, query, texts, top, return_documents=True)
    after = client.get("/health").json()
    scored = after["requests_scored"] - before["requests_scored"]
    calls = after["forward_calls"] - before["forward_calls"]
    assert scored == clients * per_client, f"{scored} requests scored, {clients * per_client} sent"
    assert calls < scored, f"{calls} forward calls for {scored} requests: concurrent requests were not batched"
    print(f"{scored} requests in {elapsed:.2f}s, {calls} forward calls ({scored / calls:.1f} requests per call)")


def test_client_disconnect_does_not_disturb_others(server, client, reranker):
    """Clients that hang up mid-body or before their answer, while others are being served."""
    body = json.dumps({"query": "leaving", "texts": TEXTS * 20, "truncate": True}).encode()
    head = (
        b"POST /rerank HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n"
        % len(body)
    )
    before = client.get("/health").json()

    def rude_client():
        for _ in range(5):
            with socket.create_connection(("127.0.0.1", server.port)) as s:  # body cut short, then gone
                s.sendall(head + body[: len(body) // 2])
            with socket.create_connection(("127.0.0.1", server.port)) as s:  # whole request, gone before the answer
                s.sendall(head + body)
            time.sleep(0.05)

    with ThreadPoolExecutor(4) as pool:
        rude = [pool.submit(rude_client) for _ in range(4)]
        for i in range(20):
            query, texts = f"polite {i}", TEXTS[i % 5 :]
            check_tei(client.post("/rerank", json={"query": query, "texts": texts}), reranker, query, texts)
        for future in rude:
            future.result()
    still_serving(client, reranker)
    after = client.get("/health").json()
    skipped = 20 - (after["requests_scored"] - before["requests_scored"] - 21)  # 20 rude whole requests were sent
    print(f"{skipped} of 20 abandoned requests were skipped before scoring")
    assert "Traceback" not in server.log(), server.log()


# --- loading, failing, stopping ---------------------------------------------------------------

GATED_SERVER = """
import sys, time, pathlib, uvicorn
from nprerank import Reranker
from nprerank.server import build_app
model, gate = sys.argv[1], pathlib.Path(sys.argv[2])
def load():  # holds the model back until the test opens the gate
    while not gate.exists():
        time.sleep(0.02)
    return Reranker.from_pretrained(model)
uvicorn.run(build_app(load), host="127.0.0.1", port=int(sys.argv[4]), log_level="warning")
"""


def test_503_while_loading(tiny_model, reranker, tmp_path):
    gate = tmp_path / "gate"
    server = Server([str(tiny_model), str(gate)], tmp_path / "log", script=GATED_SERVER)
    try:
        server.wait(status=503)
        assert get(server.url + "/health").json()["status"] == "loading"
        cloudflare_error(
            post(server.url + CF_SHORT, json={"query": "q", "contexts": [{"text": "a"}]}), 503, "loading", code=3040
        )
        tei_error(
            post(server.url + "/rerank", json={"query": "q", "texts": ["a"]}), 503, "loading", error_type="unhealthy"
        )
        cohere_error(post(server.url + "/v1/rerank", json={"query": "q", "documents": ["a"]}), 503, "loading")
        # bad input is still told apart from loading
        tei_error(post(server.url + "/rerank", json={"query": "q", "texts": []}), 400, "empty", error_type="empty")
        gate.touch()
        server.wait(status=200)
        check_tei(post(server.url + "/rerank", json={"query": "q", "texts": ["a"]}), reranker, "q", ["a"])
    finally:
        server.stop()


def test_model_that_fails_to_load_stops_the_server(tmp_path):
    """A folder that holds the model's files but cannot be loaded (a broken config.json) fails in
    the model thread: logged, then the server stops with exit 1."""
    folder = tmp_path / "broken-model"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        (folder / name).write_text("{")
    server = Server(["--model", str(folder)], tmp_path / "log", env={"HF_HUB_OFFLINE": "1"})
    try:
        assert server.process.wait(timeout=60) == 1, server.log()
    finally:
        server.stop()
    assert "could not load the model" in server.log() and "config.json" in server.log()
    assert f"the model {folder} could not be loaded (the error is above)" in server.log()
    assert "Traceback" not in server.log()


@pytest.mark.parametrize(
    "model, phrase",
    [
        ("{tmp}/no-such-model", "{tmp}/no-such-model: no such model folder"),
        ("{tmp}/empty", "{tmp}/empty: missing config.json, tokenizer.json, model.safetensors"),
        ("{tmp}/a-file", "{tmp}/a-file is a file; a model is a folder"),
        ("", "no model named"),
        ("BAAI/not-cached-here", "BAAI/not-cached-here is not in the Hugging Face cache"),
        ("a/b/c", "a/b/c: no such model folder"),
    ],
)
@pytest.mark.parametrize("workers", [[], ["--workers", "2"]])
def test_a_model_that_cannot_load_fails_before_anything_is_served(tmp_path, model, phrase, workers):
    """What can be known without the network is checked before the server listens (or starts a
    worker): one line, exit 1, and no moment where it answers a port it must close."""
    (tmp_path / "empty").mkdir()
    (tmp_path / "a-file").write_text("not a model")
    env = {"HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    server = Server(["--model", model.format(tmp=tmp_path), *workers], tmp_path / "log", env=env)
    try:
        assert server.process.wait(timeout=60) == 1, server.log()
    finally:
        server.stop()
    assert phrase.format(tmp=tmp_path) in server.log(), server.log()
    assert "Uvicorn running" not in server.log() and "Traceback" not in server.log()
    assert len(server.log().strip().splitlines()) == 1, server.log()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly(tiny_model, tmp_path, reranker, sig):
    server = Server(["--model", str(tiny_model)], tmp_path / "log")
    server.wait()
    check_tei(post(server.url + "/rerank", json={"query": "q", "texts": ["a"]}), reranker, "q", ["a"])
    assert server.stop(sig) == 0, server.log()
    assert "Traceback" not in server.log()


# --- the documentation's examples -------------------------------------------------------------


def shape(value):
    """The structure of a JSON value: keys and types, not the numbers (the docs used another model)."""
    if isinstance(value, dict):
        return {key: shape(item) for key, item in value.items() if key != "id" or not isinstance(item, str)}
    if isinstance(value, list):
        return [shape(item) for item in value]
    return type(value).__name__


@pytest.mark.skipif(not shutil.which("curl"), reason="curl is not installed")
def test_docs_curl_examples(server):
    """Every curl example in docs/server.md runs against the server and answers in the documented shape."""
    text = (Path(__file__).parent.parent / "docs" / "server.md").read_text()
    blocks = text.split("```")
    examples = [
        (blocks[i].removeprefix("sh\n"), blocks[i + 2].removeprefix("json\n"))
        for i in range(1, len(blocks) - 2, 2)
        if blocks[i].startswith("sh\ncurl ") and blocks[i + 2].startswith("json\n")
    ]
    assert len(examples) >= 5, "docs/server.md lost its curl examples"
    env = {**os.environ, "CLOUDFLARE_ACCOUNT_ID": "account", "CLOUDFLARE_AUTH_TOKEN": "token"}
    for command, documented in examples:
        command = command.replace("http://127.0.0.1:8080", server.url).replace("curl ", "curl -s ", 1)
        out = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True, timeout=30).stdout
        assert shape(json.loads(out)) == shape(json.loads(documented)), (
            f"{command}\nanswered {out}\ndocumented {documented}"
        )
