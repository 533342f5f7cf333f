"""`nprerank batch`: rerank a whole file of queries and their candidates, streaming and resumable.

What it owns: reading the inputs people have, the unit of work (one query and its candidates),
scoring it, writing the results, resuming an interrupted run, and reporting progress. The same
job runs on a Ray cluster with `--ray` (ray.py); both paths share everything here but the loop.

Inputs (a record is one query with its candidates; records are numbered in input order):
- JSONL, one record a line: `{"id"?, "query", "documents": [str | {"id"?, "text"}]}`. A record
  without an id is named by its line number, a document without one by its position. Query
  ids, given or so named, must be unique (a TREC run would hold the query twice).
- The IR trio: a TREC run (`qid Q0 docid rank score tag`, a query's lines together, as pyserini
  and trec_eval write them), queries (TSV `qid<TAB>text`, or JSONL `{"_id", "text"}` as BEIR
  ships them) and a BEIR corpus (JSONL `{"_id", "text", "title"?}`). The `--depth` best of each
  query by the run's score are reranked (ties keep the run's order). A passage is BEIR's
  `(title + " " + text).strip()` (beir/reranking/rerank.py), so scores compare with BEIR's.

Outputs, in input order:
- `--format jsonl`: `{"id", "scores": [sigmoid relevance per document, in the input's order],
  "doc_ids"?: [...]}` (doc_ids when the input named its documents).
- `--format trec`: `qid Q0 docid rank logit tag`, best first; equal logits are ordered by docid
  descending, as trec_eval orders ties, so our ranks are the ones trec_eval evaluates.

Same numbers locally and on Ray, bit for bit: each query is scored by its own `Reranker.logits`
call, so the batches a query's pairs are cut into depend on that query alone, never on which
other queries a worker or a Ray block happened to hold. (The fast engine packs sequences without
padding and is in fact independent of the batch; the reference engine pads each batch to its
longest pair, and a quantized engine with per-batch scales would not be, so the job pins it.)

Memory: one record at a time, plus the indexes of the queries and corpus files: 16 bytes per
line (a 64-bit hash of the id and the line's byte offset, sorted numpy arrays), i.e. 16 MB per
million documents; the text is read from the file when a run line asks for it (the OS page
cache keeps the hot part). The run file's query ids seen so far are kept to refuse a run whose
queries are not grouped (~100 bytes per query).

Resume: results are appended whole and committed at each batch end: the output is flushed and
fsynced, then `OUTPUT.progress` (bytes committed, records done, the settings) is replaced
atomically. A rerun with the same --output truncates anything after the committed bytes (a torn
last line, an uncommitted batch) and skips the records done; an interrupted run loses at most
the batch in flight. A finished run leaves `"done": true` and a rerun does nothing.

Read next: ray.py (the same job as a Ray Data pipeline), reranker.py (what scores the pairs).
"""

import argparse
import errno
import json
import os
import sys
import time
import weakref
from array import array
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .arguments import UsageError, positive_int

FORMATS = ("jsonl", "trec")
DEPTH = 100  # --depth's default: the run's 100 best of each query, as BEIR reranks
PROGRESS_EVERY = 30.0  # seconds between plain progress lines when stderr is not a terminal
PROGRESS_VERSION = 1  # bump when the .progress file or the output records change meaning
BOM = "\ufeff".encode()  # the byte order mark Windows editors put at the start of a UTF-8 file
PROGRESS_SUFFIX = ".progress"  # the job's state, in a file beside its output


class BadRecord(ValueError):
    """A line of an input file that cannot be used: names the file, the line and the field."""

    def __init__(self, path, line: int, message: str):
        super().__init__(f"{path}: line {line}: {message}")


@dataclass
class Job:
    """One query and its candidates: the unit that is scored, written and resumed."""

    number: int  # position among the input's records, from 0: what resume counts
    qid: str
    query: str
    doc_ids: list  # [str] * D
    texts: list  # [str] * D
    named: bool = True  # the input gave document ids (else they are positions)


