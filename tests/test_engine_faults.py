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

import numba
import pytest

from nprerank import Reranker

JIT = not numba.config.DISABLE_JIT

# --- memory: every allocation before the parallel regions -------------------------------------

# The calls into NRT (Numba's runtime) and libc that make memory; views and reference counts do not.
ALLOCATION = re.compile(
    r'@"?(NRT_MemInfo_alloc\w*|NRT_Allocate\w*|NRT_MemInfo_new\w*|NRT_MemInfo_varsize\w*'
    r"|malloc|calloc|realloc)\b"
)


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
        todo += [
            c.strip('"')
            for c in re.findall(r'call [^@]*@("[^"]+"|[\w.$]+)\(', functions[name])
            if c.strip('"') in functions
        ]
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
from nprerank.kernels import attention, bf16, fp32, int8, layers, rowwise, threads
from nprerank.config import ModelConfig
from nprerank.model import FastModel
from nprerank.weights import load_weights
folder = sys.argv[1]
config = ModelConfig.from_json(folder + "/config.json")
for precision in ("fp32", "int8", "bf16"):  # compiles every kernel, for the signatures the engines use
    model = FastModel(load_weights(folder + "/model.safetensors", config), config, threads=2, precision=precision)
    model([[0, 5, 6, 7, 2], [0, 9, 2]])
dumped = {}
modules = (threads, rowwise, fp32, attention, int8, bf16, layers)
for name, module in [(name, module) for module in modules for name in dir(module)]:
    dispatcher = getattr(module, name)
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
    done = subprocess.run(
        [sys.executable, "-c", COMPILE_AND_DUMP, str(tiny_model)], env=env, capture_output=True, text=True, timeout=900
    )
    assert done.returncode == 0, done.stderr[-3000:]
    dumped = json.loads(done.stdout)
    assert {
        "linear_forward",
        "attention_forward",
        "output_feed_forward",
        "encoder_layers",
        "embeddings_forward",
        "quantize_rows_forward",
        "linear_int8_forward",
        "linear_bf16_forward",
    } <= set(dumped), sorted(dumped)
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

