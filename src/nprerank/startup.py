"""Warming the engine up before the first real request, and saying so when that means compiling.

The fast engine's Numba kernels are compiled on the very first run (about a minute on 2 cores) and
loaded from Numba's on-disk cache afterwards (well under a second). Without a warm-up that wait
lands on the first user's request, and a health check says "ready" while it is not. `warm_up`
scores one tiny pair, which calls every kernel the forward pass uses, so each one is compiled or
loaded before anything else happens; the CLI and the server both call it at start.

How it knows a run compiles: it listens to Numba's own "numba:compile" event (numba.core.event,
Numba's documented event API), which a dispatcher broadcasts when, and only when, it really
compiles: after its cache lookup failed, right before the compiler runs. So the notice comes
before the wait, and it is never a guess:
- timing cannot tell (loading from the cache takes seconds too on a busy 2-core machine, and the
  time is only known afterwards);
- reading the cache index files ahead of time can: but Numba's index is keyed by signature, CPU
  and bytecode hashes and goes stale with the source file's stamp, so a copy of those rules would
  drift from Numba's own, and kernels that exist but are never called (naive twins) would look
  uncompiled forever.
The reference engine (plain NumPy) and NUMBA_DISABLE_JIT never compile, so they never say it.

Read next: cli.py and the server, which call warm_up before their first real work.
"""

import sys
import time

from numba.core import event

COMPILING = "compiling the kernels (first run only, about a minute on 2 cores) ..."
WARM_UP_PAIR = ("warm up", "the engine")


def _to_stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class _CompileNotice(event.Listener):
    """Says COMPILING once, at the start of the first compilation it hears of."""

    def __init__(self, say):
        self.say = say
        self.heard = False

    def on_start(self, event_):
        if not self.heard:
            self.heard = True
            self.say(COMPILING)

    def on_end(self, event_):
        pass


def warm_up(reranker, say=_to_stderr) -> float:
    """Score one tiny pair with `reranker` so every kernel is compiled, or loaded from Numba's cache.

    say: called with one line of text (default: printed to stderr, never stdout, where results
    go). When the kernels are not in Numba's cache yet it gets COMPILING before the compilation
    starts and "... compiled in X.X s" after; when they are, it is not called at all.
    Returns the seconds the warm-up took. Errors of the engine (ModelError, MemoryError) pass
    through unchanged.
    """
    notice = _CompileNotice(say)
    start = time.perf_counter()
    # Numba's listeners are process-wide: installed only for this call, which runs nothing else
    with event.install_listener("numba:compile", notice):
        reranker.logits([WARM_UP_PAIR])
    seconds = time.perf_counter() - start
    if notice.heard:
        say(f"... compiled in {seconds:.1f} s")
    return seconds