@dataclass
class Source:
    """Where the records come from: a JSONL file, or the run + queries + corpus trio."""

    jsonl: Path | None = None
    run: Path | None = None
    queries: Path | None = None
    corpus: Path | None = None
    depth: int = DEPTH
    skip_bad: bool = False
    say: object = field(default=lambda line: print(line, file=sys.stderr, flush=True))
    trec: bool = False  # the output is a TREC run: ids must be single whitespace-free fields
    skipped: int = 0  # bad records passed over (--skip-bad) so far

    def check_not_empty(self) -> None:
        """ValueError unless the JSONL input or the run has a non-blank line: an empty input is
        almost always a pipeline's mistake, and \"0 pairs\" must not read as a finished job."""
        path = self.jsonl if self.jsonl is not None else self.run
        if next(_records(path), None) is None:
            raise ValueError(f"{path}: nothing to rerank: the file is empty (or holds only blank lines)")

    def paths(self) -> list:
        return [p for p in (self.jsonl, self.run, self.queries, self.corpus) if p is not None]

    def jobs(self, start: int = 0):
        """Yield the Jobs from record number `start` on (the earlier ones are passed over unread)."""
        if self.jsonl is not None:
            return self._jsonl_jobs(start)
        return self._trec_jobs(start)

    def count_pairs(self, start: int = 0) -> int:
        """Pairs the records from `start` on hold: a cheap first pass, for the progress bar's ETA."""
        total = 0
        if self.jsonl is not None:
            for number, (_, line) in enumerate(_records(self.jsonl)):
                if number >= start:
                    try:
                        total += len(json.loads(line).get("documents") or ())
                    except (ValueError, AttributeError, TypeError):  # UnicodeDecodeError is a ValueError
                        pass  # a bad line is reported when it is read for real
            return total
        for number, (_, _, lines) in enumerate(_run_groups(self.run, bad=lambda error: None)):
            if number >= start:
                total += min(len(lines), self.depth)
        return total

    def _bad(self, error: BadRecord) -> None:
        if not self.skip_bad:
            raise error
        self.skipped += 1
        self.say(f"nprerank batch: skipped: {error}")

    # --- JSONL -------------------------------------------------------------------------------

    def _jsonl_jobs(self, start: int):
        seen = {}  # query id -> the line that used it (~100 bytes a query): ids must be unique
        for number, (line_number, line) in enumerate(_records(self.jsonl)):
            if number < start:  # done in an earlier run: only its id is read back
                try:
                    seen.setdefault(_jsonl_job(self.jsonl, line_number, line, number).qid, line_number)
                except BadRecord:
                    pass  # skipped as bad by that run
                continue
            try:
                job = _jsonl_job(self.jsonl, line_number, line, number)
                if job.qid in seen:
                    raise BadRecord(
                        self.jsonl,
                        line_number,
                        f"query id {job.qid!r} was already used on line {seen[job.qid]}: ids must be unique",
                    )
                if self.trec:
                    _check_trec_ids(self.jsonl, line_number, job)
            except BadRecord as error:
                self._bad(error)
                continue
            seen[job.qid] = line_number
            yield job

    # --- the TREC run, queries and corpus ---------------------------------------------------

    def _trec_jobs(self, start: int):
        queries = LineIndex(self.queries, _query_line(self.queries), self._bad)
        corpus = LineIndex(self.corpus, _corpus_line(self.corpus), self._bad)
        for number, (qid, line_number, lines) in enumerate(_run_groups(self.run, self._bad)):
            if number < start:
                continue
            query = queries.get(qid)
            if query is None:
                self._bad(BadRecord(self.run, line_number, f"query id {qid!r} is not in {self.queries}"))
                continue
            # the run's best first (its score, ties in the run's order), as BEIR picks its top-k
            lines.sort(key=lambda entry: -entry[2])
            doc_ids, texts = [], []
            for run_line, doc_id, _ in lines[: self.depth]:
                text = corpus.get(doc_id)
                if text is None:
                    self._bad(BadRecord(self.run, run_line, f"docid {doc_id!r} is not in {self.corpus}"))
                    continue
                doc_ids.append(doc_id)
                texts.append(text)
            yield Job(number, qid, query, doc_ids, texts)


def _records(path):
    """(line number, bytes) of each non-blank line; the number counts from 1. Not decoded here:
    a line that is not UTF-8 is a bad record for the caller, and must not end the iteration."""
    with open(path, "rb") as file:
        for line_number, raw in enumerate(file, 1):
            if raw.strip() and raw.strip() != BOM:  # a byte order mark alone is a blank line too
                yield line_number, raw


def _decode(path, line_number: int, raw: bytes) -> str:
    try:
        return raw.decode("utf-8").removeprefix("\ufeff")  # a byte order mark (Windows editors) is no text
    except UnicodeDecodeError as e:
        raise BadRecord(path, line_number, f"not UTF-8 text (byte {e.start})") from None


