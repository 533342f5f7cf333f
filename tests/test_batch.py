"""`nprerank batch` end to end on small files, with a tiny random model.

Every score is checked against the library called directly (Reranker.logits, one query at a
time), so the job must read, join, order and write exactly what the library would score. Also:
the TREC trio (depth, BEIR's title + text, best first, ties by docid as trec_eval orders them),
resuming after a killed run and after an injected failure with a torn last line, bad lines with
and without --skip-bad, and the progress lines.
"""

import errno
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import nprerank
from nprerank import Reranker, batch
from nprerank.cli import main
from nprerank.reranker import sigmoid

WORDS = (
    "the a panda bear species endemic to china giant bamboo eats lives mountains forest query passage "
    "what is how why cyberpunk lizard cat car search engine ranking relevant document river bank"
).split()


def sentence(rng: random.Random, low: int = 2, high: int = 30) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def write_jsonl(path, records) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def jsonl_records(n: int, seed: int = 0, docs: tuple = (0, 6)) -> list:
    """Query records in every accepted shape: ids or not, documents as strings or {"id"?, "text"}."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        documents = []
        for j in range(rng.randint(*docs)):
            text = sentence(rng)
            documents.append(rng.choice([text, {"text": text}, {"id": f"d{i}-{j}", "text": text}]))
        record = {"query": sentence(rng, 1, 8), "documents": documents}
        if i % 3:
            record["id"] = rng.choice([f"q{i}", 1000 + i])  # unique, and never a line number (an implicit id)
        records.append(record)
    return records


def trec_trio(
    folder, n_queries: int = 5, n_docs: int = 40, per_query: int = 12, seed: int = 1, queries_format: str = "tsv"
) -> dict:
    """A BEIR corpus (some titles, duplicate texts for ties), queries and a TREC run in shuffled score order."""
    rng = random.Random(seed)
    corpus = []
    for i in range(n_docs):
        doc = {"_id": f"doc{i}", "text": sentence(rng)}
        if i % 2:
            doc["title"] = sentence(rng, 1, 4)
        corpus.append(doc)
    corpus.append({"_id": "twin-a", "text": "the giant panda eats bamboo"})  # equal texts, equal logits:
    corpus.append({"_id": "twin-b", "text": "the giant panda eats bamboo"})  # a tie to break
    write_jsonl(folder / "corpus.jsonl", corpus)
    queries = {f"{100 + i}": sentence(rng, 2, 6) for i in range(n_queries)}
    if queries_format == "tsv":
        (folder / "queries.tsv").write_text("".join(f"{k}\t{v}\n" for k, v in queries.items()), encoding="utf-8")
    else:
        write_jsonl(folder / "queries.jsonl", [{"_id": k, "text": v} for k, v in queries.items()])
    lines = []
    for qid in queries:
        chosen = rng.sample([d["_id"] for d in corpus[:-2]], per_query) + ["twin-a", "twin-b"]
        scores = [round(rng.uniform(0, 20), 3) for _ in chosen[:-2]] + [30.0, 29.0]  # the twins in every top
        ranked = sorted(zip(chosen, scores), key=lambda x: -x[1])
        entries = [f"{qid} Q0 {d} {r} {s} bm25\n" for r, (d, s) in enumerate(ranked, 1)]
        rng.shuffle(entries)  # the run's own order must not matter: its scores pick the top
        lines += entries
    (folder / "run.trec").write_text("".join(lines), encoding="utf-8")
    return dict(
        corpus={d["_id"]: d for d in corpus},
        queries=queries,
        run=folder / "run.trec",
        queries_path=folder / f"queries.{'tsv' if queries_format == 'tsv' else 'jsonl'}",
        corpus_path=folder / "corpus.jsonl",
    )


def batch_cli(*args) -> int:
    return main(["batch", *[str(a) for a in args]])


def read_jsonl(path) -> list:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def interrupted_after(queries: int):
    """batch.local_scores, but Ctrl-C comes after `queries` queries are scored."""
    real = batch.local_scores

    def scores(reranker, jobs, batch_size=None):
        for i, scored in enumerate(real(reranker, jobs, batch_size)):
            if i == queries:
                raise KeyboardInterrupt
            yield scored

    return scores


@pytest.fixture(scope="module")
def reranker(tiny_model):
    return Reranker.from_pretrained(tiny_model)


def test_jsonl_scores_equal_the_library_in_input_order(tmp_path, tiny_model, reranker):
    records = jsonl_records(12)
    write_jsonl(tmp_path / "in.jsonl", records)
    assert batch_cli(tmp_path / "in.jsonl", "-o", tmp_path / "out.jsonl", "--model", tiny_model, "--batch-size", 3) == 0
    out = read_jsonl(tmp_path / "out.jsonl")
    assert len(out) == len(records)
    for line_number, (record, result) in enumerate(zip(records, out), 1):
        assert result["id"] == str(record.get("id", line_number))
        texts = [d["text"] if isinstance(d, dict) else d for d in record["documents"]]
        expected = sigmoid(reranker.logits([(record["query"], t) for t in texts])).tolist() if texts else []
        assert result["scores"] == expected  # exact: the same floats, through JSON and back
        named = any(isinstance(d, dict) and "id" in d for d in record["documents"])
        assert ("doc_ids" in result) == named
        if named:
            assert result["doc_ids"] == [
                d["id"] if isinstance(d, dict) and "id" in d else str(i) for i, d in enumerate(record["documents"])
            ]


@pytest.mark.parametrize("queries_format", ["tsv", "jsonl"])
def test_trec_trio_reranks_the_top_depth_best_first(tmp_path, tiny_model, reranker, queries_format):
    trio = trec_trio(tmp_path, queries_format=queries_format)
    depth = 10
    code = batch_cli(
        "--run",
        trio["run"],
        "--queries",
        trio["queries_path"],
        "--corpus",
        trio["corpus_path"],
        "--depth",
        depth,
        "--format",
        "trec",
        "--tag",
        "bge",
        "-o",
        tmp_path / "out.trec",
        "--model",
        tiny_model,
    )
    assert code == 0
    rows = [line.split() for line in (tmp_path / "out.trec").read_text().splitlines()]
    run = [line.split() for line in trio["run"].read_text().splitlines()]
    qids = list(dict.fromkeys(row[0] for row in run))  # the run's order of queries
    assert list(dict.fromkeys(row[0] for row in rows)) == qids
    for qid in qids:
        # the input's top `depth` by its score
        candidates = sorted((row for row in run if row[0] == qid), key=lambda row: -float(row[4]))[:depth]
        top = {row[2] for row in candidates}
        mine = [row for row in rows if row[0] == qid]
        assert {row[2] for row in mine} == top and len(mine) == depth
        assert [row[3] for row in mine] == [str(r) for r in range(1, depth + 1)]
        assert all(row[1] == "Q0" and row[5] == "bge" for row in mine)
        # BEIR's passage: (title + " " + text).strip()
        docs = {d: trio["corpus"][d] for d in top}
        texts = {d: (doc.get("title", "") + " " + doc["text"]).strip() for d, doc in docs.items()}
        logits = dict(zip(texts, reranker.logits([(trio["queries"][qid], texts[d]) for d in texts])))
        assert [np.float32(row[4]) for row in mine] == [logits[row[2]] for row in mine]  # exact float32
        expected = sorted(sorted(top, reverse=True), key=lambda d: -logits[d])  # ties: docid descending
        assert [row[2] for row in mine] == expected
        twins = [row[2] for row in mine if row[2].startswith("twin")]
        assert twins == ["twin-b", "twin-a"]  # a tie, broken as trec_eval breaks it


def test_jsonl_output_of_a_trec_input_names_its_documents(tmp_path, tiny_model):
    trio = trec_trio(tmp_path, n_queries=2)
    assert (
        batch_cli(
            "--run",
            trio["run"],
            "--queries",
            trio["queries_path"],
            "--corpus",
            trio["corpus_path"],
            "--depth",
            3,
            "-o",
            tmp_path / "out.jsonl",
            "--model",
            tiny_model,
        )
        == 0
    )
    out = read_jsonl(tmp_path / "out.jsonl")
    assert [len(r["scores"]) for r in out] == [3, 3] and all(len(r["doc_ids"]) == 3 for r in out)


def test_resume_after_an_injected_failure_and_a_torn_line(tmp_path, tiny_model, monkeypatch, capsys):
    write_jsonl(tmp_path / "in.jsonl", jsonl_records(20, seed=3, docs=(1, 5)))
    args = [tmp_path / "in.jsonl", "--model", tiny_model, "--batch-size", 4, "--format", "trec"]
    assert batch_cli(*args, "-o", tmp_path / "whole.trec") == 0

    real = batch.local_scores
    monkeypatch.setattr(batch, "local_scores", interrupted_after(11))  # dies scoring the 12th query
    assert batch_cli(*args, "-o", tmp_path / "cut.trec") == 130
    progress = json.loads((tmp_path / "cut.trec.progress").read_text())
    assert 0 < progress["records"] <= 11 and not progress["done"]
    lost = jsonl_records(20, seed=3, docs=(1, 5))[progress["records"] : 11]
    assert sum(len(r["documents"]) for r in lost) < 4  # at most the batch in flight (--batch-size 4) is lost
    with open(tmp_path / "cut.trec", "ab") as f:
        f.write(b"17 Q0 d17-0 1 0.25")  # a torn last line, as a kill mid-write leaves
    monkeypatch.setattr(batch, "local_scores", real)
    capsys.readouterr()
    assert batch_cli(*args, "-o", tmp_path / "cut.trec") == 0
    assert f"resuming {tmp_path / 'cut.trec'} after" in capsys.readouterr().err
    assert (tmp_path / "cut.trec").read_bytes() == (tmp_path / "whole.trec").read_bytes()
    assert batch_cli(*args, "-o", tmp_path / "cut.trec") == 0  # done: a third run changes nothing
    assert "nothing to do" in capsys.readouterr().err
    assert (tmp_path / "cut.trec").read_bytes() == (tmp_path / "whole.trec").read_bytes()

    def read_only(file, mode="r", *rest, **options):  # a read-only file system, as root cannot make one
        if any(c in mode for c in "wax+"):
            raise OSError(errno.EROFS, "Read-only file system", str(file))
        return open(file, mode, *rest, **options)

    monkeypatch.setattr(batch, "open", read_only, raising=False)  # shadows the builtin in batch.py
    assert batch_cli(*args, "-o", tmp_path / "cut.trec") == 0  # a finished job is read, not written
    assert "nothing to do" in capsys.readouterr().err


def test_resume_after_the_process_is_killed(tmp_path, tiny_model):
    write_jsonl(tmp_path / "in.jsonl", jsonl_records(600, seed=4, docs=(8, 16)))
    args = [
        sys.executable,
        "-m",
        "nprerank",
        "batch",
        str(tmp_path / "in.jsonl"),
        "--model",
        str(tiny_model),
        "--batch-size",
        "8",
    ]
    whole = subprocess.run(args + ["-o", str(tmp_path / "whole.jsonl")], capture_output=True, text=True, timeout=600)
    assert whole.returncode == 0, whole.stderr
    child = subprocess.Popen(args + ["-o", str(tmp_path / "cut.jsonl")], stderr=subprocess.PIPE)
    progress = tmp_path / "cut.jsonl.progress"
    deadline = time.monotonic() + 300
    while not (progress.exists() and json.loads(progress.read_text())["records"] >= 3) and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    state = json.loads(progress.read_text())
    if state["done"]:
        pytest.skip("the run finished before it could be killed")
    assert (tmp_path / "cut.jsonl").stat().st_size >= state["bytes"]  # maybe more: uncommitted, dropped on resume
    again = subprocess.run(args + ["-o", str(tmp_path / "cut.jsonl")], capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    assert f"after {state['written']} queries" in again.stderr
    assert (tmp_path / "cut.jsonl").read_bytes() == (tmp_path / "whole.jsonl").read_bytes()


BAD_JSONL = [
    ('{"query": "panda", "documents": ["a bear"]', "line 2: not valid JSON"),
    ('["panda", ["a bear"]]', "line 3: expected a JSON object, got list"),
    ('{"documents": ["a bear"]}', "line 4: field 'query' is missing"),
    ('{"query": "", "documents": ["a bear"]}', "line 5: field 'query' is empty"),
    ('{"query": "panda", "documents": "a bear"}', "line 6: field 'documents' must be a list"),
    ('{"query": "panda", "documents": ["a bear", 7]}', "line 7: field 'documents[1]' must be a string"),
    ('{"query": "panda", "documents": [{"id": "x"}]}', "line 8: field 'documents[0].text' is missing"),
    ('{"query": "\\ud800 panda", "documents": ["a bear"]}', "line 9: field 'query' is not valid Unicode"),
    ('{"id": [1], "query": "panda", "documents": ["a bear"]}', "line 10: field 'id' must be"),
]


@pytest.mark.parametrize("bad,message", BAD_JSONL)
def test_a_bad_jsonl_line_is_named_and_stops_the_run(tmp_path, tiny_model, capsys, bad, message):
    good = '{"query": "panda", "documents": ["a bear"]}'  # ids are the line numbers: unique
    lines = [good] * (int(message.split()[1].rstrip(":")) - 1) + [bad]  # the bad one on its message's line
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    assert batch_cli(tmp_path / "in.jsonl", "-o", tmp_path / "out.jsonl", "--model", tiny_model) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"in.jsonl: {message}" in err, err


def test_skip_bad_logs_every_bad_line_and_scores_the_rest(tmp_path, tiny_model, reranker, capsys):
    good = [{"id": f"g{i}", "query": "panda", "documents": [f"a bear number {i}"]} for i in range(3)]
    lines = [json.dumps(good[0])] + [bad for bad, _ in BAD_JSONL] + [json.dumps(g) for g in good[1:]]
    (tmp_path / "in.jsonl").write_bytes(("\n".join(lines) + "\n").encode() + b'{"query": "\xff"}\n')
    assert batch_cli(tmp_path / "in.jsonl", "-o", tmp_path / "out.jsonl", "--model", tiny_model, "--skip-bad") == 0
    err = capsys.readouterr().err
    for _, message in BAD_JSONL:
        assert f"skipped: {tmp_path / 'in.jsonl'}: {message}" in err
    assert f"line {len(lines) + 1}: not UTF-8" in err
    out = read_jsonl(tmp_path / "out.jsonl")
    assert [r["id"] for r in out] == ["g0", "g1", "g2"]
    expected = sigmoid(reranker.logits([("panda", g["documents"][0]) for g in good])).tolist()
    assert [r["scores"][0] for r in out] == expected


def test_bad_trec_inputs_are_named_and_skippable(tmp_path, tiny_model, capsys):
    trio = trec_trio(tmp_path, n_queries=3, per_query=4)
    run = trio["run"].read_text().splitlines()
    first_qid = run[0].split()[0]
    cases = {
        "fields": (run[:1] + ["101 Q0 doc1 1 bm25"] + run[1:], "run.trec: line 2: expected 6 fields"),
        "score": (run[:1] + ["101 Q0 doc1 1 high bm25"] + run[1:], "run.trec: line 2: field 'score' must be a number"),
        "docid": (run[:1] + [f"{first_qid} Q0 nosuchdoc 1 1.0 bm25"] + run[1:], "docid 'nosuchdoc' is not in"),
        "qid": (["999 Q0 doc1 1 1.0 bm25"] + run, "run.trec: line 1: query id '999' is not in"),
        "regrouped": (run + [run[0]], "appears again after other queries"),
        "twice": (run[:1] + run, f"docid {run[0].split()[2]!r} is listed for query {first_qid!r} on line 1 too"),
    }
    for name, (lines, message) in cases.items():
        trio["run"].write_text("\n".join(lines) + "\n")
        common = [
            "--run",
            trio["run"],
            "--queries",
            trio["queries_path"],
            "--corpus",
            trio["corpus_path"],
            "--model",
            tiny_model,
            "--format",
            "trec",
        ]
        assert batch_cli(*common, "-o", tmp_path / f"{name}.trec") == 1, name
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, (name, err)
        for leftover in (tmp_path / f"{name}.trec", tmp_path / f"{name}.trec.progress"):
            leftover.unlink(missing_ok=True)
        assert batch_cli(*common, "-o", tmp_path / f"{name}.trec", "--skip-bad") == 0, name
        err = capsys.readouterr().err
        assert "skipped: " in err and message in err, (name, err)
        qids = {line.split()[0] for line in (tmp_path / f"{name}.trec").read_text().splitlines()}
        assert qids == {line.split()[0] for line in run}, name  # every good query is there
    corpus = trio["corpus_path"].read_text().splitlines()
    trio["corpus_path"].write_text("\n".join(['{"text": "no id"}'] + corpus) + "\n")
    trio["run"].write_text("\n".join(run) + "\n")
    common = [
        "--run",
        trio["run"],
        "--queries",
        trio["queries_path"],
        "--corpus",
        trio["corpus_path"],
        "--model",
        tiny_model,
    ]
    assert batch_cli(*common, "-o", tmp_path / "out.jsonl") == 1
    assert "corpus.jsonl: line 1: field '_id' is missing" in capsys.readouterr().err


def test_an_output_from_elsewhere_or_other_settings_is_refused(tmp_path, tiny_model, capsys):
    write_jsonl(tmp_path / "in.jsonl", jsonl_records(3))
    (tmp_path / "taken.jsonl").write_text("somebody's results\n")
    assert batch_cli(tmp_path / "in.jsonl", "-o", tmp_path / "taken.jsonl", "--model", tiny_model) == 1
    assert "is not an unfinished `nprerank batch` output" in capsys.readouterr().err
    assert (tmp_path / "taken.jsonl").read_text() == "somebody's results\n"  # untouched
    assert batch_cli(tmp_path / "in.jsonl", "-o", tmp_path / "out.jsonl", "--model", tiny_model) == 0
    assert (
        batch_cli(tmp_path / "in.jsonl", "-o", tmp_path / "out.jsonl", "--model", tiny_model, "--format", "trec") == 1
    )
    assert "was started with other settings (format 'jsonl' now 'trec')" in capsys.readouterr().err
    (tmp_path / "out.jsonl").write_text("")  # someone emptied it: resuming would pad it with zeros
    assert batch_cli(tmp_path / "in.jsonl", "-o", tmp_path / "out.jsonl", "--model", tiny_model) == 1
    assert "is shorter (0 bytes) than its out.jsonl.progress says" in capsys.readouterr().err
    (tmp_path / "out.jsonl").unlink()  # someone deleted it and left the progress file
    assert batch_cli(tmp_path / "in.jsonl", "-o", tmp_path / "out.jsonl", "--model", tiny_model) == 1
    err = capsys.readouterr().err
    assert "out.jsonl is gone, but out.jsonl.progress beside it records" in err and "to start over" in err, err


def test_usage_errors(tmp_path, tiny_model, capsys):
    """A wrong command line exits 2 (README), an input that cannot be used 1; one line each."""
    write_jsonl(tmp_path / "in.jsonl", jsonl_records(1))
    assert batch_cli("-o", tmp_path / "out.jsonl", "--model", tiny_model) == 2
    assert "no input" in capsys.readouterr().err
    assert batch_cli(tmp_path / "in.jsonl", "--run", tmp_path / "in.jsonl", "-o", tmp_path / "o") == 2
    assert "not both" in capsys.readouterr().err
    assert batch_cli(tmp_path / "missing.jsonl", "-o", tmp_path / "o", "--model", tiny_model) == 1
    assert "missing.jsonl: no such file" in capsys.readouterr().err
    assert batch_cli(tmp_path / "in.jsonl", "-o", tmp_path / "o", "--model", tiny_model, "--depth", 1) == 2
    assert "--depth picks the best of a --run's candidates" in capsys.readouterr().err
    assert batch_cli(tmp_path / "in.jsonl", "-o", tmp_path / "o", "--model", tiny_model, "--concurrency", 2) == 2
    assert "--concurrency sets how many Ray actors score; give --ray with it" in capsys.readouterr().err
    for dash in (["-", "-o", tmp_path / "o"], [tmp_path / "in.jsonl", "-o", "-"]):
        assert batch_cli(*dash, "--model", tiny_model) == 2
        assert "batch reads and writes files, not stdin or stdout" in capsys.readouterr().err
    assert not (tmp_path / "-").exists() and not os.path.exists("-")
    os.mkfifo(tmp_path / "pipe.jsonl")
    for not_a_file in (tmp_path / "pipe.jsonl", tmp_path):
        assert batch_cli(not_a_file, "-o", tmp_path / "o", "--model", tiny_model) == 1
        assert f"{not_a_file}: not a regular file" in capsys.readouterr().err
        assert (
            batch_cli(
                "--run",
                tmp_path / "in.jsonl",
                "--queries",
                not_a_file,
                "--corpus",
                tmp_path / "in.jsonl",
                "-o",
                tmp_path / "o",
                "--model",
                tiny_model,
            )
            == 1
        )
        assert f"{not_a_file}: not a regular file" in capsys.readouterr().err
    assert batch_cli(tmp_path / "in.jsonl", "-o", tmp_path / "in.jsonl", "--model", tiny_model) == 2
    assert "is also an input" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        batch_cli(tmp_path / "in.jsonl")  # no --output: nowhere to resume from
    assert exit_.value.code == 2


@pytest.mark.parametrize(
    "output,message",
    [
        (
            "no/such/folder/out.jsonl",
            "--output {tmp}/no/such/folder/out.jsonl: its folder {tmp}/no/such/folder does not exist",
        ),
        ("", "--output {tmp} is a folder; name a file in it"),
        ("in.jsonl/out.jsonl", "--output {tmp}/in.jsonl/out.jsonl: {tmp}/in.jsonl is a file, not a folder"),
        ("/dev/null", "--output /dev/null is not a regular file; name a file to write the results to"),
        ("x" * 300 + ".jsonl", "{tmp}/" + "x" * 300 + ".jsonl: File name too long"),
        (
            "y" * 249 + ".jsonl",  # 255 bytes: the output's name fits, its .progress file's does not
            "--output {tmp}/" + "y" * 249 + ".jsonl: the name is too long for the progress file kept beside it "
            "(" + "y" * 249 + ".jsonl.progress); choose a shorter name (that file adds 9 characters)",
        ),
    ],
)
def test_an_output_that_cannot_be_written_is_one_line_before_the_model_loads(
    tmp_path, tiny_model, capsys, monkeypatch, output, message
):
    write_jsonl(tmp_path / "in.jsonl", jsonl_records(1))
    monkeypatch.setattr(Reranker, "from_pretrained", None)  # reached, it would fail with a TypeError
    assert batch_cli(tmp_path / "in.jsonl", "-o", tmp_path / output, "--model", tiny_model) == 1
    err = capsys.readouterr().err
    assert err == f"nprerank: error: {message.format(tmp=tmp_path)}\n", err


@pytest.mark.parametrize("content", [b"", b"\n\n  \r\n", "\ufeff\n\n".encode()])
@pytest.mark.parametrize("trec", [False, True])
def test_an_empty_input_is_an_error_not_a_finished_job(tmp_path, tiny_model, capsys, content, trec):
    if trec:
        trio = trec_trio(tmp_path, n_queries=2, per_query=2)
        trio["run"].write_bytes(content)
        args = ["--run", trio["run"], "--queries", trio["queries_path"], "--corpus", trio["corpus_path"]]
        empty = trio["run"]
    else:
        empty = tmp_path / "in.jsonl"
        empty.write_bytes(content)
        args = [empty]
    assert batch_cli(*args, "-o", tmp_path / "out.jsonl", "--model", tiny_model) == 1
    assert (
        capsys.readouterr().err
        == f"nprerank: error: {empty}: nothing to rerank: the file is empty (or holds only blank lines)\n"
    )
    assert not (tmp_path / "out.jsonl").exists()


def test_the_summary_counts_skipped_records_and_all_skipped_is_an_error(tmp_path, tiny_model, capsys):
    good = '{"query": "panda", "documents": ["a bear"]}'
    (tmp_path / "in.jsonl").write_text(f"{good}\nnot json\n", encoding="utf-8")
    assert batch_cli(tmp_path / "in.jsonl", "-o", tmp_path / "one.jsonl", "--model", tiny_model, "--skip-bad") == 0
    last = capsys.readouterr().err.splitlines()[-1]
    assert last.startswith("nprerank batch: 1 pair of 1 query in ") and ", 1 bad record skipped -> " in last, last
    (tmp_path / "bad.jsonl").write_text('not json\n{"query": "panda", "passages": ["a bear"]}\n', encoding="utf-8")
    assert batch_cli(tmp_path / "bad.jsonl", "-o", tmp_path / "none.jsonl", "--model", tiny_model, "--skip-bad") == 1
    err = capsys.readouterr().err
    assert "line 2: field 'documents' is missing (the record has 'query', 'passages')" in err
    assert "nprerank batch: 0 pairs" not in err  # no summary that reads as a finished job
    assert err.endswith("nprerank: error: no record could be scored: all 2 bad records were skipped\n"), err
    assert not (tmp_path / "none.jsonl").exists() and not (tmp_path / "none.jsonl.progress").exists()
    (tmp_path / "bad.jsonl").write_text(f"{good}\n", encoding="utf-8")  # mended: the job runs afresh
    assert batch_cli(tmp_path / "bad.jsonl", "-o", tmp_path / "none.jsonl", "--model", tiny_model) == 0


def test_plain_progress_lines_say_pairs_rate_and_eta(tmp_path, tiny_model, monkeypatch, capsys):
    write_jsonl(tmp_path / "in.jsonl", jsonl_records(6, docs=(2, 4)))
    monkeypatch.setattr(batch, "PROGRESS_EVERY", 0.0)
    assert batch_cli(tmp_path / "in.jsonl", "-o", tmp_path / "out.jsonl", "--model", tiny_model) == 0
    lines = capsys.readouterr().err.splitlines()
    total = sum(len(r["documents"]) for r in jsonl_records(6, docs=(2, 4)))
    assert any(
        line.startswith(f"nprerank batch: {total}/{total} pairs (100.0%)") and "pairs/s, ETA" in line for line in lines
    ), lines
    assert lines[-1].startswith(f"nprerank batch: {total} pairs of 6 queries in")


def test_the_index_holds_16_bytes_per_line_not_the_texts(tmp_path):
    trio = trec_trio(tmp_path, n_docs=200)
    index = batch.LineIndex(trio["corpus_path"], batch._corpus_line(trio["corpus_path"]), bad=None)
    lines = len(trio["corpus"])
    assert index.hashes.nbytes + index.offsets.nbytes == 16 * lines
    for doc_id, doc in trio["corpus"].items():
        assert index.get(doc_id) == (doc.get("title", "") + " " + doc["text"]).strip()
    assert index.get("doc-not-there") is None


def test_ray_missing_is_one_line_naming_the_extra(tmp_path, tiny_model, monkeypatch, capsys):
    write_jsonl(tmp_path / "in.jsonl", jsonl_records(1))
    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed: `import ray` fails
    monkeypatch.delitem(sys.modules, "nprerank.ray", raising=False)
    monkeypatch.delattr(nprerank, "ray", raising=False)  # test_ray.py may have imported it already
    assert batch_cli(tmp_path / "in.jsonl", "-o", tmp_path / "out.jsonl", "--model", tiny_model, "--ray") == 1
    assert "needs ray: pip install 'nprerank[ray]'" in capsys.readouterr().err


def test_precision_reaches_the_model_and_the_resume_settings(tmp_path, tiny_model, capsys):
    records = jsonl_records(3, docs=(2, 4))
    write_jsonl(tmp_path / "in.jsonl", records)
    assert (
        batch_cli(tmp_path / "in.jsonl", "-o", tmp_path / "q.jsonl", "--model", tiny_model, "--precision", "int8") == 0
    )
    quantized, exact = (Reranker.from_pretrained(tiny_model, precision=p) for p in ("int8", "fp32"))
    for record, result in zip(records, read_jsonl(tmp_path / "q.jsonl")):
        pairs = [(record["query"], d["text"] if isinstance(d, dict) else d) for d in record["documents"]]
        assert result["scores"] == sigmoid(quantized.logits(pairs)).tolist()  # int8's own floats
        assert result["scores"] != sigmoid(exact.logits(pairs)).tolist()
    progress = tmp_path / "q.jsonl.progress"
    progress.write_text(progress.read_text().replace('"done": true', '"done": false'))
    assert batch_cli(tmp_path / "in.jsonl", "-o", tmp_path / "q.jsonl", "--model", tiny_model) == 1  # fp32 now
    assert "precision 'int8' now 'fp32'" in capsys.readouterr().err  # the default by name, not None
    assert (
        batch_cli(tmp_path / "in.jsonl", "-o", tmp_path / "q.jsonl", "--model", tiny_model, "--precision", "bf16") == 1
    )
    assert "precision 'int8' now 'bf16'" in capsys.readouterr().err


def test_a_job_started_at_fp32_resumes_at_fp32_only(tmp_path, tiny_model, capsys):
    """fp32 jobs' progress files have no precision (those written before it existed resume): asked
    to resume at another precision, the refusal says the job ran at fp32."""
    write_jsonl(tmp_path / "in.jsonl", jsonl_records(3, docs=(2, 4)))
    job = [tmp_path / "in.jsonl", "-o", tmp_path / "f.jsonl", "--model", tiny_model]
    assert batch_cli(*job) == 0
    progress = tmp_path / "f.jsonl.progress"
    assert "precision" not in json.loads(progress.read_text())["settings"]
    progress.write_text(progress.read_text().replace('"done": true', '"done": false'))
    for precision in ("int8", "bf16"):
        assert batch_cli(*job, "--precision", precision) == 1
        assert f"precision 'fp32' now '{precision}'" in capsys.readouterr().err
    assert batch_cli(*job, "--precision", "fp32") == 0  # the default named resumes it


def test_engine_reaches_the_model_and_the_resume_settings(tmp_path, tiny_model, capsys):
    records = jsonl_records(4, docs=(2, 5))
    write_jsonl(tmp_path / "in.jsonl", records)
    assert (
        batch_cli(tmp_path / "in.jsonl", "-o", tmp_path / "ref.jsonl", "--model", tiny_model, "--engine", "reference")
        == 0
    )
    reference = Reranker.from_pretrained(tiny_model, engine="reference")
    for record, result in zip(records, read_jsonl(tmp_path / "ref.jsonl")):
        texts = [d["text"] if isinstance(d, dict) else d for d in record["documents"]]
        expected = sigmoid(reference.logits([(record["query"], t) for t in texts])).tolist() if texts else []
        assert result["scores"] == expected  # the reference engine's own floats, not the fast one's
    (tmp_path / "ref.jsonl.progress").write_text(
        (tmp_path / "ref.jsonl.progress").read_text().replace('"done": true', '"done": false')
    )
    assert batch_cli(tmp_path / "in.jsonl", "-o", tmp_path / "ref.jsonl", "--model", tiny_model) == 1
    assert "engine 'reference' now 'fast'" in capsys.readouterr().err


@pytest.mark.parametrize(
    "field,value", [("id", "q 1"), ("id", "q\t1"), ("doc", "d\n2"), ("doc", "d 2"), ("doc", "d\u20282"), ("id", "q\r")]
)
def test_trec_output_refuses_ids_that_would_split_its_columns(tmp_path, tiny_model, capsys, field, value):
    good = {"id": "ok", "query": "panda", "documents": [{"id": "d1", "text": "a bear"}]}
    bad = {
        "id": value if field == "id" else "q2",
        "query": "panda",
        "documents": [{"id": value if field == "doc" else "d1", "text": "a bear"}],
    }
    write_jsonl(tmp_path / "in.jsonl", [good, bad, dict(good, id="ok2")])
    assert batch_cli(tmp_path / "in.jsonl", "-o", tmp_path / "out.trec", "--model", tiny_model, "--format", "trec") == 1
    err = capsys.readouterr().err
    assert "in.jsonl: line 2: field" in err and "cannot hold whitespace" in err and err.count("\n") == 1, err
    for leftover in (tmp_path / "out.trec", tmp_path / "out.trec.progress"):
        leftover.unlink(missing_ok=True)
    assert (
        batch_cli(
            tmp_path / "in.jsonl", "-o", tmp_path / "out.trec", "--model", tiny_model, "--format", "trec", "--skip-bad"
        )
        == 0
    )
    lines = (tmp_path / "out.trec").read_text().splitlines()
    assert len(lines) == 2 and all(len(line.split()) == 6 for line in lines), lines
    assert (
        batch_cli(tmp_path / "in.jsonl", "-o", tmp_path / "out.jsonl", "--model", tiny_model) == 0
    )  # JSONL holds any id


@pytest.mark.parametrize("tag", ["my run", "", "tab\there", "new\nline"])
def test_a_trec_tag_with_whitespace_is_a_usage_error(tmp_path, tiny_model, capsys, tag):
    write_jsonl(tmp_path / "in.jsonl", jsonl_records(1))
    with pytest.raises(SystemExit) as exit_:
        batch_cli(tmp_path / "in.jsonl", "-o", tmp_path / "out.trec", "--format", "trec", "--tag", tag)
    assert exit_.value.code == 2
    assert "argument --tag" in capsys.readouterr().err
    assert not (tmp_path / "out.trec").exists()


def test_a_byte_order_mark_is_not_part_of_the_first_line(tmp_path, tiny_model):
    bom = "\ufeff".encode()
    for name in ("plain", "bom"):
        folder = tmp_path / name
        folder.mkdir()
        trio = trec_trio(folder)
        write_jsonl(folder / "in.jsonl", jsonl_records(3))
        if name == "bom":  # every input as a Windows editor saves it
            for path in (trio["run"], trio["queries_path"], trio["corpus_path"], folder / "in.jsonl"):
                path.write_bytes(bom + path.read_bytes())
        assert batch_cli(folder / "in.jsonl", "-o", folder / "out.jsonl", "--model", tiny_model) == 0
        assert (
            batch_cli(
                "--run",
                trio["run"],
                "--queries",
                trio["queries_path"],
                "--corpus",
                trio["corpus_path"],
                "-o",
                folder / "out.trec",
                "--format",
                "trec",
                "--model",
                tiny_model,
            )
            == 0
        )
    for out in ("out.jsonl", "out.trec"):
        assert (tmp_path / "bom" / out).read_bytes() == (tmp_path / "plain" / out).read_bytes()


@pytest.mark.parametrize("score", ["nan", "NaN", "inf", "-Infinity"])
def test_a_non_finite_run_score_is_a_bad_line(tmp_path, tiny_model, capsys, score):
    trio = trec_trio(tmp_path, n_queries=2, per_query=4)
    run = trio["run"].read_text().splitlines()
    fields = run[1].split()
    run[1] = " ".join(fields[:4] + [score] + fields[5:])
    trio["run"].write_text("\n".join(run) + "\n")
    common = [
        "--run",
        trio["run"],
        "--queries",
        trio["queries_path"],
        "--corpus",
        trio["corpus_path"],
        "--model",
        tiny_model,
        "--format",
        "trec",
    ]
    assert batch_cli(*common, "-o", tmp_path / "out.trec") == 1
    err = capsys.readouterr().err
    assert "run.trec: line 2: field 'score' must be a finite number" in err and err.count("\n") == 1, err
    assert batch_cli(*common, "-o", tmp_path / "skip.trec", "--skip-bad") == 0
    pairs = [tuple(line.split()[0:3:2]) for line in (tmp_path / "skip.trec").read_text().splitlines()]
    assert (fields[0], fields[2]) not in pairs and len(pairs) == len(run) - 1  # that line alone is left out


@pytest.mark.parametrize(
    "progress",
    [
        "[1]",
        '"text"',
        '{"version": 1}',
        '{"version": 1, "settings": [], "bytes": 0, "records": 0, "written": 0, "pairs": 0}',
        '{"version": 1, "settings": {}, "bytes": -5, "records": 0, "written": 0, "pairs": 0}',
    ],
)
def test_a_damaged_progress_file_is_one_line_not_a_traceback(tmp_path, tiny_model, capsys, progress):
    write_jsonl(tmp_path / "in.jsonl", jsonl_records(2))
    (tmp_path / "out.jsonl").write_text("")
    (tmp_path / "out.jsonl.progress").write_text(progress)
    assert batch_cli(tmp_path / "in.jsonl", "-o", tmp_path / "out.jsonl", "--model", tiny_model) == 1
    err = capsys.readouterr().err
    assert err.startswith("nprerank: error: ") and "out.jsonl.progress: damaged" in err and err.count("\n") == 1, err


def test_the_local_job_warms_up_so_a_first_run_says_it_compiles(tmp_path, tiny_model, monkeypatch):
    import nprerank.startup

    calls = []
    monkeypatch.setattr(nprerank.startup, "warm_up", lambda reranker, say: calls.append(say) or 0.0)
    write_jsonl(tmp_path / "in.jsonl", jsonl_records(1))
    assert batch_cli(tmp_path / "in.jsonl", "-o", tmp_path / "out.jsonl", "--model", tiny_model) == 0
    assert len(calls) == 1


def test_a_second_run_on_an_output_being_written_is_refused(tmp_path, tiny_model, capsys):
    import fcntl

    write_jsonl(tmp_path / "in.jsonl", jsonl_records(3))
    assert batch_cli(tmp_path / "in.jsonl", "-o", tmp_path / "out.jsonl", "--model", tiny_model) == 0
    whole = (tmp_path / "out.jsonl").read_bytes()
    capsys.readouterr()
    progress = tmp_path / "out.jsonl.progress"
    progress.write_text(progress.read_text().replace('"done": true', '"done": false'))
    for other in ("in a thread of this process", "in another process"):
        if other == "in another process":  # a run elsewhere holds it: flock from a child that waits
            holder = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    "import fcntl, sys, time; f = open(sys.argv[1], 'ab'); "
                    "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
                    str(tmp_path / "out.jsonl"),
                ],
                stdout=subprocess.PIPE,
                text=True,
            )
            assert holder.stdout.readline() == "held\n"
        else:
            held = open(tmp_path / "out.jsonl", "ab")  # flock is per open file: this one is "another run"
            fcntl.flock(held, fcntl.LOCK_EX)
        try:
            assert batch_cli(tmp_path / "in.jsonl", "-o", tmp_path / "out.jsonl", "--model", tiny_model) == 1
            err = capsys.readouterr().err
            assert "out.jsonl is being written by another `nprerank batch` run" in err and err.count("\n") == 1, err
            assert (tmp_path / "out.jsonl").read_bytes() == whole  # nothing truncated or appended
        finally:
            if other == "in another process":
                holder.kill()
                holder.wait()
            else:
                held.close()
    assert batch_cli(tmp_path / "in.jsonl", "-o", tmp_path / "out.jsonl", "--model", tiny_model) == 0  # free again
    assert (tmp_path / "out.jsonl").read_bytes() == whole


def test_a_stop_before_the_first_commit_resumes(tmp_path, tiny_model, reranker, capsys):
    """The .progress file is written when the output is made: a bad line (or Ctrl-C, or a wrong
    --model) before the first batch's commit leaves an output that reruns, not one that is refused."""
    good = [{"id": f"g{i}", "query": "panda", "documents": [f"a bear number {i}"]} for i in range(3)]
    lines = [json.dumps(good[0]), "{not json", json.dumps(good[1]), json.dumps(good[2])]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "out.jsonl"
    assert batch_cli(tmp_path / "in.jsonl", "-o", out, "--model", tiny_model) == 1  # line 2 stops it
    assert "line 2" in capsys.readouterr().err and (tmp_path / "out.jsonl.progress").exists()
    assert batch_cli(tmp_path / "in.jsonl", "-o", out, "--model", tmp_path / "no-such-model") == 1
    capsys.readouterr()
    assert batch_cli(tmp_path / "in.jsonl", "-o", out, "--model", tiny_model, "--skip-bad") == 0
    assert [r["id"] for r in read_jsonl(out)] == ["g0", "g1", "g2"]  # each once
    expected = sigmoid(reranker.logits([("panda", g["documents"][0]) for g in good])).tolist()
    assert [r["scores"][0] for r in read_jsonl(out)] == expected


