"""The worker thread that owns the model: loads and warms it up, scores queued requests in shared
forward calls, and stops serving (then reloads) when the checkpoint changes under it.

It knows nothing of dialects: a job is a list of token-id sequences and a future for their
logits. Its states, which /health reports:

    loading --(loaded, warmed up)--> ready --(model.safetensors changed)--> stale
       ^                               ^                                       |
       |                               +----(reloaded, warmed up)--------------+  (with a loader)
    failed: the first load failed (the server then stops)

Why a changed checkpoint matters: the weights are memory-mapped, so bytes overwritten in place
show up in the running model (a mix of old and new weights), and a file truncated under the map
kills the process with SIGBUS when a forward pass touches the missing pages. The thread asks
`Weights.changed()` (a stat of the file, no reading) before every batch and once a second when
idle; from the moment it answers, no request is scored with those weights. With a loader (what
`nprerank serve` gives) the thread then loads the file anew, after a second for a copy in
progress to finish, and retries with a growing pause while the file does not load. Replacing the
file by a rename (`cp new tmp && mv tmp model.safetensors`) leaves the running map intact and is
the safe way to update a served model; writing into it in place is not.

Read next: app.py (who submits the jobs).
"""

import concurrent.futures
import logging
import queue
import threading
import time
from dataclasses import dataclass

from .. import startup
from .protocol import ApiError

log = logging.getLogger("uvicorn.error")  # uvicorn's logger, so our lines share its format
SETTLE_SECONDS = 1.0  # after a change is seen, before reloading: lets a copy in progress finish
RETRY_SECONDS = (2.0, 60.0)  # the first and the longest pause between reload attempts of a bad file


@dataclass
class Job:
    sequences: list  # token-id sequences of one request, ready for the model
    tokens: int  # what those sequences cost the batch's token budget
    future: concurrent.futures.Future  # -> [len(sequences)] float32 logits


