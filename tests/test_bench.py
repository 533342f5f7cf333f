"""`nprerank bench` on the tiny model with --quick workloads: the report's structure and arithmetic.

No timing is asserted (the machine is shared and noisy); what is checked is that every engine is
either measured or skipped with a reason, that the engines agree on the logits, that the ratios
and GFLOP/s follow from the measured times, and that bad input gets a one-line error.
"""

import json
import statistics
import subprocess
import sys

import numpy as np
import pytest

from nprerank import bench
from nprerank.config import ModelConfig


def run_bench(*args, hide=()):
    """`python -m nprerank.bench ARGS` in a fresh process (it sets thread counts process-wide)."""
    # a module set to None in sys.modules is "not installed" to importlib.util.find_spec
    code = (
        f"import sys; sys.modules.update(dict.fromkeys({list(hide)!r})); "
        "from nprerank.bench import main; sys.exit(main())"
    )
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def report(tiny_model):
    done = run_bench("--model", tiny_model, "--quick", "--repeats", "2", "--no-startup", "--json")
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_every_engine_is_measured_or_skipped_with_a_reason(report):
    assert set(report["engines"]) == set(bench.ENGINES)
    for name, state in report["engines"].items():
        assert state["status"] in ("ok", "skipped"), name
        if state["status"] == "skipped":
            assert state["reason"], name
    measured = {name for name, state in report["engines"].items() if state["status"] == "ok"}
    assert {"nprerank-fast", "nprerank-reference"} <= measured
    assert set(report["workloads"]) == set(bench.DEFAULT_WORKLOADS)
    for workload in report["workloads"].values():
        assert set(workload["results"]) == measured


def test_engines_agree_with_the_reference(report):
    for workload_name, workload in report["workloads"].items():
        for engine, result in workload["results"].items():
            difference = result["max_abs_logit_diff_vs_reference"]
            tau = result["kendall_tau_vs_reference"]
            assert tau is None or -1 <= tau <= 1
            assert (tau is None) == (workload["pairs"] == 1)
            if engine in bench.REDUCED:  # reported, not judged: int8 and bf16 differ by design
                assert result["agrees"] is None and np.isfinite(difference), engine
                continue
            assert result["agrees"] and difference <= 1e-4, (
                f"{engine} on {workload_name}: max |dlogit| {difference:.2e}"
            )
            assert tau is None or tau == 1.0
        assert workload["results"]["nprerank-reference"]["max_abs_logit_diff_vs_reference"] == 0.0


