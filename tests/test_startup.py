"""startup.warm_up: it compiles or loads every kernel the forward pass uses, and says it compiles
exactly when Numba compiles (before the wait, on the `say` it is given), never otherwise."""

import os
import subprocess
import sys

import numba
import numpy as np
from numba.core import event

from nprerank import Reranker
from nprerank.startup import COMPILING, warm_up


class FreshKernelReranker:
    """Stands in for a Reranker whose kernel is not compiled yet: a new, uncached njit function."""

    def __init__(self, said: list):
        self.said = said
        self.kernel = numba.njit(cache=False)(lambda x: x * 2.0)

    def logits(self, pairs):
        self.said.append("scored")
        return np.array([self.kernel(1.0)] * len(pairs), dtype=np.float32)


def test_says_compiling_before_the_compilation_and_how_long_after():
    said = []
    seconds = warm_up(FreshKernelReranker(said), say=said.append)
    assert said[0] == "scored"  # logits was entered, then Numba compiled: the notice comes before the wait
    assert said[1] == COMPILING
    assert said[2].startswith("... compiled in ") and said[2].endswith(" s"), said
    assert float(said[2].split()[3]) == round(seconds, 1)
    assert len(said) == 3


def test_says_nothing_when_nothing_compiles():
    said = []
    reranker = FreshKernelReranker(said)
    warm_up(reranker, say=said.append)
    said.clear()
    seconds = warm_up(reranker, say=said.append)  # compiled in this process already
    assert said == ["scored"]
    assert seconds >= 0.0


def test_reference_engine_never_compiles(tiny_model):
    said = []
    warm_up(Reranker.from_pretrained(tiny_model, engine="reference"), say=said.append)
    assert said == []


def test_after_warm_up_no_input_compiles_anything(tiny_model):
    """One tiny pair reaches every kernel signature: batches of other sizes and lengths compile nothing."""
    reranker = Reranker.from_pretrained(tiny_model)
    warm_up(reranker, say=lambda message: None)
    recorder = event.RecordingListener()
    with event.install_listener("numba:compile", recorder):
        reranker.logits([("q", "p"), ("a longer query " * 5, "a much longer passage " * 40), ("x", "y " * 300)])
        reranker.logits([("one", "pair")])
    assert recorder.buffer == []


WARM_UP_SCRIPT = """
import sys
from nprerank import Reranker
from nprerank.startup import warm_up
warm_up(Reranker.from_pretrained(sys.argv[1]))
print("scored")
"""


def test_first_process_says_it_compiles_and_the_next_one_loads_silently(tiny_model, tmp_path):
    """Real processes with an empty Numba cache: the first compiles and says so on stderr (stdout
    stays the result), the second loads the kernels from the cache and says nothing."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    runs = [subprocess.run([sys.executable, "-c", WARM_UP_SCRIPT, str(tiny_model)], capture_output=True, text=True,
                           env=env, timeout=600) for _ in range(2)]
    for run in runs:
        assert run.returncode == 0, run.stderr
        assert run.stdout == "scored\n"
    first, second = (run.stderr.splitlines() for run in runs)
    assert first[0] == COMPILING, first
    assert first[1].startswith("... compiled in "), first
    assert second == []
