"""The `nprerank` command line, run as users run it: in a subprocess (`python -m nprerank` and the
installed `nprerank` script). Output is checked against the library's own `Reranker.rerank` on
the tiny test model; every error must be one line on stderr with the documented exit code
(0 ok, 1 runtime error, 2 usage error, 130 interrupted).
"""

import json
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import nprerank
from nprerank import Reranker
from nprerank.precisions import NAMES as PRECISION_NAMES

QUERY = "what is panda?"
CONTEXTS = [
    "hi",
    "The giant panda (Ailuropoda melanoleuca) is a bear species endemic to China.",
    "a cyberpunk lizard",
    "熊猫 是 一种 生活 在 中国 的 熊",
    "pandas eat bamboo in the mountains",
]


def run(*args, input=None, env=None, script=False, timeout=300, cwd=None):
    """Run the CLI; `input` as str (sent as UTF-8) or bytes; bytes arguments reach the process as
    they are (as a shell passes $'\\xff'). stdout and stderr come back decoded, byte for byte."""
    command = [shutil.which("nprerank")] if script else [sys.executable, "-m", "nprerank"]
    # offline unless a test says otherwise: a test must never reach the real Hub
    full_env = {key: value for key, value in os.environ.items() if key != "NPRERANK_MODEL"}
    full_env.update({"HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1", **(env or {})})
    arguments = [a if isinstance(a, bytes) else str(a) for a in args]
    result = subprocess.run(
        command + arguments,
        input=input.encode() if isinstance(input, str) else input,
        capture_output=True,
        env=full_env,
        timeout=timeout,
        cwd=cwd,
        stdin=None if input is not None else subprocess.DEVNULL,
    )
    result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
    return result


def assert_error(result, code: int, *phrases):
    """One line on stderr, `nprerank: error: ...`, the right exit code, nothing on stdout."""
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("nprerank: error: "), lines[0]
    assert "Traceback" not in result.stderr
    for phrase in phrases:
        assert phrase in lines[0], (phrase, lines[0])
    assert result.stdout == ""


@pytest.fixture(scope="module")
def expected(tiny_model):
    reranker = Reranker.from_pretrained(tiny_model)
    return reranker.rerank(QUERY, [{"text": t} for t in CONTEXTS])


def parse_table(stdout: str) -> list:
    header, *rows = stdout.splitlines()
    assert header.split() == ["rank", "id", "score", "text"]
    parsed = []
    for row in rows:
        rank, index, score, text = row.split(maxsplit=3)
        parsed.append({"rank": int(rank), "id": int(index), "score": float(score), "text": text})
    return parsed


def assert_same_ranking(got: list, expected: list, tolerance: float = 1e-6):
    assert [hit["id"] for hit in got] == [hit["id"] for hit in expected]
    for hit, want in zip(got, expected):
        assert abs(hit["score"] - want["score"]) <= tolerance, (hit, want)


def test_table_is_the_library_ranking_best_first(tiny_model, expected):
    result = run("rerank", QUERY, *CONTEXTS, "--model", tiny_model)
    assert result.returncode == 0, result.stderr
    rows = parse_table(result.stdout)
    assert [row["rank"] for row in rows] == list(range(1, len(CONTEXTS) + 1))
    assert_same_ranking(rows, expected, tolerance=5e-7 + 1e-9)  # printed with 6 decimals
    assert all(rows[i]["score"] >= rows[i + 1]["score"] for i in range(len(rows) - 1))
    for row in rows:
        assert row["text"] == CONTEXTS[row["id"]]


def test_json_output_and_top_k(tiny_model, expected):
    result = run("rerank", QUERY, *CONTEXTS, "--model", tiny_model, "--json", "--top-k", "2")
    assert result.returncode == 0, result.stderr
    response = json.loads(result.stdout)["response"]
    assert_same_ranking(response, expected[:2])
    assert [hit["text"] for hit in response] == [CONTEXTS[hit["id"]] for hit in expected[:2]]


def test_long_text_preview_is_cut_to_one_line(tiny_model):
    long_text = "pandas eat bamboo\nin the mountains " * 20
    result = run("rerank", QUERY, long_text, "short", "--model", tiny_model, env={"COLUMNS": "60"})
    assert result.returncode == 0, result.stderr
    rows = result.stdout.splitlines()
    assert len(rows) == 3 and all(len(row) <= 60 for row in rows), rows
    assert any(row.endswith("...") for row in rows)