def test_kendall_tau():
    assert bench.kendall_tau([1, 2, 3], [10, 20, 30]) == 1.0
    assert bench.kendall_tau([1, 2, 3], [30, 20, 10]) == -1.0
    assert bench.kendall_tau([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(4 / 6)  # one of six pairs swapped


def test_int8_bars_are_judged_from_the_results(report):
    """Issue 12's checks appear once nprerank-int8 ran; each is PASS, FAIL or N/A with a reason."""
    checks = [c for c in report["acceptance"] if c["check"].startswith("nprerank-int8")]
    if report["engines"]["nprerank-int8"]["status"] != "ok":
        assert not checks
        return
    assert len(checks) == len(bench.INT8_SPEED_BARS) + 4
    for check in checks:
        assert check["status"] in ("PASS", "FAIL", "N/A") and (check["status"] != "N/A" or check["why"])


def test_bf16_bars_are_judged_from_the_results(report):
    """Issue 12's bf16 speed bars appear once nprerank-bf16 ran, judged from the medians."""
    checks = [c for c in report["acceptance"] if c["check"].startswith("nprerank-bf16")]
    if report["engines"]["nprerank-bf16"]["status"] != "ok":
        assert not checks
        return
    assert [c["check"] for c in checks] == [f"nprerank-bf16 / {peer} on {w}" for w, peer, _ in bench.BF16_SPEED_BARS]
    results = report["workloads"]["rerank-100"]["results"]
    for check, (_, peer, bar) in zip(checks, bench.BF16_SPEED_BARS):
        if peer not in results:
            assert check["status"] == "N/A" and check["why"]
            continue
        ratio = results["nprerank-bf16"]["pairs_per_s"]["median"] / results[peer]["pairs_per_s"]["median"]
        assert check["status"] == ("PASS" if ratio >= bar else "FAIL") and check["value"] == f"{ratio:.2f}x"


def test_rates_ratios_and_flops_follow_from_the_times(report, tiny_model):
    config = ModelConfig.from_json(tiny_model / "config.json")
    for name, workload in report["workloads"].items():
        fast = workload["results"]["nprerank-fast"]["pairs_per_s"]["median"]
        assert workload["pairs"] * workload["calls"] > 0
        assert workload["min_tokens"] <= workload["max_tokens"] <= config.max_tokens
        for engine, result in workload["results"].items():
            rates = result["pairs_per_s"]
            assert len(result["seconds"]) == report["repeats"] == len(rates["runs"])
            assert rates["runs"] == pytest.approx(
                [workload["pairs"] * workload["calls"] / s for s in result["seconds"]]
            )
            assert rates["median"] == pytest.approx(statistics.median(rates["runs"]))
            assert rates["min"] == pytest.approx(min(rates["runs"]))
            assert result["fast_ratio"] == pytest.approx(fast / rates["median"]), (name, engine)
            assert result["gflops"] == pytest.approx(
                workload["useful_gflop_per_run"] / statistics.median(result["seconds"])
            )
            assert result["ceiling_fraction"] == pytest.approx(
                result["gflops"] / report["machine"]["sgemm_gflops"]["median"]
            )
            assert result["peak_anonymous_mb"] > 1  # the worker's private memory while it ran: never missing
        assert workload["results"]["nprerank-fast"]["fast_ratio"] == pytest.approx(1.0)
    assert report["machine"]["sgemm_gflops"]["median"] > 0
    assert report["machine"]["blas"]["name"]


def test_quick_workloads_have_the_lengths_they_promise(tiny_model):
    from nprerank.reranker import Reranker

    tokenizer = Reranker.from_pretrained(tiny_model, engine="reference").tokenizer
    max_tokens = ModelConfig.from_json(tiny_model / "config.json").max_tokens
    for workload in bench.make_workloads(list(bench.WORKLOADS), max_tokens, quick=True):
        bench.tokenize(workload, tokenizer)
        assert [len(ids) for ids in workload.sequences] == workload.lengths
        assert all(ids[0] == 0 and ids[-1] == 2 for ids in workload.sequences)  # <s> ... </s>
    full = bench.make_workloads(["rerank-100", "long", "single"], 512, quick=False)
    assert [len(w.lengths) for w in full] == [100, 16, 1]
    assert 40 <= min(full[0].lengths) and max(full[0].lengths) <= 250 and full[1].lengths == [512] * 16


def test_useful_flops_counts_every_matrix_product():
    config = ModelConfig()  # bge-reranker-base
    T, C, F = 100, 768, 3072
    per_layer = 4 * (2 * T * C * C) + 2 * (2 * T * C * F) + 2 * (2 * T * T * C)
    assert bench.useful_flops(T, config) == 12 * per_layer + 2 * C * C + 2 * C
    assert bench.useful_flops(200, config) > 2 * bench.useful_flops(100, config)  # attention grows as T^2


def test_padded_batches_sort_longest_first_and_mask_only_padding():
    sequences = [[0, 5, 2], [0, 5, 6, 7, 8, 2], [0, 2], [0, 9, 9, 2]]
    batches = list(bench.padded_batches(sequences, 2, pad_token_id=1))
    assert [list(positions) for positions, _, _ in batches] == [[1, 3], [0, 2]]
    for positions, ids, mask in batches:
        assert ids.shape == mask.shape and ids.shape[1] == len(sequences[positions[0]])
        for row, i in enumerate(positions):
            assert ids[row, : len(sequences[i])].tolist() == sequences[i]
            assert mask[row].sum() == len(sequences[i]) and np.all(ids[row][mask[row] == 0] == 1)


def test_fresh_process_start_and_memory_and_acceptance_lines(tiny_model):
    done = run_bench(
        "--model",
        tiny_model,
        "--quick",
        "--repeats",
        "1",
        "--workloads",
        "single",
        "--engines",
        "nprerank-fast,nprerank-reference",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert set(report["startup"]) == {"nprerank-fast", "nprerank-reference"}
    fast = report["startup"]["nprerank-fast"]
    for row in (fast, fast["cold"], report["startup"]["nprerank-reference"]):
        assert 0 < row["first_score_s"] < 300
        assert 0 < row["peak_anonymous_mb"] <= row["peak_rss_mb"]
        assert row["end_anonymous_mb"] <= row["peak_anonymous_mb"] + 1

    statuses = {check["check"]: check["status"] for check in report["acceptance"]}
    assert len(statuses) == len(bench.SPEED_BARS) + 4
    assert statuses["nprerank-fast peak private (anonymous) memory on long-8192"] == "N/A"  # not run
    # speed bars against engines that were not run are N/A, never PASS; the fresh-process ones are judged
    assert statuses["nprerank-fast / onnxruntime on rerank-100"] == "N/A"
    assert {statuses[f"nprerank-fast {name}"] for name in ("peak RSS", "cached start to first score")} <= {
        "PASS",
        "FAIL",
    }
    peak_rss = next(c for c in report["acceptance"] if c["check"] == "nprerank-fast peak RSS")
    assert peak_rss["status"] == ("PASS" if fast["peak_rss_mb"] <= bench.PEAK_RSS_BAR_MB else "FAIL")

    table = bench.format_report(report)
    for label in (
        "nprerank-fast (cold: compiling)",
        "nprerank-fast (cached)",
        "nprerank-reference",
        "N/A   nprerank-fast / onnxruntime on rerank-100",
        "sgemm ceiling",
        "kernel",
    ):
        assert label in table


def test_the_long_pair_is_judged_on_the_private_memory_of_its_run(tiny_model):
    done = run_bench(
        "--model",
        tiny_model,
        "--quick",
        "--repeats",
        "1",
        "--workloads",
        "long-8192",
        "--engines",
        "nprerank-fast",
        "--no-startup",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    peak = report["workloads"]["long-8192"]["results"]["nprerank-fast"]["peak_anonymous_mb"]
    check = next(c for c in report["acceptance"] if c["check"].endswith("memory on long-8192"))
    assert check["value"] == f"{peak:.0f} MB"
    assert check["status"] == ("PASS" if peak <= bench.LONG_PRIVATE_BAR_MB else "FAIL")
    assert "peak anon MB" in bench.format_report(report)


def test_startup_only_measures_fresh_processes_and_nothing_else(tiny_model):
    done = run_bench("--model", tiny_model, "--quick", "--startup-only", "--engines", "nprerank-fast", "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["workloads"] == {} and set(report["startup"]) == {"nprerank-fast"}
    fast = report["startup"]["nprerank-fast"]
    assert 0 < fast["first_score_s"] < 300 and 0 < fast["cold"]["peak_anonymous_mb"] <= fast["cold"]["peak_rss_mb"]
    statuses = {check["check"]: check["status"] for check in report["acceptance"]}
    assert statuses["nprerank-fast / onnxruntime on rerank-100"] == "N/A"
    assert statuses["nprerank-fast peak RSS"] in ("PASS", "FAIL")
    assert "nprerank-fast (cached)" in bench.format_report(report)
    both = run_bench("--model", tiny_model, "--startup-only", "--no-startup")
    assert both.returncode == 2 and "not allowed with" in both.stderr


def test_a_missing_engine_is_reported_as_skipped(tiny_model):
    done = run_bench(
        "--model",
        tiny_model,
        "--quick",
        "--repeats",
        "1",
        "--workloads",
        "single",
        "--no-startup",
        "--engines",
        "nprerank-fast,onnxruntime",
        "--json",
        hide=["onnxruntime"],
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["engines"]["onnxruntime"]["status"] == "skipped"
    assert "onnxruntime not installed" in report["engines"]["onnxruntime"]["reason"]
    assert set(report["workloads"]["single"]["results"]) == {"nprerank-fast"}
    assert report["engines"]["nprerank-reference"]["note"]  # still loaded, to check the logits


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/nonexistent/model"], "/nonexistent/model: no such model folder"),
        (["--random", "--model", "x"], "not allowed with argument"),
        (["--model", "x", "--engines", "nprerank-fast,bogus"], "bogus not among"),
        (["--model", "x", "--threads", "0"], "expected an integer >= 1"),
        (["--model", "x", "--outliers"], "--outliers shapes the --random model only"),
        (["--model", "x", "--engines", "nprerank-int4"], "nprerank-int4 not among"),
        ([], "one of the arguments --model/-m --random --random-shape is required"),
    ],
)
def test_bad_input_gets_a_one_line_error(args, message):
    done = run_bench(*args)
    assert done.returncode == (1 if "model folder" in message else 2), done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