def _json_object(path, line_number: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise BadRecord(path, line_number, f"not valid JSON: {e.msg} at column {e.colno}") from None
    if not isinstance(record, dict):
        raise BadRecord(path, line_number, f"expected a JSON object, got {type(record).__name__}")
    return record


def _text(path, line_number: int, name: str, value, empty_ok: bool = True) -> str:
    """A text field: a string, valid Unicode (JSON can carry lone surrogates), maybe non-empty."""
    if not isinstance(value, str):
        raise BadRecord(path, line_number, f"field {name!r} must be a string, got {json.dumps(value)[:60]}")
    if not empty_ok and not value.strip():
        raise BadRecord(path, line_number, f"field {name!r} is empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise BadRecord(path, line_number, f"field {name!r} is not valid Unicode (a lone surrogate)") from None
    return value


def _identifier(path, line_number: int, name: str, value) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int)) or value == "":
        raise BadRecord(
            path, line_number, f"field {name!r} must be a non-empty string or an integer, got {value!r:.60}"
        )
    return str(value)


def _jsonl_job(path, line_number: int, raw: bytes, number: int) -> Job:
    record = _json_object(path, line_number, _decode(path, line_number, raw))
    qid = _identifier(path, line_number, "id", record["id"]) if "id" in record else str(line_number)
    if "query" not in record:
        raise BadRecord(path, line_number, "field 'query' is missing")
    query = _text(path, line_number, "query", record["query"], empty_ok=False)
    if "documents" not in record:
        raise BadRecord(
            path, line_number, f"field 'documents' is missing (the record has {', '.join(map(repr, record))})"
        )
    documents = record["documents"]
    if not isinstance(documents, list):
        raise BadRecord(path, line_number, 'field \'documents\' must be a list of strings or {"id"?, "text"} objects')
    doc_ids, texts, named = [], [], False
    for i, document in enumerate(documents):
        name = f"documents[{i}]"
        if isinstance(document, dict):
            if "text" not in document:
                raise BadRecord(path, line_number, f"field '{name}.text' is missing")
            texts.append(_text(path, line_number, f"{name}.text", document["text"]))
            named |= "id" in document
            doc_ids.append(_identifier(path, line_number, f"{name}.id", document["id"]) if "id" in document else str(i))
        else:
            texts.append(_text(path, line_number, name, document))
            doc_ids.append(str(i))
    return Job(number, qid, query, doc_ids, texts, named)


def _check_trec_ids(path, line_number: int, job: Job) -> None:
    """A TREC run's columns are split at whitespace: an id holding a space or a newline would
    shift them (or start a line) and trec_eval would read another run than the one written."""
    for name, value in [("id", job.qid)] + [(f"documents[{i}].id", d) for i, d in enumerate(job.doc_ids)]:
        if value.split() != [value]:
            raise BadRecord(
                path,
                line_number,
                f"field {name!r} is {value!r:.60}: a TREC run's ids cannot hold whitespace (use --format jsonl)",
            )
    first = {}
    for i, doc_id in enumerate(job.doc_ids):  # unnamed documents are numbered: "0" may meet an id "0"
        if first.setdefault(doc_id, i) != i:
            raise BadRecord(
                path,
                line_number,
                f"documents[{i}] has the id {doc_id!r:.60} of documents[{first[doc_id]}]: a TREC run "
                "lists each document of a query once (give every document its own id, or use --format jsonl)",
            )


def trec_field(text: str) -> str:
    """argparse type of --tag: one non-empty field of a TREC line (no whitespace)."""
    if text.split() != [text]:
        raise argparse.ArgumentTypeError(f"a TREC run tag is one word without whitespace, got {text!r}")
    return text


def _run_groups(path, bad):
    """A TREC run -> (qid, first line number, [(line number, docid, score)]) per query, in file order.
    A bad line is handed to `bad` (Source._bad: raise it, or count and log it) and passed over."""
    seen, listed = set(), {}  # queries met; the current query's docids -> their line
    qid, first, lines = None, 0, []
    for line_number, raw in _records(path):
        try:
            fields = _decode(path, line_number, raw).split()
            if len(fields) != 6:
                raise BadRecord(
                    path, line_number, f"expected 6 fields `qid Q0 docid rank score tag`, got {len(fields)}"
                )
            try:
                score = float(fields[4])
            except ValueError:
                raise BadRecord(path, line_number, f"field 'score' must be a number, got {fields[4]!r:.40}") from None
            if not np.isfinite(score):  # NaN sorts anywhere: the --depth best would be a wrong set
                raise BadRecord(path, line_number, f"field 'score' must be a finite number, got {fields[4]!r:.40}")
            if fields[0] != qid and fields[0] in seen:
                raise BadRecord(
                    path,
                    line_number,
                    f"query {fields[0]!r} appears again after other queries: the run "
                    "must keep each query's lines together (sort it: sort -s -k1,1)",
                )
            if fields[0] == qid and fields[2] in listed:  # scored twice, it would be ranked twice
                raise BadRecord(
                    path,
                    line_number,
                    f"docid {fields[2]!r:.60} is listed for query {qid!r:.60} on line {listed[fields[2]]} too",
                )
        except BadRecord as error:
            bad(error)
            continue
        if fields[0] != qid:
            if qid is not None:
                yield qid, first, lines
            qid, first, lines, listed = fields[0], line_number, [], {}
            seen.add(qid)
        listed[fields[2]] = line_number
        lines.append((line_number, fields[2], score))
    if qid is not None:
        yield qid, first, lines


