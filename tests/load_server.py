"""Load a running `nprerank serve` with C clients x R requests and check every answer (issue 10's load figure).

Each client sends R requests in a row, dialects and sizes drawn from a seeded generator, every
query unique so that an answer given to the wrong request cannot match. Each answer is compared
with what the library gives for that very request on the same model folder; an answer that is not
200, not parseable or off by more than the batching tolerance is "wrong", a request that got no
answer at all (connection error, timeout) is "lost".

    python tests/load_server.py --model weights/ --clients 32 --requests 50        # starts a server
    python tests/load_server.py --url http://127.0.0.1:8080 --model weights/ ...   # or uses one

Loopback only, bounded in count (clients x requests) and time (--timeout per request).
"""

import argparse
import json
import random
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

from nprerank import Reranker
from nprerank.reranker import sigmoid

WORDS = (
    "panda bear bamboo china mountain river city night music rain search engine ranking document "
    "attention token vector café naïve 熊猫 生活 中国 Привет мир الباندا 🐼 über straße"
).split()
TOLERANCE = 2e-5  # scores; a request batched with others is padded differently (see test_server.py)


def make_request(rng: random.Random, number: int) -> tuple:
    """-> (dialect, query, texts): 1 to 16 texts of 1 to 60 words, a query no other request has."""
    query = " ".join(rng.choices(WORDS, k=rng.randint(1, 12))) + f" #{number}"
    texts = [" ".join(rng.choices(WORDS, k=rng.randint(1, 60))) for _ in range(rng.randint(1, 16))]
    return rng.choice(["cloudflare", "tei", "cohere"]), query, texts


def send(http: httpx.Client, dialect: str, query: str, texts: list) -> dict:
    """One request; -> {index: score} as the server answered it."""
    if dialect == "cloudflare":
        body = {"query": query, "contexts": [{"text": t} for t in texts]}
        answer = http.post("/ai/run/@cf/baai/bge-reranker-base", json=body)
        answer.raise_for_status()
        return {hit["id"]: hit["score"] for hit in answer.json()["result"]["response"]}
    if dialect == "tei":
        answer = http.post("/rerank", json={"query": query, "texts": texts, "truncate": True})
        answer.raise_for_status()
        return {hit["index"]: hit["score"] for hit in answer.json()}
    answer = http.post("/v1/rerank", json={"query": query, "documents": texts})
    answer.raise_for_status()
    return {hit["index"]: hit["relevance_score"] for hit in answer.json()["results"]}


def run_load(url: str, model, clients: int = 32, requests: int = 50, seed: int = 0, timeout: float = 120) -> dict:
    """C clients x R requests against `url`; every answer checked against the library's scores."""
    reranker = Reranker.from_pretrained(model)
    plans = [
        [make_request(random.Random(seed * 100003 + c * 1009 + i), c * requests + i) for i in range(requests)]
        for c in range(clients)
    ]

    def client(plan):
        results = []
        with httpx.Client(base_url=url, timeout=timeout) as http:
            for request in plan:
                try:
                    results.append((request, send(http, *request)))
                except httpx.TransportError as error:
                    results.append((request, error))
                except (httpx.HTTPStatusError, ValueError, KeyError) as error:
                    results.append((request, f"{type(error).__name__}: {error}"))
        return results

    started = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        results = [result for batch in pool.map(client, plans) for result in batch]
    seconds = time.monotonic() - started
    lost = wrong = 0
    worst, problems = 0.0, []
    for (dialect, query, texts), answer in results:
        if isinstance(answer, Exception):
            lost += 1
            problems.append(f"lost {dialect}: {answer!r}")
            continue
        expected = sigmoid(reranker.logits([(query, text) for text in texts]))
        if isinstance(answer, str) or sorted(answer) != list(range(len(texts))):
            wrong += 1
            problems.append(f"wrong {dialect}: {answer!r:.200}")
            continue
        difference = float(np.abs(np.array([answer[i] for i in range(len(texts))]) - expected).max())
        worst = max(worst, difference)
        if difference > TOLERANCE:
            wrong += 1
            problems.append(f"wrong {dialect}: off by {difference:.2e}")
    pairs = sum(len(texts) for (_, _, texts), _ in results)
    return {
        "clients": clients,
        "requests_per_client": requests,
        "sent": len(results),
        "answered": len(results) - lost,
        "lost": lost,
        "wrong": wrong,
        "pairs": pairs,
        "seconds": round(seconds, 2),
        "requests_per_second": round(len(results) / seconds, 1),
        "max_score_difference": worst,
        "problems": problems[:10],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, help="the model folder the server runs (for the expected scores)")
    parser.add_argument("--url", help="a running server (default: start one on a free loopback port)")
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=50, help="requests per client")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=120, help="seconds per request")
    args = parser.parse_args(argv)
    if not 1 <= args.clients <= 256 or not 1 <= args.requests <= 1000:
        parser.error("--clients must be 1..256 and --requests 1..1000")
    server = None
    if args.url is None:
        sys.path.insert(0, str(Path(__file__).parent))
        from test_server import Server

        server = Server(["--model", args.model], Path("load-server.log").resolve())
        server.wait(timeout=300)
        args.url = server.url
    elif not args.url.startswith(("http://127.0.0.1", "http://localhost", "http://[::1]")):
        parser.error("--url must be a loopback address")
    try:
        report = run_load(args.url, args.model, args.clients, args.requests, args.seed, args.timeout)
    finally:
        if server is not None:
            server.stop()
    print(json.dumps(report, indent=1, ensure_ascii=False))
    return 0 if report["lost"] == 0 and report["wrong"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
