"""The worker thread that owns the model and scores queued requests in shared forward calls.

It knows nothing of dialects: a job is a list of (query, text) pairs and a future for their
logits. Read next: app.py (who submits the jobs).
"""

import concurrent.futures
import logging
import queue
import threading
from dataclasses import dataclass

from .protocol import ApiError

log = logging.getLogger("uvicorn.error")  # uvicorn's logger, so our lines share its format


@dataclass
class Job:
    pairs: list  # [(query, text)] of one request
    tokens: int  # what those pairs cost the batch's token budget
    future: concurrent.futures.Future  # -> [len(pairs)] float32 logits


class Batcher:
    """A queue of jobs and one thread that loads the model, then scores the jobs in batches.

    The thread takes the oldest job, adds later ones while their tokens fit in `batch_tokens`,
    and runs one `reranker.logits` over all their pairs (the Reranker sorts and sub-batches them
    under its own memory budget). A job whose client went away is cancelled and skipped.
    """

    def __init__(self, reranker_or_loader, batch_tokens: int):
        if callable(reranker_or_loader) and not hasattr(reranker_or_loader, "logits"):
            self.reranker, self._load = None, reranker_or_loader
        else:
            self.reranker, self._load = reranker_or_loader, None
        self.queue = queue.Queue()  # unbounded here: build_app admits at most --queue-size requests
        self.batch_tokens = batch_tokens
        self.load_error = None
        self.on_load_failure = lambda: None  # serve() sets this to stop the server
        self.forward_calls = 0  # one per batch: requests_scored / forward_calls is the batching gain
        self.requests_scored = 0
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._work, name="nprerank-model", daemon=True)

    @property
    def state(self) -> str:
        return "failed" if self.load_error else "ready" if self.reranker is not None else "loading"

    def start(self):
        self._thread.start()

    def stop(self, timeout: float = 5.0):
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def check_ready(self):
        if self.load_error:
            raise ApiError("loading", f"the model failed to load: {self.load_error}")
        if self.reranker is None:
            raise ApiError("loading", "the model is still loading; retry in a few seconds (GET /health says when ready)")

    def submit(self, pairs: list, tokens: int) -> Job:
        self.check_ready()
        job = Job(pairs, tokens, concurrent.futures.Future())
        self.queue.put(job)
        return job

    @staticmethod
    def cancel(job: Job) -> None:
        """The client left: skip the job if it has not started, and let go of its texts now."""
        if job.future.cancel():
            job.pairs = []

    def _work(self):
        if self._load is not None:
            try:
                self.reranker = self._load()
            except Exception as e:  # any load failure: report it, then stop the server
                self.load_error = str(e) or type(e).__name__
                log.error("could not load the model: %s", self.load_error)
                self.on_load_failure()
                return
            log.info("model loaded; ready")
        held = None  # a job taken from the queue that did not fit the previous batch
        while not self._stopping.is_set():
            if held is None:
                try:
                    held = self.queue.get(timeout=0.2)
                except queue.Empty:
                    continue
            jobs, tokens, held = [held], held.tokens, None
            while tokens < self.batch_tokens:
                try:
                    job = self.queue.get_nowait()
                except queue.Empty:
                    break
                if job.future.cancelled():  # its client left: it takes no room in the batch
                    continue
                if tokens + job.tokens > self.batch_tokens:
                    held = job
                    break
                jobs.append(job)
                tokens += job.tokens
            self._score([job for job in jobs if job.future.set_running_or_notify_cancel()])

    def _score(self, jobs: list):
        if not jobs:
            return
        try:
            logits = self.reranker.logits([pair for job in jobs for pair in job.pairs])  # [sum of pairs]
        except Exception as e:
            if len(jobs) > 1:  # one failing request must not fail the others batched with it
                for job in jobs:
                    self._score([job])
                return
            log.exception("scoring failed")
            jobs[0].future.set_exception(ApiError("internal", f"scoring failed: {e}"))
            return
        self.forward_calls += 1
        self.requests_scored += len(jobs)
        start = 0
        for job in jobs:
            job.future.set_result(logits[start : start + len(job.pairs)])
            start += len(job.pairs)