@pytest.mark.parametrize(
    "line, message",
    [
        ('{"_id": "doc0"}', "field 'text' is missing"),
        ('{"_id": "doc0", "text": null}', "field 'text'"),
        ('{"_id": "doc0", "text": 0}', "field 'text'"),
        ('{"_id": "doc0", "text": "a bear", "title": 7}', "field 'title'"),
    ],
)
def test_a_corpus_line_without_its_text_is_a_bad_line(tmp_path, tiny_model, capsys, line, message):
    """Never scored as an empty passage: a corpus whose text sits under another key would rank
    nothing while exiting 0."""
    trio = trec_trio(tmp_path, n_queries=1, n_docs=4, per_query=2)
    corpus = trio["corpus_path"].read_text().splitlines()
    trio["corpus_path"].write_text("\n".join([line] + corpus[1:]) + "\n")  # doc0 is no longer well formed
    run = [f"{next(iter(trio['queries']))} Q0 doc0 1 50.0 bm25"] + trio["run"].read_text().splitlines()
    trio["run"].write_text("\n".join(run) + "\n")
    common = ["--run", trio["run"], "--queries", trio["queries_path"], "--corpus", trio["corpus_path"]]
    assert batch_cli(*common, "--model", tiny_model, "-o", tmp_path / "out.jsonl") == 1
    err = capsys.readouterr().err
    assert f"corpus.jsonl: line 1: {message}" in err and err.count("\n") == 1, err


