"""nprerank on Ray: the actor class for Ray Data pipelines, and `nprerank batch --ray`'s pipeline.

The only module that imports `ray` (the `ray` extra: `pip install 'nprerank[ray]'`); nothing
else in nprerank imports this one unless asked to.

- `RerankActor`: a callable class for `Dataset.map_batches`. Each actor loads the model once
  (`Reranker.from_pretrained`) and adds a column of [D] float32 logits to each row, scoring the
  row's query against its documents with batch.score_query: one call per row, so a row's
  numbers never depend on how Ray cut the rows into batches or which actor took them. In your
  own pipeline:

      import ray
      from nprerank.ray import RerankActor

      ds = ray.data.read_json("queries.jsonl")       # rows {"query": str, "documents": [str]}
      ds = ds.map_batches(RerankActor, fn_constructor_kwargs={"model": "BAAI/bge-reranker-base",
                          "threads": 2}, batch_format="pyarrow", num_cpus=2, concurrency=4)
      ds.write_json("scored/")                      # rows gain "logits": [float32]

- `scores(jobs, model, options, ...)`: what `nprerank batch --ray` runs. The driver reads the
  inputs with batch.py's readers (the same records, ids and texts as the local run) into Arrow
  tables put in Ray's object store (which spills to disk, so the driver's memory stays one table),
  the actors rerank them (`map_batches`, `concurrency` actors of `threads` CPUs each), and the
  results come back in input order (`preserve_order`) to be written by batch.py exactly as a
  local run writes them. Same records, same per-query calls, same floats: the output files are
  identical byte for byte (tests/test_ray.py).

Read next: batch.py (the job), reranker.py.
"""

import logging
import os
import socket

import numpy as np
import pyarrow as pa
import ray

from .batch import Job, score_query
from .config import ModelError

CONNECT_SECONDS = 10  # to reach a cluster's head before handing the address to ray.init
ROWS_PER_BLOCK = 64  # queries per Arrow table in the object store: a unit of Ray's scheduling


class RerankActor:
    """A Ray Data callable class: rows {query: str, documents: [str], ...} -> the same rows plus
    `logits`: [D] float32, the model's raw logit per document (sigmoid it for a [0, 1] score).

    model and options: as Reranker.from_pretrained (threads: CPU threads of this actor; give the
    actor as many CPUs, `num_cpus=threads`, so that actors do not fight over cores). batch_size:
    most pairs per forward pass. query_column, documents_column, output_column: column names.
    """

    def __init__(
        self,
        model="BAAI/bge-reranker-base",
        threads: int = 1,
        batch_size: int | None = None,
        query_column: str = "query",
        documents_column: str = "documents",
        output_column: str = "logits",
        **options,
    ):
        from .reranker import Reranker

        self.reranker = Reranker.from_pretrained(model, threads=threads, **options)
        self.batch_size = batch_size
        self.query_column, self.documents_column, self.output_column = query_column, documents_column, output_column

    def __call__(self, batch: pa.Table) -> pa.Table:
        """A pyarrow batch (map_batches(..., batch_format="pyarrow")) -> the batch with `logits`."""
        queries = batch.column(self.query_column).to_pylist()
        documents = batch.column(self.documents_column).to_pylist()
        logits = [score_query(self.reranker, query, texts, self.batch_size) for query, texts in zip(queries, documents)]
        # list<float32>: Arrow keeps the float32 bits, so the driver sees exactly these numbers
        return batch.append_column(self.output_column, pa.array(logits, type=pa.list_(pa.float32())))