def test_model_options_reach_the_reranker(tiny_model):
    # a short max_length with chunking: the CLI must score exactly as the library does with them
    long_context = " ".join(CONTEXTS * 6)
    contexts = [long_context, CONTEXTS[1], CONTEXTS[2]]
    for options, flags in [
        (dict(max_length=24, long_documents="chunk"), ["--max-length", "24", "--long-documents", "chunk"]),
        (dict(max_length=24, truncation="longest_first"), ["--max-length", "24", "--truncation", "longest_first"]),
        (dict(precision="int8"), ["--precision", "int8"]),
    ]:
        want = Reranker.from_pretrained(tiny_model, **options).rerank(QUERY, [{"text": t} for t in contexts])
        result = run("rerank", QUERY, *contexts, "--model", tiny_model, "--json", "--threads", "1", *flags)
        assert result.returncode == 0, result.stderr
        assert_same_ranking(json.loads(result.stdout)["response"], want)
    default = Reranker.from_pretrained(tiny_model, max_length=24).rerank(QUERY, [{"text": t} for t in contexts])
    chunked = json.loads(
        run(
            "rerank",
            QUERY,
            *contexts,
            "--model",
            tiny_model,
            "--json",
            "--max-length",
            "24",
            "--long-documents",
            "chunk",
        ).stdout
    )["response"]
    assert {h["id"]: h["score"] for h in default}[0] != {h["id"]: h["score"] for h in chunked}[0]


def test_model_from_environment(tiny_model, expected):
    result = run("rerank", QUERY, *CONTEXTS, "--json", env={"NPRERANK_MODEL": str(tiny_model)})
    assert result.returncode == 0, result.stderr
    assert_same_ranking(json.loads(result.stdout)["response"], expected)


def test_stdin_plain_lines_and_json(tiny_model, expected):
    result = run("rerank", QUERY, "--model", tiny_model, "--json", input="\n".join(CONTEXTS) + "\n\n")
    assert result.returncode == 0, result.stderr
    assert_same_ranking(json.loads(result.stdout)["response"], expected)
    result = run("rerank", QUERY, "--model", tiny_model, "--json", input=json.dumps(CONTEXTS))
    assert result.returncode == 0, result.stderr
    assert_same_ranking(json.loads(result.stdout)["response"], expected)


@pytest.mark.parametrize("form", ["strings", "objects", "cloudflare", "jsonl", "jsonl-strings"])
def test_file_inputs(tiny_model, expected, tmp_path, form):
    query = [QUERY]
    if form == "strings":
        path, text = tmp_path / "c.json", json.dumps(CONTEXTS)
    elif form == "objects":
        path, text = tmp_path / "c.json", json.dumps([{"text": t} for t in CONTEXTS])
    elif form == "cloudflare":  # the query and top_k may come from the body
        path, query = tmp_path / "body.json", []
        text = json.dumps({"query": QUERY, "contexts": [{"text": t} for t in CONTEXTS], "top_k": 3})
    elif form == "jsonl":
        path, text = tmp_path / "c.jsonl", "\n".join(json.dumps({"text": t, "source": "x"}) for t in CONTEXTS)
    else:
        path, text = tmp_path / "c.jsonl", "\n".join(json.dumps(t) for t in CONTEXTS) + "\n"
    path.write_text(text, encoding="utf-8")
    result = run("rerank", *query, "--file", path, "--model", tiny_model, "--json")
    assert result.returncode == 0, result.stderr
    assert_same_ranking(json.loads(result.stdout)["response"], expected[:3] if form == "cloudflare" else expected)


def test_script_and_module_agree(tiny_model):
    if shutil.which("nprerank") is None:
        pytest.skip("the nprerank script is not installed (pip install -e .)")
    args = ("rerank", QUERY, *CONTEXTS, "--model", tiny_model)
    via_script, via_module = run(*args, script=True), run(*args)
    assert via_script.returncode == via_module.returncode == 0, via_script.stderr
    assert via_script.stdout == via_module.stdout


