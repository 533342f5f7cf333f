"""`nprerank serve --workers N`: N server processes on one port, sharing one copy of the weights.

The parent binds the port once and starts N children (multiprocessing's "spawn": fresh
interpreters, no threads inherited); each child runs the ordinary `serve()` on the inherited
listening socket, and the kernel hands each new connection to one of them. A worker loads the
model before it accepts anything, so no connection reaches a worker that would answer 503; until
the first is ready, connections wait in the kernel's queue. Each child loads the
model itself, but nprerank memory-maps model.safetensors and the packed layout file
(layout.py), so the N children map the same page-cache pages: an extra worker costs its private
memory only (Python, Numba's compiled kernels, the tokenizer, its batch buffers), not another copy
of the 1.1 GB of weights. docs/scale.md has the measured numbers.

Why processes: the fast engine already uses every core for one forward pass, so extra workers
are for a host with more cores than one pass can use, or to keep answering while one worker
is busy with a long batch. Each worker keeps its own queue and batches (--queue-size and
--batch-tokens are per worker).

Before the workers, one short-lived process loads the model and scores a pair: it writes the
caches (layout file, compiled kernels) that the workers then only read, and a model that cannot
be loaded is reported before any worker starts.

Lifecycle: SIGTERM or Ctrl-C to the parent is passed to every child, each of which stops taking
connections and finishes the requests it holds (uvicorn's graceful shutdown, --shutdown-timeout
where the server has it), then the parent exits 0. A child that fails (the model cannot be
loaded) stops the others and the parent exits 1; a child killed by a signal nobody sent is
replaced, so a crash costs one worker's in-flight requests, not the service.

Read next: run.py (`serve()`, what each child runs).
"""

import logging
import multiprocessing
import signal
import socket
import threading

from ..config import ModelError

log = logging.getLogger("uvicorn.error")


def serve_replicas(workers: int, serve_options: dict) -> None:
    """Run `run.serve(**serve_options)` in `workers` processes on one listening socket, until
    SIGTERM or Ctrl-C. Raises ModelError when a worker fails to start (e.g. a model that does not load)."""
    import logging.config

    from uvicorn.config import LOGGING_CONFIG

    logging.config.dictConfig(LOGGING_CONFIG)  # the parent's lines in the format of the workers' (uvicorn's)
    listener = bind(serve_options.get("host", "127.0.0.1"), serve_options.get("port", 8080))
    context = multiprocessing.get_context("spawn")
    stopping = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stopping.set()) for sig in (signal.SIGINT, signal.SIGTERM)}

    # First, once: write the caches every worker then only maps (the packed weight layout, Numba's
    # compiled kernels). Workers that all found the layout missing would each write their own
    # file and map different copies: no sharing, and N compilations at once.
    prepare = context.Process(target=_prepare, args=(serve_options,))
    prepare.start()
    prepare.join()
    if prepare.exitcode:
        listener.close()
        raise ModelError(f"the model {serve_options.get('model')} could not be loaded (the error is above)")

    def start():
        child = context.Process(target=_child, args=(serve_options, listener), daemon=False)
        child.start()
        return child

    children = [start() for _ in range(workers)]
    log.info("serving with %d worker processes: %s", workers, " ".join(str(c.pid) for c in children))
    failed = None
    try:
        while not stopping.wait(0.5):
            for i, child in enumerate(children):
                if child.exitcode is None:
                    continue
                if child.exitcode < 0:  # killed by a signal we did not send: replace it
                    log.warning("worker %d died (signal %d); starting another", child.pid, -child.exitcode)
                    children[i] = start()
                else:  # it ended by itself: the model failed to load, or serve() could not start
                    failed = child.exitcode
                    stopping.set()
    finally:
        for child in children:
            if child.exitcode is None:
                child.terminate()  # SIGTERM: uvicorn's graceful shutdown in the child
        for child in children:
            child.join()
        listener.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if failed:
        raise ModelError(f"a worker exited with code {failed} (its error is above); stopped the others")


def bind(host: str, port: int) -> socket.socket:
    """The listening socket all workers accept on (as uvicorn binds it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    listener = socket.socket(family, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as e:
        listener.close()
        raise OSError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    listener.listen(2048)
    listener.set_inheritable(True)
    return listener


def _prepare(serve_options: dict) -> None:
    """Load the model once and score one pair, so that its layout file and the kernels are cached."""
    import sys

    from ..reranker import Reranker
    from .run import model_options

    try:
        Reranker.from_pretrained(serve_options["model"], **model_options(serve_options)).logits([("warm", "up")])
    except (ValueError, OSError) as e:  # ModelError is a ValueError
        print(f"nprerank serve: {e}", file=sys.stderr, flush=True)
        sys.exit(1)


def _child(serve_options: dict, listener: socket.socket) -> None:
    """One worker: the ordinary server on the shared socket; exit 1 if it cannot serve."""
    import os
    import sys

    from .run import serve

    # Our own process group: a Ctrl-C in the terminal reaches the parent only, which passes ONE
    # SIGTERM on (a second signal would make uvicorn drop the requests it is finishing).
    os.setpgrp()
    parent = os.getppid()

    def orphaned():  # the parent was killed (SIGKILL): stop as if told to, not serve on alone
        while os.getppid() == parent:
            threading.Event().wait(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=orphaned, daemon=True).start()
    try:
        serve(**serve_options, sockets=[listener], preload=True)
    except (ValueError, OSError) as e:  # ModelError is a ValueError
        print(f"nprerank serve: worker: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
