"""The fast engine under faults: memory running out, threads racing, files changing under it.

Issue 10 found that an allocation failing inside a parallel region hung the process (the other
threads waited at a barrier for ever) or returned wrong logits, that two Python threads calling
the engine at once aborted the process, and that too many Numba threads on few CPUs made every
call many times slower. Each test here reproduces one kind of fault and asserts what must happen
instead. Tests that can hang or crash run in a child process, under a timeout.
"""

import json
import os
import re
import subprocess
import sys
import textwrap
import threading

import numba
import numpy as np
import pytest

from nprerank import Reranker

JIT = not numba.config.DISABLE_JIT

# --- memory: every allocation before the parallel regions -------------------------------------

# The calls into NRT (Numba's runtime) and libc that make memory; views and reference counts do not.
ALLOCATION = re.compile(r'@"?(NRT_MemInfo_alloc\w*|NRT_Allocate\w*|NRT_MemInfo_new\w*|NRT_MemInfo_varsize\w*'
                        r'|malloc|calloc|realloc)\b')


def llvm_functions(ir: str) -> dict:
    """LLVM module text -> {function name: its text}, for the functions it defines."""
    functions, name, body = {}, None, []
    for line in ir.splitlines():
        if line.startswith("define "):
            name, body = re.search(r'@("[^"]+"|[\w.$]+)\(', line).group(1).strip('"'), [line]
        elif name is not None:
            body.append(line)
            if line.startswith("}"):
                functions[name] = "\n".join(body)
                name = None
    return functions


def allocations_in_regions(ir: str) -> tuple:
    """({function: allocation calls} reachable from the parallel regions' bodies, how many regions).
    Numba outlines each prange body into a function named *numba_parfor_gufunc*; everything it
    calls that was compiled with it (our kernels, linked into the same module) is followed."""
    functions = llvm_functions(ir)
    regions = [name for name in functions if "numba_parfor_gufunc" in name]
    found, seen, todo = {}, set(), list(regions)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        calls = ALLOCATION.findall(functions[name])
        if calls:
            found[name] = sorted(set(calls))
        todo += [c.strip('"') for c in re.findall(r'call [^@]*@("[^"]+"|[\w.$]+)\(', functions[name])
                 if c.strip('"') in functions]
    return found, len(regions)


def test_the_allocation_check_sees_an_allocation():
    """The IR reader itself: an allocation in a function a region calls is found."""
    ir = textwrap.dedent("""\
        define void @"outer"() {
          call void @"_ZN5numba_parfor_gufunc_1"()
        }
        define void @"_ZN5numba_parfor_gufunc_1"() {
          call void @helper(i64 1)
        }
        define void @helper(i64 %x) {
          %p = call i8* @NRT_MemInfo_alloc_aligned(i64 %x, i32 32)
        }
        """)
    found, regions = allocations_in_regions(ir)
    assert regions == 1 and found == {"helper": ["NRT_MemInfo_alloc_aligned"]}


COMPILE_AND_DUMP = """
import json, sys
import numpy as np
from nprerank import kernels
from nprerank.config import ModelConfig
from nprerank.model import FastModel
from nprerank.weights import load_weights
folder = sys.argv[1]
config = ModelConfig.from_json(folder + "/config.json")
model = FastModel(load_weights(folder + "/model.safetensors", config), config, threads=2)
model([[0, 5, 6, 7, 2], [0, 9, 2]])  # compiles every kernel, for the signatures the engine uses
dumped = {}
for name in dir(kernels):
    dispatcher = getattr(kernels, name)
    if getattr(dispatcher, "targetoptions", {}).get("parallel") and dispatcher.signatures:
        dumped[name] = list(dispatcher.inspect_llvm().values())
json.dump(dumped, sys.stdout)
"""


@pytest.mark.skipif(not JIT, reason="needs the compiled kernels")
def test_no_allocation_inside_a_parallel_region(tiny_model, tmp_path):
    """Every parallel kernel, compiled afresh (Numba cannot show the code of cached ones): nothing
    reachable from a prange body allocates memory. Scratch comes from the caller's workspace, so
    a failing allocation is a MemoryError before the region, never a thread lost inside one."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path / "numba"))
    done = subprocess.run([sys.executable, "-c", COMPILE_AND_DUMP, str(tiny_model)], env=env, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    dumped = json.loads(done.stdout)
    assert {"linear_forward", "attention_forward", "output_feed_forward", "encoder_layers",
            "embeddings_forward"} <= set(dumped), sorted(dumped)
    for name, modules in dumped.items():
        for ir in modules:
            found, regions = allocations_in_regions(ir)
            assert regions, f"{name}: no parallel region found in its code; has Numba changed how it names them?"
            assert not found, f"{name}: allocations inside its parallel region: {found}"


MEMORY_LIMITS = """
import json, resource, sys
import numpy as np
from nprerank.config import ModelConfig
from nprerank.model import FastModel
from nprerank.weights import load_weights