@pytest.mark.parametrize(
    "args,code,phrases",
    [
        (["rerank", "", "a"], 2, ["query is empty"]),
        (["rerank", "   ", "a"], 2, ["query is empty"]),
        (["rerank", QUERY], 2, ["no contexts"]),
        (["rerank"], 2, ["QUERY is required"]),
        (["rerank", QUERY, "a", "--top-k", "0"], 2, ["--top-k", "'0'"]),
        (["rerank", QUERY, "a", "--top-k", "-3"], 2, ["--top-k"]),
        (["rerank", QUERY, "a", "--top-k", "two"], 2, ["--top-k", "'two'"]),
        (["rerank", QUERY, "a", "--top-k", "1.5"], 2, ["--top-k"]),
        (["rerank", QUERY, "a", "--truncation", "middle"], 2, ["--truncation"]),
        (["rerank", QUERY, "a", "--precision", "int4"], 2, ["--precision", "'int4'"]),
        (["rerank", QUERY, "a", "--bogus"], 2, ["unrecognized arguments: --bogus"]),
        (["frobnicate"], 2, ["frobnicate"]),
        ([], 2, ["COMMAND"]),
    ],
)
def test_usage_errors(tiny_model, args, code, phrases):
    assert_error(run(*args, "--model", tiny_model) if args[:1] == ["rerank"] else run(*args), code, *phrases)


def test_runtime_errors(tiny_model, tmp_path):
    assert_error(run("rerank", QUERY, "a", "--model", tmp_path / "missing"), 1, "no such model folder", "missing")
    assert_error(run("rerank", QUERY, "a", "--model", tmp_path), 1, "missing config.json")  # a folder, but not a model
    assert_error(run("rerank", QUERY, "a", "--model", tiny_model, "--max-length", "4000"), 1, "max_length")

    bad = tmp_path / "bad.json"
    bad.write_text('[{"text": "a"},', encoding="utf-8")
    assert_error(run("rerank", QUERY, "--file", bad, "--model", tiny_model), 1, "bad.json", "not valid JSON")
    bad.write_text('{"contexts": "a"}', encoding="utf-8")
    assert_error(run("rerank", QUERY, "--file", bad, "--model", tiny_model), 1, "bad.json", "contexts")
    bad.write_text('[{"text": 3}]', encoding="utf-8")
    assert_error(run("rerank", QUERY, "--file", bad, "--model", tiny_model), 1, "item 0", "'text' string")
    bad.write_text('["a", ""]', encoding="utf-8")
    assert_error(run("rerank", QUERY, "--file", bad, "--model", tiny_model), 1, "item 1 is empty")
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text('"a"\n"b"\n{"text": \n', encoding="utf-8")
    assert_error(run("rerank", QUERY, "--file", jsonl, "--model", tiny_model), 1, "line 3", "not valid JSON")
    assert_error(
        run("rerank", QUERY, "--file", tmp_path / "nope.json", "--model", tiny_model), 1, "nope.json", "no such file"
    )


def test_repo_id_with_nothing_cached_offline_fails_fast(tmp_path):
    start = time.perf_counter()
    result = run("rerank", QUERY, "a", env={"HF_HOME": str(tmp_path / "hf")})  # default model, HF_HUB_OFFLINE=1
    assert time.perf_counter() - start < 20  # includes starting Python
    assert_error(
        result,
        1,
        "BAAI/bge-reranker-base",
        "HF_HUB_OFFLINE",
        "`nprerank download BAAI/bge-reranker-base`",
        "`--model weights/`",
    )


