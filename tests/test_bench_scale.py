"""`nprerank bench --scale` (issue 14's benchmarks): runs whole on the tiny model, nothing timed.

What is checked is the bench itself: every number in the report follows from the ones it is
made of (pairs/s from seconds, ratios from medians, memory totals from the processes'), every
answer of the servers was checked, and the checks it relies on do catch a wrong or lost answer.
"""

import http.server
import json
import statistics
import subprocess
import sys
import threading

import numpy as np
import pytest

from nprerank import bench_scale

REPEATS = 2


@pytest.fixture(scope="module")
def report(tiny_model):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "nprerank",
            "bench",
            "--scale",
            "--model",
            str(tiny_model),
            "--quick",
            "--repeats",
            str(REPEATS),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def check_rates(result: dict, pairs: int) -> None:
    """pairs/s are pairs / seconds of each round, their median and min."""
    assert len(result["seconds"]) == REPEATS
    rates = result["pairs_per_s"]["runs"]
    assert rates == pytest.approx([pairs / s for s in result["seconds"]])
    assert result["pairs_per_s"]["median"] == pytest.approx(statistics.median(rates))
    assert result["pairs_per_s"]["min"] == pytest.approx(min(rates))


def test_batch_against_the_loop(report):
    batch = report["batch"]
    size = bench_scale.sizes(quick=True)
    assert batch["pairs"] == size["queries"] * size["passages"] == batch["queries"] * batch["passages_per_query"]
    for name in ("batch", "loop"):
        check_rates(batch["runs"][name], batch["pairs"])
    medians = [batch["runs"][name]["pairs_per_s"]["median"] for name in ("batch", "loop")]
    assert batch["ratio"] == pytest.approx(medians[0] / medians[1])
    # the same Reranker.logits call per query: the same floats, whatever the timing
    assert batch["same_scores"] and batch["max_abs_score_diff"] <= bench_scale.SCORE_TOLERANCE
    # the scoring-only span each process reports: inside its run, so never longer than the run
    for name in ("batch", "loop"):
        scoring = batch["scoring_runs"][name]["seconds"]
        walls = batch["runs"][name]["seconds"]
        assert len(scoring) == REPEATS and all(0 <= s <= wall for s, wall in zip(scoring, walls))
    medians = [batch["scoring_runs"][name]["pairs_per_s"]["median"] for name in ("batch", "loop")]
    assert batch["scoring_ratio"] == pytest.approx(medians[0] / medians[1])


def test_every_server_answer_was_checked(report):
    serve = report["serve"]
    assert serve["pairs"] == serve["clients"] * serve["requests_per_client"] * serve["texts_per_request"]
    settings = serve["settings"]
    assert [(s["workers"], s["threads"]) for s in settings.values()] == [(1, report["threads"]), (2, 1)]
    for result in settings.values():
        check_rates(result, serve["pairs"])
        assert len(result["checks"]) == REPEATS
        for check in result["checks"]:
            assert check["sent"] == serve["clients"] * serve["requests_per_client"]
            assert check["answered"] == check["sent"] and check["lost"] == 0 and check["wrong"] == 0
            assert check["max_score_difference"] <= bench_scale.SCORE_TOLERANCE
    one, two = settings.values()
    assert serve["ratio"] == pytest.approx(two["pairs_per_s"]["median"] / one["pairs_per_s"]["median"])


def test_memory_fields_are_consistent(report, tiny_model):
    serve = report["serve"]
    for result in serve["settings"].values():
        memory = result["memory"]
        assert len(memory["workers"]) == result["workers"]
        assert (memory["parent"] is None) == (result["workers"] == 1)  # one worker is the server itself
        processes = memory["workers"] + ([memory["parent"]] if memory["parent"] else [])
        for m in processes:
            assert set(m) == {"rss_mb", "anonymous_mb", "pss_mb", "pss_anon_mb"}
            assert 0 < m["pss_anon_mb"] <= m["pss_mb"] <= m["rss_mb"]
            assert 0 < m["anonymous_mb"] <= m["rss_mb"]
        assert memory["total_pss_mb"] == pytest.approx(sum(m["pss_mb"] for m in processes))
    one, two = serve["settings"].values()
    assert serve["extra_worker_mb"] == pytest.approx(two["memory"]["total_pss_mb"] - one["memory"]["total_pss_mb"])
    assert serve["weights_mb"] == pytest.approx((tiny_model / "model.safetensors").stat().st_size / 1e6)


def test_acceptance_and_table_follow_the_numbers(report):
    checks = {check["check"]: check for check in report["acceptance"]}
    ratio = checks["nprerank batch / the library in a loop (pairs/s)"]
    assert ratio["status"] == ("PASS" if report["batch"]["ratio"] >= bench_scale.RATIO_BAR else "FAIL")
    assert ratio["value"] == f"{report['batch']['ratio']:.3f}x"
    assert checks["the job's scores equal the loop's"]["status"] == "PASS"
    for name in report["serve"]["settings"]:
        assert checks[f"serve {name}: every answer right"]["status"] == "PASS"
    memory = checks["an extra worker's memory (total Pss, 2 workers - 1)"]
    serve = report["serve"]
    assert memory["status"] == ("PASS" if serve["extra_worker_mb"] < serve["weights_mb"] else "FAIL")
    table = bench_scale.format_report(report)
    assert f"batch / loop {report['batch']['ratio']:.2f}x" in table
    assert f"an extra worker: {serve['extra_worker_mb']:.0f} MB" in table
    assert sum(line.lstrip().startswith(("PASS", "FAIL", "N/A")) for line in table.splitlines()) == len(checks)
    # flipping a number flips its line: the acceptance is computed, not written down
    slower = {**report, "batch": {**report["batch"], "ratio": 0.5}}
    assert bench_scale.acceptance(slower)[0]["status"] == "FAIL"


class FakeServer(http.server.BaseHTTPRequestHandler):
    """Answers /rerank with fixed scores, or 500 for a query holding "fail"."""

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if "fail" in body["query"]:
            self.send_error(500)
            return
        answer = json.dumps([{"index": i, "score": 0.5} for i in range(len(body["texts"]))]).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


def test_the_load_check_catches_wrong_and_lost_answers():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), FakeServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        plans = [
            [{"query": "right", "texts": ["a", "b"]}, {"query": "off", "texts": ["a", "b"]}],
            [{"query": "fail", "texts": ["a"]}, {"query": "too few", "texts": ["a", "b", "c"]}],
        ]
        expected = [[np.array([0.5, 0.5]), np.array([0.5, 0.5 + 1e-3])], [np.array([0.5]), np.array([0.5, 0.5])]]
        check = bench_scale.run_load(url, plans, expected)
    finally:
        server.shutdown()
    assert (check["sent"], check["answered"], check["lost"], check["wrong"]) == (4, 3, 1, 2)
    assert check["max_score_difference"] == pytest.approx(1e-3)


def test_bad_sizes_are_one_line_errors(tiny_model):
    for flag, value in (
        ("--scale-batch", "5x"),
        ("--scale-batch", "0x3"),
        ("--scale-load", "4x3"),
        ("--scale-load", "axbxc"),
    ):
        done = subprocess.run(
            [sys.executable, "-m", "nprerank", "bench", "--scale", "--model", str(tiny_model), flag, value],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 2, done.stderr
        assert f"argument {flag}: '{value}' is not" in done.stderr and "Traceback" not in done.stderr
