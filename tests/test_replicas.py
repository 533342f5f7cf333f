"""`nprerank serve --workers N`: processes on one port, the probes, and a graceful stop.

What a load balancer relies on: /health says 200 only once the workers have loaded the model,
every request sent before SIGTERM gets its whole answer, the stop ends with exit 0, and a
worker that cannot load the model stops the service with an error instead of restarting forever.
"""

import concurrent.futures
import random
import signal
import subprocess
import sys
import time

import httpx
import numpy as np
import psutil
import pytest

from test_server import Server, free_port

from nprerank import Reranker

WORDS = "the panda bear eats bamboo in the mountain forest of china giant river search engine".split()


def workers_of(process: subprocess.Popen) -> list:
    """The server processes a --workers parent started (not multiprocessing's resource tracker)."""
    found = []
    for child in psutil.Process(process.pid).children():
        try:
            if "spawn_main" in " ".join(child.cmdline()):
                found.append(child)
        except (psutil.ZombieProcess, psutil.NoSuchProcess):  # a killed worker not reaped yet
            pass
    return found


def accepted(workers: list, port: int) -> int:
    """Connections to `port` that the workers have accepted (open sockets they hold)."""
    return sum(
        1
        for w in workers
        for c in w.net_connections(kind="tcp")
        if c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED
    )


def test_workers_share_the_port_and_finish_in_flight_requests_on_sigterm(tmp_path, tiny_model):
    server = Server(["--model", str(tiny_model), "--workers", "2"], tmp_path / "log")
    try:
        server.wait()
        workers = workers_of(server.process)
        assert len(workers) == 2, server.log()
        rng = random.Random(0)
        requests = [
            {
                "query": " ".join(rng.choices(WORDS, k=4)),
                "texts": [" ".join(rng.choices(WORDS, k=rng.randint(5, 60))) for _ in range(150)],
            }
            for _ in range(12)
        ]
        with concurrent.futures.ThreadPoolExecutor(len(requests)) as pool:
            futures = [
                pool.submit(httpx.post, server.url + "/rerank", json={**body, "raw_scores": True}, timeout=120)
                for body in requests
            ]
            # stop once every request is in a worker's hands (accepted); one still in the kernel's
            # backlog is not in flight yet: the load balancer's drain (docs/scale.md) covers those
            deadline = time.monotonic() + 60
            while accepted(workers, server.port) < len(requests) and time.monotonic() < deadline:
                time.sleep(0.01)
            server.process.send_signal(signal.SIGTERM)
            answers = [future.result() for future in futures]
        assert server.process.wait(timeout=60) == 0, server.log()
        assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers)
    finally:
        server.stop()
    reranker = Reranker.from_pretrained(tiny_model)
    for body, answer in zip(requests, answers):
        assert answer.status_code == 200, answer.text
        scores = {hit["index"]: hit["score"] for hit in answer.json()}
        logits = reranker.logits([(body["query"], text) for text in body["texts"]])
        assert np.allclose([scores[i] for i in range(len(body["texts"]))], logits, atol=1e-5)


def test_a_killed_worker_is_replaced(tmp_path, tiny_model):
    server = Server(["--model", str(tiny_model), "--workers", "2"], tmp_path / "log")
    try:
        server.wait()
        first = workers_of(server.process)
        first[0].kill()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            now = workers_of(server.process)
            if len(now) == 2 and first[0].pid not in {p.pid for p in now}:
                break
            time.sleep(0.1)
        assert len(now) == 2 and first[0].pid not in {p.pid for p in now}, server.log()
        server.wait()
        answer = httpx.post(server.url + "/rerank", json={"query": "panda", "texts": ["a bear"]}, timeout=60)
        assert answer.status_code == 200, answer.text
    finally:
        assert server.stop() == 0, server.log()


def test_a_model_that_does_not_load_stops_every_worker(tmp_path):
    """A folder that holds the model's files but does not load (a broken config.json) fails in
    the process that prepares the caches, before any worker starts. (A folder that does not exist
    is refused earlier still: test_server.py's test_a_model_that_cannot_load_fails_before...)"""
    broken = tmp_path / "broken-model"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json", "model.safetensors"):
        (broken / name).write_text("{")
    port = free_port()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "nprerank",
            "serve",
            "--workers",
            "2",
            "--port",
            str(port),
            "--model",
            str(broken),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr
    assert "config.json" in done.stderr and f"the model {broken} could not be loaded" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_port_in_use_is_one_clear_error(tmp_path, tiny_model, workers):
    """One line and exit 1, with one worker as with several: the port is bound before the model
    loads (no uvicorn log, no wasted load)."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        command = [sys.executable, "-m", "nprerank", "serve", "--workers", workers, "--port", str(port)]
        done = subprocess.run(command + ["--model", str(tiny_model)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 1
    message = done.stderr.strip()
    assert "\n" not in message and message.endswith(f"cannot listen on 127.0.0.1:{port}: Address already in use"), (
        done.stderr
    )


def test_a_worker_accepts_nothing_until_it_can_score(tmp_path, tiny_model):
    """No connection reaches a worker that would answer 503 "loading": the warm-up after the load
    (Numba's kernels loaded or compiled, seconds on a busy machine) is made slow here, in every
    worker, by a sitecustomize the spawned interpreters import, and /health is asked meanwhile."""
    import os

    (tmp_path / "slow").mkdir()
    (tmp_path / "slow" / "sitecustomize.py").write_text(
        "import time\nimport nprerank.startup as startup\nreal = startup.warm_up\n"
        "def slow(reranker, say=startup._to_stderr):\n    time.sleep(3)\n    return real(reranker, say)\n"
        "startup.warm_up = slow\n"
    )
    path = os.pathsep.join([str(tmp_path / "slow"), os.environ.get("PYTHONPATH", "")])
    server = Server(["--model", str(tiny_model), "--workers", "2"], tmp_path / "log", env={"PYTHONPATH": path})
    statuses = []
    try:
        deadline = time.monotonic() + 120
        while 200 not in statuses and time.monotonic() < deadline:
            assert server.process.poll() is None, server.log()
            try:
                statuses.append(httpx.get(server.url + "/health", timeout=60).status_code)
            except httpx.TransportError:  # not bound yet
                time.sleep(0.05)
        assert statuses and set(statuses) == {200}, statuses
        body = {"query": "panda", "texts": ["a bear", "a cat"]}
        answers = [httpx.post(server.url + "/rerank", json=body, timeout=60) for _ in range(4)]
        assert [a.status_code for a in answers] == [200] * 4, [a.text for a in answers]
    finally:
        server.stop()