def _query_line(path):
    """The parser of a queries file's line: TSV `qid<TAB>text`, or JSONL `{"_id", "text"}`."""
    if Path(path).suffix.lower() in (".jsonl", ".json"):
        return _corpus_line(path)

    def parse(line_number, line):
        qid, tab, text = line.rstrip("\r\n").partition("\t")
        if not tab or not qid:
            raise BadRecord(path, line_number, "expected `qid<TAB>text`")
        return qid, _text(path, line_number, "text", text, empty_ok=False)

    return parse


def _corpus_line(path):
    """The parser of a BEIR line (corpus.jsonl, queries.jsonl) -> (its _id, the text to score):
    BEIR's `(title + " " + text).strip()`, the title empty when absent (queries have none)."""

    def parse(line_number, line):
        record = _json_object(path, line_number, line)
        if "_id" not in record:
            raise BadRecord(path, line_number, "field '_id' is missing")
        if "text" not in record:
            raise BadRecord(path, line_number, "field 'text' is missing")
        title = record.get("title")  # BEIR leaves it out, or empty, or null where there is none
        title = "" if title is None else _text(path, line_number, "title", title)
        text = _text(path, line_number, "text", record["text"])
        return _identifier(path, line_number, "_id", record["_id"]), (title + " " + text).strip()

    return parse


class LineIndex:
    """A file of id-keyed lines (queries, corpus) indexed by id, its text read back on demand.

    16 bytes per line: a 64-bit hash of the id and the byte offset of its line, in two sorted
    numpy arrays, so a million documents cost 16 MB however long their texts are. A lookup
    seeks to each line with the id's hash and checks the id there (hashes may collide).
    """

    def __init__(self, path, parse, bad):
        self.path, self.parse = path, parse
        hashes, offsets = array("q"), array("q")
        offset = 0
        with open(path, "rb") as file:
            for line_number, raw in enumerate(file, 1):
                if raw.strip():
                    try:
                        key, _ = self._parse(line_number, raw)
                        hashes.append(hash(key))
                        offsets.append(offset)
                    except BadRecord as error:
                        bad(error)
                offset += len(raw)
        hashes, offsets = np.frombuffer(hashes, dtype=np.int64), np.frombuffer(offsets, dtype=np.int64)
        order = np.argsort(hashes, kind="stable")
        self.hashes, self.offsets = hashes[order], offsets[order]  # an id on two lines: the first is read
        self.file = open(path, "rb")
        weakref.finalize(self, self.file.close)  # closed with the index, without a ResourceWarning

    def _parse(self, line_number, raw):
        return self.parse(line_number, _decode(self.path, line_number, raw))

    def get(self, key: str):
        """The text for `key` (a query's text, or a corpus document's `title text`), or None."""
        h = hash(key)
        first, last = np.searchsorted(self.hashes, h, "left"), np.searchsorted(self.hashes, h, "right")
        for offset in self.offsets[first:last].tolist():
            self.file.seek(offset)
            found, text = self._parse(0, self.file.readline())  # parsed fine while indexing
            if found == key:
                return text
        return None


# --- scoring ----------------------------------------------------------------------------------


def score_query(reranker, query: str, texts: list, batch_size: int | None = None) -> np.ndarray:
    """One query's candidates -> [D] float32 logits. Both the local loop and the Ray actors call
    this, one query per call, so a query's batches (and so its floats) never depend on others."""
    if not texts:
        return np.zeros(0, dtype=np.float32)
    return reranker.logits([(query, text) for text in texts], batch_size=batch_size)


def local_scores(reranker, jobs, batch_size: int | None = None):
    """(Job, [D] logits) for each Job, in order, in this process."""
    for job in jobs:
        yield job, score_query(reranker, job.query, job.texts, batch_size)