def test_interrupt_exits_130_without_traceback(tiny_model):
    process = subprocess.Popen(
        [sys.executable, "-m", "nprerank", "rerank", QUERY, "--model", str(tiny_model)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # as a terminal's Ctrl-C finds it: a test run started in the background of a script
        # (`cmd &` without job control) ignores SIGINT, its children inherit that, and Python then
        # installs no KeyboardInterrupt handler at all (the reason this test failed in such runs)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    # wait until it is blocked reading its contexts from stdin (read(2) on fd 0), not a fixed
    # sleep: a signal that lands in the imports can be lost (CPython drops a KeyboardInterrupt
    # raised in an import lock's weakref callback, "Exception ignored")
    read = {"x86_64": "0", "aarch64": "63"}.get(platform.machine())
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if read is None:
                raise OSError("no syscall number for this machine")
            if Path(f"/proc/{process.pid}/syscall").read_text().startswith(f"{read} 0x0 "):
                break
        except OSError:  # no /proc (not Linux), or not allowed to read it: a pause instead
            time.sleep(1.5)
            break
        time.sleep(0.05)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr and stderr.strip() == "nprerank: interrupted"


def test_version_and_help():
    result = run("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"nprerank {nprerank.__version__}"
    result = run("--help")
    assert result.returncode == 0
    for word in ("rerank", "serve", "download", "bench", "examples:", 'nprerank rerank "Which one is cooler?"'):
        assert word in result.stdout, word
    result = run("rerank", "--help")
    assert result.returncode == 0
    for word in (
        "--top-k",
        "--json",
        "--file",
        "--model",
        "--threads",
        "--max-length",
        "--truncation",
        "--long-documents",
        "--precision",
        "JSONL",
        "stdin",
    ):
        assert word in result.stdout, word
    result = run("download", "--help")
    assert result.returncode == 0 and "--dir" in result.stdout


def test_serve_and_bench_help_come_from_their_modules():
    for command, module, flag in (("serve", "server", "--port"), ("bench", "bench", "--repeats")):
        try:
            __import__(f"nprerank.{module}")
        except ImportError as e:
            pytest.skip(f"nprerank.{module} cannot be imported here ({e})")
        result = run(command, "--help")
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith(f"usage: nprerank {command}") and flag in result.stdout
        assert_error(run(command, "--no-such-flag"), 2)  # argparse's usage error, as one line


def test_download_command_against_a_local_hub(tiny_model, tmp_path):
    from test_hub import REPO, FakeHub, model_files

    hub_server = FakeHub(model_files(tiny_model))
    env = {"HF_ENDPOINT": hub_server.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}
    try:
        result = run("download", REPO, "--dir", tmp_path / "weights", env=env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip() == str((tmp_path / "weights").resolve())
        assert (tmp_path / "weights" / "model.safetensors").read_bytes() == (
            tiny_model / "model.safetensors"
        ).read_bytes()
        # into the Hugging Face cache (HF_HOME), then used by repo id with the Hub gone
        result = run("download", REPO, env=env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip().startswith(str(tmp_path / "hf" / "hub" / "models--test-org--tiny-reranker"))
        assert_error(run("download", "test-org/unknown", env=env), 1, "test-org/unknown", "no such model")
    finally:
        hub_server.stop()
    offline_env = {**env, "HF_HUB_OFFLINE": "1"}
    from_cache = run("rerank", QUERY, *CONTEXTS, "--model", REPO, "--json", env=offline_env)
    from_folder = run("rerank", QUERY, *CONTEXTS, "--model", tiny_model, "--json")
    assert from_cache.returncode == 0, from_cache.stderr
    assert from_cache.stdout == from_folder.stdout
    assert_error(run("download", REPO, env=offline_env), 1, "HF_HUB_OFFLINE")


def test_reader_closing_the_pipe_early_is_not_an_error(tiny_model, tmp_path):
    # `nprerank rerank ... | head -3`: more output than a pipe holds, and the reader leaves
    contexts = tmp_path / "many.txt"
    contexts.write_text("\n".join(f"passage number {i} about pandas and bamboo" for i in range(3000)), encoding="utf-8")
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "nprerank",
            "rerank",
            QUERY,
            "--file",
            str(contexts),
            "--model",
            str(tiny_model),
            "--max-length",
            "32",
        ],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert process.stdout.readline().split() == ["rank", "id", "score", "text"]
    process.stdout.close()
    stderr = process.stderr.read()
    assert process.wait(timeout=120) == 0, stderr
    assert stderr == ""


# --- options of rerank ---------------------------------------------------------------------------


def test_raw_prints_the_library_logits_in_the_same_order(tiny_model, expected):
    logits = Reranker.from_pretrained(tiny_model).logits([(QUERY, text) for text in CONTEXTS])
    result = run("rerank", QUERY, *CONTEXTS, "--model", tiny_model, "--json", "--raw")
    assert result.returncode == 0, result.stderr
    response = json.loads(result.stdout)["response"]
    assert [hit["id"] for hit in response] == [hit["id"] for hit in expected]  # sigmoid keeps the order
    for hit in response:
        assert abs(hit["score"] - float(logits[hit["id"]])) <= 1e-6, (hit, logits)
    assert any(hit["score"] < 0 or hit["score"] > 1 for hit in response)  # logits, not probabilities
    table = run("rerank", QUERY, *CONTEXTS, "--model", tiny_model, "--raw").stdout
    assert table.splitlines()[0].split() == ["rank", "id", "logit", "text"]


@pytest.mark.parametrize(
    "flags,tolerance",
    [
        (["--engine", "reference"], 1e-4),  # the plain NumPy forward pass: the same scores within 1e-4
        (["--batch-size", "1"], 1e-5),  # one pair per forward pass instead of all five in one
        (["--engine", "fast", "--batch-size", "2"], 1e-5),
    ],
)
def test_engine_and_batch_size_give_the_same_scores(tiny_model, expected, flags, tolerance):
    result = run("rerank", QUERY, *CONTEXTS, "--model", tiny_model, "--json", *flags)
    assert result.returncode == 0, result.stderr
    assert_same_ranking(json.loads(result.stdout)["response"], expected, tolerance=tolerance)


@pytest.mark.parametrize(
    "flags,code,phrases",
    [
        (["--batch-size", "0"], 2, ["--batch-size", "'0'"]),
        (["--batch-size", "many"], 2, ["--batch-size", "'many'"]),
        (["--engine", "gpu"], 2, ["--engine", "'gpu'"]),
        (["--max-length", "0"], 2, ["--max-length", "'0'"]),
        (["--max-length", "3"], 1, ["max_length", "3"]),  # the library's rule: room for the special tokens
        (["--max-length", "4000"], 1, ["max_length 4000"]),
    ],
)
def test_bad_option_values(tiny_model, flags, code, phrases):
    assert_error(run("rerank", QUERY, "a", "--model", tiny_model, *flags), code, *phrases)


# --- one reader, one set of rules: arguments, --file and stdin -------------------------------------

# characters str.splitlines() would break a line at; inside a line of input they are text
INSIDE_A_LINE = ["\f", "\v", "\x1c", "\x1d", "\x1e", "\x85", "\u2028", "\u2029", "\r", "\t"]
PAGES = [f"page one{character}page two" for character in INSIDE_A_LINE]


def texts_read(result) -> list:
    """The contexts a --json run ranked, back in input order."""
    assert result.returncode == 0, result.stderr
    return [hit["text"] for hit in sorted(json.loads(result.stdout)["response"], key=lambda hit: hit["id"])]


def test_a_line_holding_a_form_feed_or_unicode_separator_is_one_context(tiny_model, tmp_path):
    # the example: printf 'page one\fpage two\n' | nprerank rerank q
    assert texts_read(run("rerank", "q", "--model", tiny_model, "--json", input="page one\fpage two\n")) == [
        "page one\fpage two"
    ]
    # every such character, on stdin with \n line ends and in a file with \r\n ones (the \r goes)
    assert texts_read(run("rerank", "q", "--model", tiny_model, "--json", input="\n".join(PAGES) + "\n\n")) == PAGES
    path = tmp_path / "pages.txt"
    path.write_bytes(("\r\n".join(PAGES) + "\r\n").encode())
    result = run("rerank", "q", "--file", path, "--model", tiny_model, "--json", "--raw")
    assert texts_read(result) == PAGES
    # and those exact texts reached the model: the same logits as the library gives them
    logits = Reranker.from_pretrained(tiny_model).logits([("q", page) for page in PAGES])
    for hit in json.loads(result.stdout)["response"]:
        assert abs(hit["score"] - float(logits[hit["id"]])) <= 1e-6


def test_jsonl_is_split_at_newlines_only(tiny_model, tmp_path):
    # escaped as json.dumps writes them, and raw (U+2028, U+0085 are legal raw in JSON strings; a raw
    # \f or \v is kept too, as in a text line), with \n and \r\n line ends
    escaped = "\n".join(json.dumps({"text": page}) for page in PAGES) + "\n"
    raw = "\r\n".join('{"text": "%s", "id": %d}' % (page.replace("\t", " "), i) for i, page in enumerate(PAGES))
    assert texts_read(run("rerank", "q", "--model", tiny_model, "--json", input=escaped)) == PAGES
    path = tmp_path / "pages.jsonl"
    path.write_bytes(raw.encode())
    assert texts_read(run("rerank", "q", "--file", path, "--model", tiny_model, "--json")) == [
        page.replace("\t", " ") for page in PAGES
    ]
    one_string_per_line = "\n".join('"%s"' % page for page in PAGES[5:8])  # \x85, U+2028, U+2029 raw
    assert texts_read(run("rerank", "q", "--model", tiny_model, "--json", input=one_string_per_line)) == PAGES[5:8]


def test_byte_order_mark_is_dropped(tiny_model, tmp_path):
    bom = "\ufeff"
    assert texts_read(run("rerank", "q", "--model", tiny_model, "--json", input=bom + "first\nsecond\n")) == [
        "first",
        "second",
    ]
    path = tmp_path / "c.json"  # written by a Windows editor: BOM, then JSON
    path.write_bytes((bom + json.dumps(["a", "b"])).encode())
    assert texts_read(run("rerank", "q", "--file", path, "--model", tiny_model, "--json")) == ["a", "b"]
    assert texts_read(run("rerank", "q", "--model", tiny_model, "--json", input=bom + '"x"\n"y"\n')) == ["x", "y"]


@pytest.mark.parametrize(
    "body,query,count",
    [
        ({"query": QUERY, "documents": CONTEXTS, "top_n": 1}, [], 1),  # Cohere v2
        ({"query": QUERY, "documents": [{"text": t} for t in CONTEXTS], "top_n": 2}, [], 2),  # Cohere v1, Jina
        ({"query": QUERY, "texts": CONTEXTS, "raw_scores": False}, [], 5),  # TEI: no limit
        ({"query": QUERY, "contexts": [{"text": t} for t in CONTEXTS], "top_k": 3}, [], 3),  # Cloudflare
        ({"documents": CONTEXTS, "top_n": 2, "top_k": None}, [QUERY], 2),  # a null limit is no limit
    ],
)
def test_request_bodies_honour_their_limit(tiny_model, expected, tmp_path, body, query, count):
    path = tmp_path / "body.json"
    path.write_text(json.dumps(body), encoding="utf-8")
    result = run("rerank", *query, "--file", path, "--model", tiny_model, "--json")
    assert result.returncode == 0, result.stderr
    assert_same_ranking(json.loads(result.stdout)["response"], expected[:count])
    result = run("rerank", *query, "--file", path, "--model", tiny_model, "--json", "--top-k", "4")  # the flag wins
    assert len(json.loads(result.stdout)["response"]) == 4


@pytest.mark.parametrize(
    "body,phrases",
    [
        ({"query": QUERY, "documents": ["a", "b"], "top_k": 1, "top_n": 2}, ["both 'top_k' and 'top_n'"]),
        ({"query": QUERY, "documents": ["a"], "top_n": 0}, ["'top_n' must be an integer >= 1", "0"]),
        ({"query": QUERY, "texts": ["a"], "top_n": "2"}, ["'top_n' must be an integer >= 1"]),
        ({"query": QUERY, "contexts": [{"text": "a"}], "documents": ["b"]}, ["contexts and documents"]),
        ({"query": QUERY, "documents": "a"}, ["'documents' (Cohere, Jina)"]),
        ({"query": QUERY, "texts": ["a", " "]}, ["item 1 is empty"]),
        ({"query": 3, "texts": ["a"]}, ["'query' must be a string"]),
        ({"query": " ", "texts": ["a"]}, ["'query' is empty"]),
        # Cohere v1 ranks on the keys rank_fields names: scoring the text instead would be silently wrong
        ({"query": QUERY, "documents": [{"title": "x", "text": "a"}], "rank_fields": ["title"]}, ["'rank_fields'"]),
        ({"query": QUERY, "documents": ["a"], "rank_fields": ["text", "title"]}, ["'rank_fields'", "not supported"]),
    ],
)
def test_bad_request_bodies(tiny_model, tmp_path, body, phrases):
    path = tmp_path / "body.json"
    path.write_text(json.dumps(body), encoding="utf-8")
    assert_error(run("rerank", "--file", path, "--model", tiny_model), 1, "body.json", *phrases)


def test_text_that_is_not_unicode_is_refused_naming_where(tiny_model, tmp_path):
    # arguments: Python keeps undecodable bytes as lone surrogates; usage errors, exit 2
    assert_error(run("rerank", b"\xff", "a", "--model", tiny_model), 2, "the query is not valid UTF-8", "byte 0xff")
    assert_error(
        run("rerank", QUERY, "ok", b"caf\xe9", "--model", tiny_model),
        2,
        "context 1 is not valid UTF-8",
        "byte 0xe9 at character 3",
    )
    # stdin and files: not UTF-8 at all
    assert_error(
        run("rerank", QUERY, "--model", tiny_model, input=b"ok\n\xff\xfe bad\n"),
        1,
        "<stdin>: not UTF-8 text",
        "byte 0xff at offset 3",
    )
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9\n".encode("latin-1"))
    assert_error(run("rerank", QUERY, "--file", latin1, "--model", tiny_model), 1, "latin1.txt: not UTF-8 text")
    # JSON escapes of lone surrogates: valid JSON, not valid text
    for name, text, phrases in [
        ("c.json", '["a", "\\ud800"]', ["item 1", "lone surrogate U+D800"]),
        ("c.jsonl", '"a"\n{"text": "b \\udc80"}\n', ["line 2", "lone surrogate U+DC80 at character 2"]),
        ("b.json", '{"query": "\\udfff", "documents": ["a"]}', ["'query'", "lone surrogate U+DFFF"]),
    ]:
        path = tmp_path / name
        path.write_text(text, encoding="utf-8")
        assert_error(run("rerank", "--file", path, "--model", tiny_model), 1, name, "not valid Unicode", *phrases)


# --- the first run compiles, and says so on stderr --------------------------------------------------


def test_first_run_says_it_compiles_on_stderr_and_the_next_is_silent(tiny_model, tmp_path):
    """With an empty Numba cache the kernels are compiled (~30 s): stderr says so before and after,
    stdout is the result as always; the next run loads them from the cache and says nothing."""
    from nprerank.startup import COMPILING

    env = {"NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    first, second = (run("rerank", QUERY, *CONTEXTS, "--model", tiny_model, env=env, timeout=900) for _ in range(2))
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    said = first.stderr.splitlines()
    assert said[0] == f"nprerank: {COMPILING}", said
    assert said[1].startswith("nprerank: ... compiled in ") and len(said) == 2, said
    assert second.stderr == ""
    assert first.stdout == second.stdout == run("rerank", QUERY, *CONTEXTS, "--model", tiny_model).stdout


# --- getting started offline: the advice works when followed -----------------------------------------


def closed_port_url() -> str:
    with socket.socket() as probe:  # a port that was free a moment ago: nothing listens there
        probe.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{probe.getsockname()[1]}"


def test_unreachable_hub_advice_leads_to_a_working_command(tiny_model, tmp_path):
    from test_hub import FakeHub, model_files

    from nprerank.hub import DEFAULT_MODEL

    args = ("rerank", QUERY, *CONTEXTS, "--json")  # the README's command: the default model, by repo id
    offline = {"HF_ENDPOINT": closed_port_url(), "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}
    failed = run(*args, env=offline, cwd=tmp_path)
    assert_error(failed, 1, "cannot reach", DEFAULT_MODEL)
    advice = re.findall(r"`([^`]*)`", failed.stderr)
    to_cache, to_folder, model_flag = advice[:3]
    assert (to_cache, to_folder, model_flag) == (
        f"nprerank download {DEFAULT_MODEL}",
        f"nprerank download {DEFAULT_MODEL} --dir weights/",
        "--model weights/",
    )
    want = run("rerank", QUERY, *CONTEXTS, "--json", "--model", tiny_model).stdout

    hub_server = FakeHub(model_files(tiny_model), repo=DEFAULT_MODEL)  # the network, for a moment
    online = {**offline, "HF_ENDPOINT": hub_server.url}
    try:
        fetched = run(*shlex.split(to_folder)[1:], env=online, cwd=tmp_path)
        assert fetched.returncode == 0, fetched.stderr
        assert "--model weights/" in fetched.stderr  # the download says how to use it, too
        # the folder way, with the Hub gone again and nothing in the cache
        hub_server.stop()
        assert run(*args, *shlex.split(model_flag), env=offline, cwd=tmp_path).stdout == want
        assert_error(run(*args, env=offline, cwd=tmp_path), 1, "cannot reach")  # a repo id is not looked up in weights/
        hub_server = FakeHub(model_files(tiny_model), repo=DEFAULT_MODEL)
        fetched = run(*shlex.split(to_cache)[1:], env={**online, "HF_ENDPOINT": hub_server.url}, cwd=tmp_path)
        assert fetched.returncode == 0, fetched.stderr
    finally:
        hub_server.stop()
    # the cache way: the very command that failed now works, offline
    again = run(*args, env=offline, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    assert again.stdout == want


def test_failed_download_leaves_no_folder(tiny_model, tmp_path):
    from test_hub import REPO, FakeHub, model_files

    hub_server = FakeHub(model_files(tiny_model))
    hub_server.fail["model.safetensors"] = 500  # listed, and config.json arrives, then the big file fails
    env = {"HF_ENDPOINT": hub_server.url, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "0"}
    try:
        assert_error(run("download", REPO, "--dir", "weights/", env=env, cwd=tmp_path), 1, "model.safetensors", "500")
    finally:
        hub_server.stop()
    assert not (tmp_path / "weights").exists()
    env["HF_ENDPOINT"] = closed_port_url()
    assert_error(run("download", REPO, "--dir", "weights/", env=env, cwd=tmp_path), 1, "cannot reach")
    assert not (tmp_path / "weights").exists()


def test_every_precision_is_explained_in_each_help():
    """--precision's help names every precision it offers (bf16 was once in the choices but not
    the text), in each command that has the option."""
    for command in ("rerank", "batch", "serve"):
        result = run(command, "--help")
        assert result.returncode == 0, result.stderr
        text = " ".join(result.stdout.split("--precision {")[-1].split())  # the option's help, unwrapped
        for name in PRECISION_NAMES:
            assert f"{name} (" in text.split("--long-documents")[0].split("--workers")[0], (command, name)


@pytest.mark.parametrize(
    "precision,variable,value,phrase",
    [
        ("int8", "NPRERANK_ISA", "bogus", "NPRERANK_ISA must be one of"),
        ("bf16", "NPRERANK_BF16_ISA", "BOGUS", "NPRERANK_BF16_ISA must be one of"),
    ],
)
def test_a_bad_isa_variable_is_one_line(tiny_model, precision, variable, value, phrase):
    """An instruction-set variable naming no path is refused when the model loads, as one line
    naming the variable and the choices; fp32, which has no such kernels, ignores it."""
    assert_error(
        run("rerank", "--model", tiny_model, "--precision", precision, "q", "a", env={variable: value}), 1, phrase
    )
    assert run("rerank", "--model", tiny_model, "q", "a", env={variable: value}).returncode == 0


@pytest.mark.parametrize("command", ["rerank", "batch", "serve", "bench"])
def test_every_command_that_loads_a_model_takes_dash_m(command, tmp_path):
    """`-m` is `--model` in each command that loads one (serve and bench once refused it), and a
    folder that does not exist is one line naming it, before anything is served or measured."""
    words = {"rerank": ["q", "a"], "batch": ["in.jsonl", "-o", "out.jsonl"], "serve": [], "bench": []}[command]
    (tmp_path / "in.jsonl").write_text('{"query": "q", "documents": ["a"]}\n')
    missing = str(tmp_path / "missing")
    errors = [run(command, flag, missing, *words, cwd=tmp_path, timeout=60) for flag in ("--model", "-m")]
    assert errors[0].returncode == errors[1].returncode != 0
    assert errors[0].stderr == errors[1].stderr and errors[0].stderr.count("\n") == 1, errors[0].stderr
    assert f"{missing}: no " in errors[0].stderr


def test_the_command_line_imports_numba_only_when_a_command_needs_it():
    """`import nprerank` leaves Reranker (numpy's kernels, Numba, LLVM) for first use, so that the
    command line answers --help and usage errors quickly, and a Ctrl-C while Numba loads reaches
    main's handler (one line, exit 130) instead of a traceback from the imports."""
    code = "import sys, nprerank.cli; print('numba' in sys.modules); from nprerank import Reranker; print(Reranker)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["False", "<class 'nprerank.reranker.Reranker'>"], done.stdout
