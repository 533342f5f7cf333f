"""`nprerank batch --ray` and nprerank.ray.RerankActor on a local Ray cluster the test starts.

The Ray run must give the local run's results bit for bit: the same files, byte for byte, in
both output formats, with more than one actor and more than one block in play. The actor class
is also used as users would use it, in a Ray Data pipeline of their own.
"""

import json

import numpy as np
import pytest

ray = pytest.importorskip("ray")

from test_batch import batch_cli, interrupted_after, jsonl_records, trec_trio, write_jsonl  # noqa: E402

from nprerank import Reranker, batch  # noqa: E402
from nprerank import ray as nprerank_ray  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


def test_ray_gives_the_local_results_bit_for_bit(cluster, tmp_path, tiny_model, monkeypatch):
    monkeypatch.setattr(nprerank_ray, "ROWS_PER_BLOCK", 5)  # several blocks, so both actors take some
    write_jsonl(tmp_path / "in.jsonl", jsonl_records(23, seed=7))
    trio = trec_trio(tmp_path, n_queries=7, queries_format="jsonl")
    inputs = {
        "jsonl": [tmp_path / "in.jsonl"],
        "trec": [
            "--run",
            trio["run"],
            "--queries",
            trio["queries_path"],
            "--corpus",
            trio["corpus_path"],
            "--depth",
            9,
        ],
    }
    for name, args in inputs.items():
        for output_format in ("jsonl", "trec"):
            common = [*args, "--model", tiny_model, "--format", output_format, "--batch-size", 4]
            local, remote = tmp_path / f"{name}.local.{output_format}", tmp_path / f"{name}.ray.{output_format}"
            assert batch_cli(*common, "-o", local) == 0
            assert batch_cli(*common, "-o", remote, "--ray", "--concurrency", 2) == 0
            assert local.stat().st_size > 0
            assert remote.read_bytes() == local.read_bytes(), (name, output_format)
            assert json.loads(remote.with_name(remote.name + ".progress").read_text())["done"]


def test_ray_run_resumes_a_local_run(cluster, tmp_path, tiny_model, monkeypatch):
    """The .progress protocol is the same on both paths: a run cut short locally finishes on Ray."""
    from nprerank import batch

    write_jsonl(tmp_path / "in.jsonl", jsonl_records(12, seed=8, docs=(1, 4)))
    common = [tmp_path / "in.jsonl", "--model", tiny_model, "--batch-size", 2]
    assert batch_cli(*common, "-o", tmp_path / "whole.jsonl") == 0
    monkeypatch.setattr(batch, "local_scores", interrupted_after(6))
    assert batch_cli(*common, "-o", tmp_path / "cut.jsonl") == 130
    assert batch_cli(*common, "-o", tmp_path / "cut.jsonl", "--ray") == 0
    assert (tmp_path / "cut.jsonl").read_bytes() == (tmp_path / "whole.jsonl").read_bytes()


def test_the_actor_in_a_users_own_pipeline(cluster, tiny_model):
    records = [r for r in jsonl_records(9, seed=9) if r["documents"]]
    rows = [
        {"query": r["query"], "documents": [d["text"] if isinstance(d, dict) else d for d in r["documents"]]}
        for r in records
    ]
    dataset = ray.data.from_items(rows).map_batches(
        nprerank_ray.RerankActor,
        fn_constructor_kwargs={"model": str(tiny_model), "threads": 1},
        batch_format="pyarrow",
        batch_size=3,
        num_cpus=1,
        compute=ray.data.ActorPoolStrategy(size=2),
    )

    def position(row):  # take_all's order is Ray's; put the rows back in ours
        return rows.index({"query": row["query"], "documents": list(row["documents"])})

    scored = sorted(dataset.take_all(), key=position)
    reranker = Reranker.from_pretrained(tiny_model)
    for row, expected in zip(scored, rows):
        logits = reranker.logits([(expected["query"], d) for d in expected["documents"]])
        assert np.array_equal(np.asarray(row["logits"], dtype=np.float32), logits)


@pytest.mark.parametrize("name", ["empty-model", "no-such-model"])
def test_a_model_that_cannot_load_is_one_line_before_ray_starts(tmp_path, tiny_model, capsys, monkeypatch, name):
    """A folder the driver can see (or, for the local cluster it starts, any path) is loaded here
    first: its error is one line, and Ray, which would print every actor's traceback, never starts."""
    write_jsonl(tmp_path / "in.jsonl", jsonl_records(2, docs=(1, 2)))
    (tmp_path / "empty-model").mkdir()
    monkeypatch.setattr(nprerank_ray, "scores", lambda *a, **k: pytest.fail("Ray started for a broken model"))
    assert batch_cli(tmp_path / "in.jsonl", "-o", tmp_path / "out.jsonl", "--model", tmp_path / name, "--ray") == 1
    err = capsys.readouterr().err
    assert err.startswith("nprerank: error:") and err.count("\n") == 1 and name in err, err


def test_a_model_the_actors_cannot_load_is_one_line(cluster, tmp_path, tiny_model, capsys, monkeypatch):
    """Where the driver cannot see the model (a path only the workers have), the actors' failure
    comes back as the local job's one line."""
    write_jsonl(tmp_path / "in.jsonl", jsonl_records(2, docs=(1, 2)))
    (tmp_path / "empty-model").mkdir()
    monkeypatch.setattr(batch, "check_model_here", lambda *a, **k: None)  # as if the driver could not see it
    assert (
        batch_cli(tmp_path / "in.jsonl", "-o", tmp_path / "out.jsonl", "--model", tmp_path / "empty-model", "--ray")
        == 1
    )
    err = capsys.readouterr().err
    assert err.startswith("nprerank: error: the Ray job failed:") and err.count("\n") == 1, err
    assert "empty-model: missing config.json" in err and "Traceback" not in err


def test_a_cluster_address_nobody_answers_at_is_one_line(tmp_path, tiny_model):
    """Not the module's cluster: a fresh process, as a user runs it, given an address with no Ray."""
    import socket
    import subprocess
    import sys

    write_jsonl(tmp_path / "in.jsonl", jsonl_records(1))
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "nprerank",
                "batch",
                str(tmp_path / "in.jsonl"),
                "-o",
                str(tmp_path / "out.jsonl"),
                "--model",
                str(tiny_model),
                "--ray",
                address,
            ],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 1, done.stderr
        assert (
            done.stderr == f"nprerank: error: no Ray cluster answers at {address} (Connection refused): start one "
            "(`ray start --head`), or drop ADDRESS to run on a local Ray\n"
        )