folder, precision = sys.argv[1], sys.argv[2]
config = ModelConfig.from_json(folder + "/config.json")
model = FastModel(load_weights(folder + "/model.safetensors", config), config, threads=2, precision=precision)
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
@pytest.mark.parametrize("precision", ["fp32", "int8"])
def test_running_out_of_memory_is_a_memory_error(tiny_model, precision):
    """A big batch under a range of address-space limits (RLIMIT_AS, as `ulimit -v`), from too
    little for its arrays to enough: each time a MemoryError or the exact logits, never a hang
    (the timeout) or wrong numbers, and a small batch after it still scores correctly."""
    done = subprocess.run(
        [sys.executable, "-c", MEMORY_LIMITS, str(tiny_model), precision], capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, f"the child died ({done.returncode}): {done.stderr[-3000:]}"
    outcomes = json.loads(done.stdout.strip().splitlines()[-1])
    print(outcomes)
    assert set(outcomes) <= {"ok", "MemoryError"}, outcomes
    assert outcomes[0] == "MemoryError" and outcomes[-1] == "ok", (
        f"the limits did not span the batch's need: {outcomes}"
    )


# --- threads: concurrent calls -----------------------------------------------------------------

CONCURRENT = """
import json, sys, threading
from nprerank import Reranker
folder, shared, precisions = sys.argv[1], sys.argv[2] == "shared", sys.argv[3].split(",")
texts = ["a panda eats bamboo", "the river bank at night", "café music", "search engine ranking", "x"]
rerankers = [Reranker.from_pretrained(folder, threads=2, precision=precisions[n % len(precisions)])
             for n in range(1 if shared else 2)]
wants = [reranker.rerank("what do pandas eat", texts) for reranker in rerankers]
failures = []

def work(reranker, want, n):
    for i in range(30):
        contexts = texts[i % 3 :]  # batches of different sizes meet in the engine
        got = reranker.rerank("what do pandas eat", contexts)
        expected = sorted(({"id": j, "score": s} for j, s in
                           ((h["id"] - i % 3, h["score"]) for h in want if h["id"] >= i % 3)),
                          key=lambda h: -h["score"])
        if got != expected:
            failures.append((n, i, got, expected))

threads = [threading.Thread(target=work, args=(rerankers[n % len(rerankers)], wants[n % len(rerankers)], n))
           for n in range(4)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(json.dumps({"failures": failures[:3], "count": len(failures)}))
"""


@pytest.mark.parametrize(
    "rerankers,precisions", [("shared", "fp32"), ("two", "fp32"), ("shared", "int8"), ("two", "fp32,int8")]
)
def test_concurrent_threads_get_the_single_threaded_answers(tiny_model, rerankers, precisions):
    """Four Python threads x 30 calls, on one shared Reranker or on two (an fp32 and an int8 one
    in the last case: both engines share the process's one lock): the process lives (it aborted
    before: Numba's workqueue pool takes one launch at a time) and every answer equals the one a
    single thread gets."""
    done = subprocess.run(
        [sys.executable, "-c", CONCURRENT, str(tiny_model), rerankers, precisions],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"the child died ({done.returncode}): {done.stderr[-3000:]}"
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["count"] == 0, result["failures"]


# --- threads: how many ---------------------------------------------------------------------------


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize(
    "files, membership, quota",
    [
        ({"cpu.max": "max 100000\n"}, "0::/\n", None),  # v2, no limit
        ({"cpu.max": "150000 100000\n"}, "0::/\n", 1.5),  # v2 in a container (docker --cpus 1.5)
        ({"kubepods/pod1/cpu.max": "max 100000\n", "kubepods/cpu.max": "300000 100000\n"}, "0::/kubepods/pod1\n", 3.0),
        (
            {"cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"},
            "4:cpu,cpuacct:/\n",
            None,
        ),  # v1, no limit
        (
            {
                "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "50000\n",
                "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000\n",
            },
            "4:cpu,cpuacct:/docker/abc\n2:memory:/docker/abc\n",
            0.5,
        ),  # v1 in a container
        ({}, "", None),  # no cgroup files at all
    ],
)
def test_cgroup_cpu_quota_is_read(tmp_path, files, membership, quota):
    """cgroup v2 cpu.max and v1 cfs_quota/period, in the process's own cgroup or an ancestor's."""
    from nprerank.model import cgroup_cpu_quota

    for name, text in files.items():
        write(tmp_path / "sys" / name, text)
    write(tmp_path / "proc-self-cgroup", membership)
    assert cgroup_cpu_quota(tmp_path / "sys", tmp_path / "proc-self-cgroup") == quota


@pytest.mark.parametrize(
    "affinity, quota, asked, used, warned",
    [
        (2, None, None, 2, False),
        (2, 1.5, None, 1, False),  # a fractional quota rounds down: a second spinning thread is throttled
        (2, 0.2, None, 1, False),
        (1, None, None, 1, False),
        (1, None, 2, 1, True),  # an explicit larger count is capped, with a warning
        (2, 1.0, 2, 1, True),
        (2, None, 1, 1, False),
    ],
)
def test_default_threads_follow_the_usable_cpus(monkeypatch, affinity, quota, asked, used, warned):
    import warnings

    import nprerank.model

    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("needs a Numba pool of 2 threads")
    monkeypatch.setattr(nprerank.model, "affinity_cpus", lambda: affinity)
    monkeypatch.setattr(nprerank.model, "cgroup_cpu_quota", lambda: quota)
    monkeypatch.delenv("NPRERANK_NUM_THREADS", raising=False)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert nprerank.model.set_threads(asked) == used
            assert numba.get_num_threads() == used
        messages = [str(w.message) for w in caught]
        assert bool(messages) == warned, messages
        if warned:
            assert f"{asked} threads asked for" in messages[0] and f"using {used}" in messages[0], messages
    finally:
        monkeypatch.undo()
        nprerank.model.set_threads(None)


AFFINITY = """
import os, sys, warnings
import numba
from nprerank import Reranker
os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # like `taskset -c 0`, after Numba sized its pool
reranker = Reranker.from_pretrained(sys.argv[1])
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    capped = Reranker.from_pretrained(sys.argv[1], threads=2)
print(numba.config.NUMBA_NUM_THREADS, reranker.model.threads, capped.model.threads, len(caught))
"""


@pytest.mark.skipif(
    not hasattr(os, "sched_setaffinity") or len(os.sched_getaffinity(0)) < 2,
    reason="needs 2 CPUs and sched_setaffinity",
)
def test_threads_follow_the_affinity_mask(tiny_model):
    """A process pinned to one CPU uses one thread, and caps (with a warning) a request for two."""
    done = subprocess.run(
        [sys.executable, "-c", AFFINITY, str(tiny_model)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    pool, default, capped, warnings = map(int, done.stdout.split()[-4:])
    assert pool >= 2 and default == 1 and capped == 1 and warnings == 1, done.stdout


# --- files changed under a loaded model ------------------------------------------------------


def overwrite_in_place(path):
    """Same size, same inode: new bytes written into the file, as `cp new old` or a careless
    download does. The byte changed lies in the last tensor's data."""
    with open(path, "r+b") as f:
        f.seek(-4, os.SEEK_END)
        old = f.read(4)
        f.seek(-4, os.SEEK_END)
        f.write(bytes(b ^ 0x01 for b in old))


def replace_by_rename(path):
    """A new file renamed over the old one (the safe way to update): the map keeps the old one."""
    new = path.with_suffix(".new")
    new.write_bytes(path.read_bytes())
    os.replace(new, path)


def truncate(path):
    os.truncate(path, path.stat().st_size // 2)


def touch(path):
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))


CHANGES = {
    "overwritten in place": (overwrite_in_place, "was written to"),
    "replaced by rename": (replace_by_rename, "was replaced by another file"),
    "truncated": (truncate, "changed size from"),
    "touched": (touch, "was written to"),
    "deleted": (lambda path: path.unlink(), "is gone"),
}


@pytest.mark.parametrize("engine", ["fast", "reference"])
@pytest.mark.parametrize("change", list(CHANGES))
def test_a_changed_checkpoint_is_refused(tiny_model, tmp_path, monkeypatch, engine, change):
    """model.safetensors changed after loading: Weights.changed() says how, naming the file,
    and both engines refuse to score (ModelError) instead of mixing old and new weights or
    dying of SIGBUS on a truncated map. Loading again gives a working Reranker."""
    import shutil

    from nprerank import ModelError

    monkeypatch.setenv("NPRERANK_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    reranker = Reranker.from_pretrained(folder, engine=engine)
    assert reranker.weights.changed() is None
    want = reranker.rerank("what do pandas eat", ["bamboo", "rocks"])
    assert reranker.weights.changed() is None, "scoring must not look like a change"

    modify, message = CHANGES[change]
    path = folder / "model.safetensors"
    modify(path)
    assert message in (reranker.weights.changed() or ""), reranker.weights.changed()
    assert str(path) in reranker.weights.changed()
    with pytest.raises(ModelError, match=re.escape(str(path)) + ".*" + message):
        reranker.rerank("what do pandas eat", ["bamboo", "rocks"])
    if change in ("replaced by rename", "touched"):  # same contents: loading again scores as before
        assert Reranker.from_pretrained(folder, engine=engine).rerank("what do pandas eat", ["bamboo", "rocks"]) == want


def test_the_reference_engine_bounds_blas_threads_too(tiny_model):
    """threads= reaches OpenBLAS, whose products the reference engine runs on (it was ignored)."""
    from nprerank.blas import blas_function

    getter = blas_function("get_num_threads")
    if getter is None:
        pytest.skip("NumPy does not use OpenBLAS here")
    try:
        reranker = Reranker.from_pretrained(tiny_model, engine="reference", threads=1)
        assert reranker.model.threads == 1 and getter() == 1
    finally:
        from nprerank.model import set_threads

        set_threads(None)