class Batcher:
    """A queue of jobs and one thread that loads the model, then scores the jobs in batches.

    The thread takes the oldest job, adds later ones while their tokens fit in `batch_tokens`,
    and runs one `reranker.run` over all their sequences (the Reranker sorts and sub-batches them
    under its own memory budget). A job whose client went away is cancelled and skipped.
    """

    def __init__(self, reranker_or_loader, batch_tokens: int):
        if callable(reranker_or_loader) and not hasattr(reranker_or_loader, "run"):
            self.reranker, self._load = None, reranker_or_loader
        else:
            self.reranker, self._load = reranker_or_loader, None
        self.queue = queue.Queue()  # unbounded here: build_app admits at most --queue-size requests
        self.batch_tokens = batch_tokens
        self.state = "loading"
        self.problem = None  # why the state is not "ready", in one line
        self.on_load_failure = lambda: None  # serve() sets this to stop the server
        self.forward_calls = 0  # one per batch: requests_scored / forward_calls is the batching gain
        self.requests_scored = 0
        self._change = None  # what Weights.changed() said, while stale
        self._retry, self._next_reload = RETRY_SECONDS[0], 0.0
        self._stopping = threading.Event()
        self.settled = threading.Event()  # set once the first load ended: "ready" or "failed"
        self.serve_when_settled = False  # a --workers worker: accept nothing before then (app.py)
        self._thread = threading.Thread(target=self._work, name="nprerank-model", daemon=True)

    def start(self):
        self._thread.start()

    def stop(self, timeout: float = 5.0):
        self._stopping.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def check_ready(self):
        """Raise the 503 a request gets when the model cannot score it now."""
        if self.state == "ready":
            return
        if self.state == "loading" and self.problem is None:
            raise ApiError(
                "loading", "the model is still loading; retry in a few seconds (GET /health says when ready)"
            )
        if self.state == "failed":
            raise ApiError("loading", f"the model failed to load: {self.problem}")
        raise ApiError("loading", f"{self.problem}; retry in a few seconds (GET /health says when ready)")

    def submit(self, sequences: list, tokens: int) -> Job:
        self.check_ready()
        job = Job(sequences, tokens, concurrent.futures.Future())
        self.queue.put(job)
        return job

    @staticmethod
    def cancel(job: Job) -> None:
        """The client left: skip the job if it has not started, and let go of its texts now."""
        if job.future.cancel():
            job.sequences = []

    # --- the model thread ----------------------------------------------------------------------

    def _work(self):
        try:
            self.reranker = self._load() if self._load is not None else self.reranker
            self._warm_up(self.reranker)
        except Exception as e:  # any load failure: report it, then stop the server
            self.state, self.problem = "failed", str(e) or type(e).__name__
            log.error("could not load the model: %s", self.problem)
            self.settled.set()
            self.on_load_failure()
            return
        self.state = "ready"
        self.settled.set()
        log.info("model loaded; ready")
        held = None  # a job taken from the queue that did not fit the previous batch
        while not self._stopping.is_set():
            if held is None:
                try:
                    held = self.queue.get(timeout=1.0)
                except queue.Empty:
                    self._watch_weights()
                    continue
            self._watch_weights()  # never score a batch with weights that changed
            if self.state != "ready":
                self._refuse(held)
                held = None
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

    @staticmethod
    def _warm_up(reranker):
        """Score one pair before saying ready, so no request waits for the kernels to compile."""
        seconds = startup.warm_up(reranker, say=log.info)  # says so when it compiles (first run only)
        log.info("engine warmed up in %.1f s", seconds)

    def _changed(self) -> str | None:
        """Weights.changed(): None while model.safetensors is as it was at load, else why not."""
        changed = getattr(getattr(self.reranker, "weights", None), "changed", None)
        return changed() if changed is not None else None

    def _watch_weights(self):
        if self.state == "ready":
            change = self._changed()
            if change is None:
                return
            self._change = f"the model's weights changed on disk ({change})"
            self.state, self.problem = "stale", f"{self._change}; not serving them"
            log.warning("%s", self.problem)
            self._retry, self._next_reload = RETRY_SECONDS[0], time.monotonic() + SETTLE_SECONDS
        if self.state == "stale" and self._load is not None and time.monotonic() >= self._next_reload:
            self._reload()

    def _reload(self):
        self.state, self.problem = "loading", f"{self._change}; reloading it"
        log.info("reloading the model")
        try:
            reranker = self._load()
            self._warm_up(reranker)
        except Exception as e:
            self.state = "stale"
            self.problem = f"{self._change}; reloading failed ({e}), next try in {self._retry:g} s"
            log.warning("%s", self.problem)
            self._next_reload = time.monotonic() + self._retry
            self._retry = min(2 * self._retry, RETRY_SECONDS[1])
            return
        self.reranker, self.state, self.problem = reranker, "ready", None
        log.info("model reloaded; ready")

    def _refuse(self, job: Job):
        """A job queued before the model went stale: answer it 503 rather than with stale weights."""
        try:
            self.check_ready()
        except ApiError as error:
            if job.future.running() or job.future.set_running_or_notify_cancel():
                job.future.set_exception(error)

    def _score(self, jobs: list):
        if not jobs:
            return
        try:
            logits = self.reranker.run([sequence for job in jobs for sequence in job.sequences])  # [all sequences]
        except Exception as e:
            self._watch_weights()
            if self.state != "ready":  # the engine noticed the change first: not the requests' fault
                for job in jobs:
                    self._refuse(job)
                return
            if len(jobs) > 1:  # one failing request must not fail the others batched with it
                for job in jobs:
                    self._score([job])
                return
            log.exception("scoring failed")
            jobs[0].future.set_exception(ApiError("internal", f"scoring failed: {type(e).__name__}: {e}"))
            return
        self.forward_calls += 1
        self.requests_scored += len(jobs)
        start = 0
        for job in jobs:
            job.future.set_result(logits[start : start + len(job.sequences)])
            start += len(job.sequences)