def test_a_query_id_used_twice_is_a_bad_line(tmp_path, tiny_model, capsys):
    """A TREC run would hold the query twice, each ranked from 1; the JSONL output two records one
    id. Also across a resume: the ids of the lines done before are read back."""
    records = [{"id": 5, "query": "panda", "documents": ["a bear"]}, {"id": "6", "query": "cat", "documents": ["x"]}]
    records.append({"id": "5", "query": "lizard", "documents": ["a reptile"]})
    write_jsonl(tmp_path / "in.jsonl", records)
    out = tmp_path / "out.trec"
    assert batch_cli(tmp_path / "in.jsonl", "-o", out, "--model", tiny_model, "--format", "trec") == 1
    assert "line 3: query id '5' was already used on line 1: ids must be unique" in capsys.readouterr().err
    assert batch_cli(tmp_path / "in.jsonl", "-o", out, "--model", tiny_model, "--format", "trec", "--skip-bad") == 0
    assert "skipped: " in capsys.readouterr().err
    assert sorted({line.split()[0] for line in out.read_text().splitlines()}) == ["5", "6"]
    assert len(out.read_text().splitlines()) == 2  # one document each, query 5 once


def test_an_input_edited_in_place_does_not_resume(tmp_path, tiny_model, monkeypatch, capsys):
    """Same size, other text: resuming would mix the old text's scores with the new one's."""
    write_jsonl(tmp_path / "in.jsonl", jsonl_records(6, seed=3, docs=(1, 3)))
    monkeypatch.setattr(batch, "local_scores", interrupted_after(2))
    args = (tmp_path / "in.jsonl", "-o", tmp_path / "out.jsonl", "--model", tiny_model, "--batch-size", "1")
    assert batch_cli(*args) == 130
    monkeypatch.undo()
    capsys.readouterr()
    text = (tmp_path / "in.jsonl").read_text()
    (tmp_path / "in.jsonl").write_text(text.replace("panda", "PANDA") if "panda" in text else text.upper())
    stamp = (tmp_path / "in.jsonl").stat()
    os.utime(tmp_path / "in.jsonl", ns=(stamp.st_atime_ns, stamp.st_mtime_ns + 10**9))  # a later edit, surely
    assert batch_cli(*args) == 1
    assert "was started with other settings (an input file has been edited since)" in capsys.readouterr().err