def address_space():  # bytes of virtual memory now
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize"))

folder = sys.argv[1]
config = ModelConfig.from_json(folder + "/config.json")
model = FastModel(load_weights(folder + "/model.safetensors", config), config, threads=2)
rng = np.random.default_rng(0)
small = [[0] + [int(i) for i in rng.integers(3, config.vocab_size, n)] + [2] for n in (5, 40, 120)]
big = [[0] + [int(i) for i in rng.integers(3, config.vocab_size, 120)] + [2] for _ in range(1500)]
want_small, want_big = model(small), model(big)  # compiled, and the answers without a limit
base = address_space()
need = 300 << 20  # a generous bound on what the big batch adds (~70 MB of arrays)
_, hard = resource.getrlimit(resource.RLIMIT_AS)
outcomes = []
for step in range(1, 25):  # limits from just above what is mapped now to well past the need
    resource.setrlimit(resource.RLIMIT_AS, (base + step * need // 24, hard))
    try:
        got = model(big)
        outcomes.append("ok" if np.array_equal(got, want_big) else "WRONG")
    except MemoryError:
        outcomes.append("MemoryError")
    resource.setrlimit(resource.RLIMIT_AS, (hard, hard))
    if not np.array_equal(model(small), want_small):
        outcomes.append("WRONG after")
print(json.dumps(outcomes))
"""


@pytest.mark.skipif(not JIT, reason="needs the compiled kernels")
def test_running_out_of_memory_is_a_memory_error(tiny_model):
    """A big batch under a range of address-space limits (RLIMIT_AS, as `ulimit -v`), from too
    little for its arrays to enough: each time a MemoryError or the exact logits, never a hang
    (the timeout) or wrong numbers, and a small batch after it still scores correctly."""
    done = subprocess.run([sys.executable, "-c", MEMORY_LIMITS, str(tiny_model)], capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"the child died ({done.returncode}): {done.stderr[-3000:]}"
    outcomes = json.loads(done.stdout.strip().splitlines()[-1])
    print(outcomes)
    assert set(outcomes) <= {"ok", "MemoryError"}, outcomes
    assert outcomes[0] == "MemoryError" and outcomes[-1] == "ok", f"the limits did not span the batch's need: {outcomes}"


# --- threads: concurrent calls -----------------------------------------------------------------

CONCURRENT = """
import json, sys, threading
from nprerank import Reranker
folder, shared = sys.argv[1], sys.argv[2] == "shared"
texts = ["a panda eats bamboo", "the river bank at night", "café music", "search engine ranking", "x"]
rerankers = [Reranker.from_pretrained(folder, threads=2) for _ in range(1 if shared else 2)]
want = rerankers[0].rerank("what do pandas eat", texts)
failures = []

def work(reranker, n):
    for i in range(30):
        contexts = texts[i % 3 :]  # batches of different sizes meet in the engine
        got = reranker.rerank("what do pandas eat", contexts)
        expected = sorted(({"id": j, "score": s} for j, s in
                           ((h["id"] - i % 3, h["score"]) for h in want if h["id"] >= i % 3)),
                          key=lambda h: -h["score"])
        if got != expected:
            failures.append((n, i, got, expected))

threads = [threading.Thread(target=work, args=(rerankers[n % len(rerankers)], n)) for n in range(4)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(json.dumps({"failures": failures[:3], "count": len(failures)}))
"""


@pytest.mark.parametrize("rerankers", ["shared", "two"])
def test_concurrent_threads_get_the_single_threaded_answers(tiny_model, rerankers):
    """Four Python threads x 30 calls, on one shared Reranker or on two: the process lives (it
    aborted before: Numba's workqueue pool takes one launch at a time) and every answer equals
    the one a single thread gets."""
    done = subprocess.run([sys.executable, "-c", CONCURRENT, str(tiny_model), rerankers], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, f"the child died ({done.returncode}): {done.stderr[-3000:]}"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["count"] == 0, result["failures"]