# --- output -----------------------------------------------------------------------------------


def format_record(job: Job, logits: np.ndarray, output_format: str, tag: str) -> str:
    """One Job's results as the text appended to the output (whole lines, ending in a newline)."""
    from .reranker import sigmoid

    if output_format == "jsonl":
        record = {"id": job.qid, "scores": sigmoid(logits).tolist()}
        if job.named:
            record["doc_ids"] = job.doc_ids
        return json.dumps(record, ensure_ascii=False) + "\n"
    # trec_eval sorts by score, ties by docid descending: the same order gives the same ranks
    order = sorted(range(len(logits)), key=lambda i: job.doc_ids[i], reverse=True)
    order.sort(key=lambda i: -logits[i])  # stable: equal logits keep the docid order
    return "".join(f"{job.qid} Q0 {job.doc_ids[i]} {rank} {str(logits[i])} {tag}\n" for rank, i in enumerate(order, 1))


# settings left out of the progress file at their default (so that jobs started before they existed
# resume), with that default: what a job without the key ran at
UNRECORDED = {"precision": "fp32"}


class Output:
    """The output file and its `.progress` companion: whole records appended, committed at batch ends."""

    def __init__(self, path, settings: dict):
        self.path = Path(path)
        if self.path.is_dir():
            raise OSError(f"--output {self.path} is a folder; name a file in it")
        if self.path.parent.exists() and not self.path.parent.is_dir():
            raise OSError(f"--output {self.path}: {self.path.parent} is a file, not a folder")
        if not self.path.parent.is_dir():
            raise OSError(f"--output {self.path}: its folder {self.path.parent} does not exist")
        if self.path.exists() and not self.path.is_file():  # /dev/null, a FIFO: not a file to resume
            raise OSError(f"--output {self.path} is not a regular file; name a file to write the results to")
        self.progress_path = self.path.with_name(self.path.name + PROGRESS_SUFFIX)
        self.settings = settings
        self.done, self.written, self.pairs, self.finished = 0, 0, 0, False
        progress = self._read_progress()
        if progress is None:
            if self.path.exists() and self.path.stat().st_size > 0:
                raise ValueError(
                    f"{self.path} exists and is not an unfinished `nprerank batch` output (no "
                    f"{self.progress_path.name}): remove it or choose another --output"
                )
            committed = 0
        elif progress["records"] == 0:  # nothing committed yet (a bad --model, an early stop): afresh
            committed = 0
        else:
            # a key only one side has (precision="int8") is a change too, told as its default's value
            before = {**UNRECORDED, **progress["settings"]}
            now = {**UNRECORDED, **settings}
            changed = [k for k in dict.fromkeys([*now, *before]) if not _same_setting(k, before.get(k), now.get(k))]
            if changed:
                told = [f"{k} {before.get(k)!r} now {now.get(k)!r}" for k in changed if k not in INPUT_STATE]
                if set(changed) & set(INPUT_STATE):  # sizes and times in nanoseconds: say what they mean
                    told.append("an input file has been edited since")
                was = ", ".join(told)
                raise ValueError(
                    f"{self.path} was started with other settings ({was}): rerun with the same "
                    f"ones, or remove it and {self.progress_path.name}"
                )
            committed, self.done, self.pairs = progress["bytes"], progress["records"], progress["pairs"]
            self.written = progress["written"]
            self.finished = progress.get("done", False)
        if committed and not self.path.exists():
            raise ValueError(
                f"{self.path} is gone, but {self.progress_path.name} beside it records {committed} bytes "
                f"written: restore it, or remove {self.progress_path} to start over"
            )
        size = self.path.stat().st_size if self.path.exists() else 0
        if size < committed:  # truncate() would pad it with zeros: something else changed the file
            raise ValueError(
                f"{self.path} is shorter ({size} bytes) than its {self.progress_path.name} says "
                f"({committed}): it was changed; remove both to start over"
            )
        if self.finished:  # nothing to write: a finished job is reported even where it cannot be written
            self.file = None
            return
        self.file = open(self.path, "ab")
        self._lock()
        self.file.truncate(committed)  # drop a torn line or a batch written but never committed
        self.file.seek(committed)
        if committed == 0:  # recorded at once: a stop before the first batch's commit resumes too
            self.commit()

    def _lock(self) -> None:
        """One job per output: a second run on the same file would truncate and append under the
        first one's feet, leaving records twice or torn. The lock dies with the process (kill -9 too)."""
        try:
            import fcntl
        except ImportError:  # not a POSIX system: no advisory locks to take
            return
        try:
            fcntl.flock(self.file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self.file.close()
            raise ValueError(
                f"{self.path} is being written by another `nprerank batch` run; wait for it, or choose another --output"
            ) from None

    def _read_progress(self):
        try:
            progress = json.loads(self.progress_path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            if getattr(e, "errno", None) == errno.ENAMETOOLONG:  # the output's name fits, with ".progress" not
                raise OSError(
                    f"--output {self.path}: the name is too long for the progress file kept beside it "
                    f"({self.progress_path.name}); choose a shorter name "
                    f"(that file adds {len(PROGRESS_SUFFIX)} characters)"
                ) from None
            raise ValueError(
                f"{self.progress_path}: unreadable ({e}); remove it and the output to start over"
            ) from None
        if not isinstance(progress, dict):
            raise ValueError(
                f"{self.progress_path}: damaged (not a JSON object); remove it and the output to start over"
            )
        if progress.get("version") != PROGRESS_VERSION:
            raise ValueError(f"{self.progress_path}: written by another version of nprerank; remove it and the output")
        if not isinstance(progress.get("settings"), dict) or not all(
            type(progress.get(key)) is int and progress[key] >= 0 for key in ("bytes", "records", "written", "pairs")
        ):
            raise ValueError(
                f"{self.progress_path}: damaged (a field is missing or of the wrong type); "
                "remove it and the output to start over"
            )
        return progress

    def write(self, job: Job, text: str) -> None:
        self.file.write(text.encode("utf-8"))
        self.done = job.number + 1  # records skipped as bad before it are done too
        self.written += 1
        self.pairs += len(job.texts)

    def commit(self, done: bool = False) -> None:
        """Make everything written so far durable, then record it: the output first, so the
        progress file never points past bytes that are on disk."""
        self.file.flush()
        os.fsync(self.file.fileno())
        self.finished = done
        progress = dict(
            version=PROGRESS_VERSION,
            settings=self.settings,
            bytes=self.file.tell(),
            records=self.done,
            written=self.written,
            pairs=self.pairs,
            done=done,
        )
        temporary = self.progress_path.with_name(self.progress_path.name + ".tmp")
        with open(temporary, "w", encoding="utf-8") as file:
            json.dump(progress, file)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, self.progress_path)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


# --- progress ---------------------------------------------------------------------------------


class Progress:
    """Pairs done, pairs/s and ETA: a tqdm bar on a terminal, else a plain line every PROGRESS_EVERY s."""

    def __init__(self, total: int, say):
        self.total, self.say, self.done = total, say, 0
        self.start = self.last = time.monotonic()
        self.bar = None
        if sys.stderr.isatty():
            try:
                from tqdm import tqdm  # brought by huggingface_hub (tokenizers' dependency)

                self.bar = tqdm(total=total, unit="pair", dynamic_ncols=True, desc="nprerank batch")
            except ImportError:
                pass

    def update(self, pairs: int) -> None:
        self.done += pairs
        if self.bar is not None:
            self.bar.update(pairs)
            return
        now = time.monotonic()
        if now - self.last >= PROGRESS_EVERY:
            self.last = now
            self.say(f"nprerank batch: {self.line(now)}")

    def line(self, now: float) -> str:
        rate = self.done / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else float("inf")
        share = f" ({100 * self.done / self.total:.1f}%)" if self.total else ""
        return f"{self.done}/{self.total} pairs{share}, {rate:.1f} pairs/s, ETA {_duration(eta)}"

    def close(self) -> float:
        if self.bar is not None:
            self.bar.close()
        return time.monotonic() - self.start


def _duration(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s" if hours else f"{minutes}m{seconds:02d}s"


# --- the job ----------------------------------------------------------------------------------


def run(source: Source, output: Output, scored, output_format: str, tag: str, batch_size: int, say) -> dict:
    """Write each (Job, logits) of `scored` to `output`, committing whenever a batch's worth of
    pairs (`batch_size`) has been written since the last commit; returns a summary."""
    progress = Progress(source.count_pairs(output.done), say)
    pending, pairs, records = 0, 0, 0
    try:
        for job, logits in scored:
            output.write(job, format_record(job, logits, output_format, tag))
            progress.update(len(job.texts))
            pending += len(job.texts)
            pairs += len(job.texts)
            records += 1
            if pending >= batch_size:
                output.commit()
                pending = 0
        output.commit(done=True)
    finally:
        seconds = progress.close()
        output.close()
    return dict(records=records, pairs=pairs, seconds=seconds)


def add_arguments(parser) -> None:
    """`nprerank batch`'s arguments (cli.py registers the subcommand and hands them here)."""
    from .cli import _add_model_arguments

    inputs = parser.add_argument_group("input (a JSONL file, or --run with --queries and --corpus)")
    inputs.add_argument(
        "input",
        metavar="INPUT",
        nargs="?",
        type=Path,
        help='JSONL: {"id"?, "query", "documents": [str | {"id"?, "text"}]} per line',
    )
    inputs.add_argument("--run", type=Path, metavar="RUN", help="a TREC run: qid Q0 docid rank score tag")
    inputs.add_argument(
        "--queries", type=Path, metavar="PATH", help='queries: TSV qid<TAB>text, or JSONL {"_id", "text"}'
    )
    inputs.add_argument("--corpus", type=Path, metavar="PATH", help='a BEIR corpus.jsonl: {"_id", "text", "title"?}')
    inputs.add_argument(
        "--depth", type=positive_int, metavar="K", help=f"rerank the K best of each query of the run (default {DEPTH})"
    )
    inputs.add_argument("--skip-bad", action="store_true", help="log a bad line (file, line, field) and go on")
    out = parser.add_argument_group("output")
    out.add_argument(
        "--output",
        "-o",
        type=Path,
        required=True,
        metavar="PATH",
        help="results file; rerun with the same one to resume (OUTPUT.progress tracks it)",
    )
    out.add_argument(
        "--format",
        choices=FORMATS,
        default="jsonl",
        help="jsonl: {id, scores, doc_ids?} per query in input order; trec: a run, best first",
    )
    out.add_argument(
        "--tag", type=trec_field, default="nprerank", help="the run tag of --format trec (default %(default)s)"
    )
    _add_model_arguments(parser)
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=32,
        metavar="N",
        help="most pairs per forward pass; results are committed every N pairs (default %(default)s)",
    )
    cluster = parser.add_argument_group("Ray")
    cluster.add_argument(
        "--ray",
        nargs="?",
        const="",
        metavar="ADDRESS",
        help="run as a Ray Data pipeline, on the cluster at ADDRESS (default: $RAY_ADDRESS, else "
        "a local one); needs pip install 'nprerank[ray]'",
    )
    cluster.add_argument(
        "--concurrency",
        type=positive_int,
        metavar="N",
        help="Ray actors, each loading the model once (default: the cluster's CPUs / --threads)",
    )


def _model_folder(model) -> Path | None:
    """The folder `--model` names, resolved (absolute, links followed), or None for a repo id."""
    folder = Path(os.path.expanduser(str(model)))
    return folder.resolve() if folder.is_dir() else None


INPUT_STATE = ("sizes", "modified")  # settings that tell an input file was edited, not chosen otherwise


def _same_setting(key: str, before, now) -> bool:
    """Whether a job's setting is unchanged: a model folder is the same folder however it is
    written (relative, with a trailing slash, through a link)."""
    if key == "model" and isinstance(before, str) and isinstance(now, str):
        folders = [_model_folder(name) for name in (before, now)]
        if None not in folders:
            return folders[0] == folders[1]
    return before == now


def run_from_args(args, say=None) -> int:
    say = say or (lambda line: print(line, file=sys.stderr, flush=True))
    source = _source(args, say)
    stats = [p.stat() for p in source.paths()]
    settings = dict(
        model=str(_model_folder(args.model) or args.model),
        inputs=[str(p.resolve()) for p in source.paths()],
        sizes=[stat.st_size for stat in stats],
        modified=[stat.st_mtime_ns for stat in stats],  # an edit that keeps the size
        depth=source.depth,
        format=args.format,
        tag=args.tag,
        max_length=args.max_length,
        truncation=args.truncation,
        long_documents=args.long_documents,
        engine=args.engine,
    )
    if args.precision != "fp32":  # absent from fp32 jobs' settings, so that those started before it resume
        settings["precision"] = args.precision
    output = Output(args.output, settings)
    if output.finished:
        output.close()
        say(
            f"nprerank batch: {args.output} is complete ({count(output.written, 'query')}, "
            f"{count(output.pairs, 'pair')}); nothing to do"
        )
        return 0
    if output.done:
        so_far = f"{count(output.written, 'query')} ({count(output.pairs, 'pair')})"
        say(f"nprerank batch: resuming {args.output} after {so_far}")
    options = reranker_options(args)
    jobs = source.jobs(output.done)
    if args.ray is not None:
        try:
            from . import ray as on_ray
        except ModuleNotFoundError as e:
            if e.name not in ("ray", "pyarrow"):
                raise
            raise OSError(f"`nprerank batch --ray` needs {e.name}: pip install 'nprerank[ray]'") from None
        check_model_here(args.model, options, local_cluster=not args.ray)
        scored = on_ray.scores(
            jobs, args.model, options, address=args.ray or None, concurrency=args.concurrency, threads=args.threads
        )
    else:
        from .reranker import Reranker
        from .startup import warm_up

        reranker = Reranker.from_pretrained(args.model, **options)
        warm_up(reranker, say=say)  # a first run compiles the kernels: say so, before the silent wait
        scored = local_scores(reranker, jobs)
    summary = run(source, output, scored, args.format, args.tag, args.batch_size, say)
    if output.written == 0 and source.skipped:  # --skip-bad passed over every record: nothing was done
        output.path.unlink()  # empty: no output, and no finished job to resume, is left behind
        output.progress_path.unlink()
        raise ValueError(f"no record could be scored: all {count(source.skipped, 'bad record')} were skipped")
    rate = summary["pairs"] / max(summary["seconds"], 1e-9)
    skipped = f", {count(source.skipped, 'bad record')} skipped" if source.skipped else ""
    say(
        f"nprerank batch: {count(summary['pairs'], 'pair')} of {count(summary['records'], 'query')} in "
        f"{summary['seconds']:.1f} s ({rate:.1f} pairs/s){skipped} -> {args.output}"
    )
    return 0


def count(n: int, noun: str) -> str:
    """'1 query', '2 queries', '0 pairs': a number and its noun, plural unless n is 1."""
    if n == 1:
        return f"1 {noun}"
    return f"{n} {noun[:-1]}ies" if noun.endswith("y") else f"{n} {noun}s"


def check_model_here(model, options: dict, local_cluster: bool) -> None:
    """Before a Ray job: load a model folder this process can see, memory-mapped by the reference
    engine (no layout written, nothing copied), so that a missing or broken one is this process's
    one-line ModelError, not a traceback from every actor (Ray prints those whatever log_to_driver
    says). On a cluster at an ADDRESS a path only its workers have, or a repo id, is theirs to load."""
    if not local_cluster and not Path(str(model)).exists():
        return
    from .reranker import Reranker

    Reranker.from_pretrained(model, **{**options, "engine": "reference", "precision": "fp32"})


def reranker_options(args) -> dict:
    """The command line's Reranker.from_pretrained options (None: the Reranker's default)."""
    options = dict(
        truncation=args.truncation,
        long_documents=args.long_documents,
        batch_size=args.batch_size,
        engine=args.engine,
        precision=args.precision,
    )
    for name in ("max_length", "threads"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    return options


def _source(args, say) -> Source:
    trio = (args.run, args.queries, args.corpus)
    if args.input is not None and any(trio):
        raise UsageError("give either a JSONL INPUT or --run, --queries and --corpus, not both")
    if args.input is None and not all(trio):
        missing = [name for name, value in zip(("--run", "--queries", "--corpus"), trio) if value is None]
        raise UsageError(
            f"no input: give a JSONL INPUT, or --run, --queries and --corpus ({', '.join(missing)} missing)"
        )
    if args.input is not None and args.depth is not None:  # a JSONL record is scored whole: say so, not ignore it
        raise UsageError(
            "--depth picks the best of a --run's candidates; a JSONL INPUT's documents are all scored "
            "(keep the ones you want in the file)"
        )
    if args.concurrency is not None and args.ray is None:  # the actors of a Ray run; alone it would do nothing
        raise UsageError("--concurrency sets how many Ray actors score; give --ray with it")
    if "-" in (str(args.output), str(args.input), *map(str, trio)):  # the Unix "stdin/stdout" name
        raise UsageError(
            "batch reads and writes files, not stdin or stdout (it reads its inputs more than once, "
            "and resumes from its output): name the files"
        )
    depth = args.depth if args.depth is not None else DEPTH
    source = Source(
        args.input, args.run, args.queries, args.corpus, depth, args.skip_bad, say, trec=args.format == "trec"
    )
    for path in source.paths():
        if not path.exists():
            raise OSError(f"{path}: no such file")
        if not path.is_file():  # a pipe or /dev/stdin: read once, it could not be counted, indexed or resumed
            raise OSError(
                f"{path}: not a regular file (the job reads its inputs more than once: to count the "
                "pairs, to index ids, to resume); save it to a file first"
            )
        if args.output.resolve() == path.resolve():
            raise UsageError(f"--output {args.output} is also an input")
    source.check_not_empty()
    return source