def test_the_same_model_folder_written_otherwise_resumes(tmp_path, tiny_model, monkeypatch, capsys):
    """A job started with --model FOLDER resumes with FOLDER/, a relative path or a link to it."""
    write_jsonl(tmp_path / "in.jsonl", jsonl_records(6, seed=3, docs=(1, 3)))
    monkeypatch.setattr(batch, "local_scores", interrupted_after(2))
    args = (tmp_path / "in.jsonl", "-o", tmp_path / "out.jsonl", "--batch-size", "1")
    assert batch_cli(*args, "--model", tiny_model) == 130
    monkeypatch.undo()
    (tmp_path / "link").symlink_to(tiny_model)
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    for written, said in (
        (f"{tiny_model}/", "resuming"),
        ("link", "nothing to do"),
        (os.path.relpath(tiny_model), "nothing to do"),
    ):
        assert batch_cli(*args, "--model", written) == 0
        assert said in capsys.readouterr().err, written  # not "started with other settings"
    write_jsonl(tmp_path / "again.jsonl", jsonl_records(6, seed=3, docs=(1, 3)))
    assert batch_cli(tmp_path / "again.jsonl", "-o", tmp_path / "whole.jsonl", "--model", tiny_model) == 0
    assert (tmp_path / "out.jsonl").read_bytes() == (tmp_path / "whole.jsonl").read_bytes()


@pytest.mark.parametrize(
    "documents, message",
    [
        ([{"id": "d", "text": "a"}, {"id": "d", "text": "b"}], "documents[1] has the id 'd' of documents[0]"),
        ([{"id": "1", "text": "a"}, "b"], "documents[1] has the id '1' of documents[0]"),  # "b" is numbered 1
    ],
)
def test_trec_output_refuses_a_document_id_twice_in_a_record(tmp_path, tiny_model, capsys, documents, message):
    """trec_eval reads one line per (query, document): a ranking naming a document twice is
    malformed. JSONL output keeps scores by position, so there it is no error."""
    write_jsonl(tmp_path / "in.jsonl", [{"id": "q", "query": "panda", "documents": documents}])
    assert batch_cli(tmp_path / "in.jsonl", "-o", tmp_path / "out.trec", "--model", tiny_model, "--format", "trec") == 1
    err = capsys.readouterr().err
    assert "in.jsonl: line 1: " in err and message in err and err.count("\n") == 1, err
    assert batch_cli(tmp_path / "in.jsonl", "-o", tmp_path / "out.jsonl", "--model", tiny_model) == 0