def scores(
    jobs, model, options: dict, address: str | None = None, concurrency: int | None = None, threads: int | None = None
):
    """batch.py's Jobs -> (Job, [D] float32 logits) in input order, scored by Ray actors.

    address: a Ray cluster (None: an already initialised Ray, else $RAY_ADDRESS, else a new local
    one, shut down at the end). concurrency: actors (default: the cluster's CPUs / threads).
    threads: CPU threads per actor (default 1).
    """
    threads = threads or 1
    started = not ray.is_initialized()
    if started:
        _check_reachable(address or os.environ.get("RAY_ADDRESS"))
        ray.init(address=address, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        context = ray.data.DataContext.get_current()
        context.execution_options.preserve_order = True  # results in input order, as the local run
        context.enable_progress_bars = False  # batch.py reports progress in pairs
        # not a line per dataset started, nor Ray Data's own copy of a traceback: a failure is raised
        # below as one line (a model an actor cannot load), as the local job reports it
        logging.getLogger("ray.data").setLevel(logging.CRITICAL)
        refs = [ray.put(table) for table in _tables(jobs)]  # the read: staged in the object store
        if not refs:
            return
        if concurrency is None:
            concurrency = max(1, int(ray.cluster_resources().get("CPU", 1) // threads))
        concurrency = min(concurrency, len(refs))  # an actor with no block to take would only load the model
        options = {k: v for k, v in options.items() if k != "threads"}
        dataset = ray.data.from_arrow_refs(refs).map_batches(
            RerankActor,
            fn_constructor_kwargs=dict(model=str(model), threads=threads, **options),
            batch_format="pyarrow",
            batch_size=None,
            num_cpus=threads,
            compute=ray.data.ActorPoolStrategy(size=concurrency),
        )
        try:
            for table in dataset.drop_columns(["query", "documents"]).iter_batches(
                batch_size=None, batch_format="pyarrow"
            ):
                for row in table.to_pylist():
                    job = Job(row["number"], row["qid"], "", row["doc_ids"], [""] * len(row["doc_ids"]), row["named"])
                    yield job, np.asarray(row["logits"], dtype=np.float32)
        except (ray.exceptions.RayError, ray.data.exceptions.SystemException) as error:
            raise ModelError(f"the Ray job failed: {_last_line(error)}") from error
    finally:
        if started:
            ray.shutdown()


def _check_reachable(address: str | None) -> None:
    """Refuse a cluster address nobody answers at, in one line: ray.init would retry it for
    minutes, printing a warning every few seconds. ADDRESS is host:port or ray://host:port
    ("auto", "local" and None are Ray's own to resolve)."""
    if not address or address in ("auto", "local") or ("://" in address and not address.startswith("ray://")):
        return  # Ray's own to resolve (an http:// one is the dashboard's, which `ray job submit` uses)
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if not port.isdigit():
        return  # not a form we can check: Ray says what it makes of it
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=CONNECT_SECONDS).close()
    except OSError as e:
        raise OSError(
            f"no Ray cluster answers at {address} ({e.strerror or e}): start one (`ray start --head`), "
            "or drop ADDRESS to run on a local Ray"
        ) from None


def _last_line(error: BaseException) -> str:
    """What went wrong, in one line: Ray wraps an actor's exception (a model it cannot load) in
    its own, whose text ends with the original `module.Error: message` line (the exceptions it is
    chained to may have no text at all); take the first that says something."""
    first = error
    while error is not None:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        if lines:
            return lines[-1]
        error = error.__cause__ or error.__context__
    return type(first).__name__


def _tables(jobs):
    """Jobs -> pyarrow Tables of ROWS_PER_BLOCK rows: number, qid, query, documents, doc_ids, named."""
    rows = []
    for job in jobs:
        rows.append(
            dict(
                number=job.number,
                qid=job.qid,
                query=job.query,
                documents=job.texts,
                doc_ids=job.doc_ids,
                named=job.named,
            )
        )
        if len(rows) == ROWS_PER_BLOCK:
            yield pa.Table.from_pylist(rows, schema=SCHEMA)
            rows = []
    if rows:
        yield pa.Table.from_pylist(rows, schema=SCHEMA)


SCHEMA = pa.schema(
    [
        ("number", pa.int64()),
        ("qid", pa.string()),
        ("query", pa.string()),
        ("documents", pa.list_(pa.string())),
        ("doc_ids", pa.list_(pa.string())),
        ("named", pa.bool_()),
    ]
)
