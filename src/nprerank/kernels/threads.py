"""How the kernels run: the Numba options, the threads' work counter and barrier, their scratch.

Every kernel of the package is made with `kernel` or `parallel_kernel` from here, so the options
(cache, fastmath, error model, threading layer) are decided once, with their reasons. A parallel
kernel is a prange over the threads, each running a per-thread function that takes work items from
a shared counter (`take`); layers.encoder_layers runs whole layers in one parallel region, the
threads meeting at barriers (`wait_for_all`). No kernel allocates inside a region: each thread's
scratch is a row of a `make_workspace` made before it.

No twin: nothing here computes. tests/test_kernels.py checks the kernels that use it, over 1-3
threads; tests/test_engine_faults.py checks that no region allocates.

Read next: rowwise.py, the elementwise maths and the row-by-row layers.
"""

import ctypes
import os

import numba
import numpy as np
from numba import njit

# --- Numba options, decided once for every kernel -----------------------------------------------
# cache=True: machine code is saved beside this file (or in Numba's user cache when the package
#   folder is read-only), so a second process start loads it instead of compiling for seconds.
# fastmath: only "reassoc" (lets LLVM split a sum such as LayerNorm's mean into SIMD lanes; without
#   it a float reduction runs one add at a time) and "contract" (fused multiply-add). Not "nnan",
#   "ninf" or "afn": max/compare keep their meaning and no library function is approximated
#   behind our back. tests/test_kernels.py measures the effect against reference.py.
# error_model="numpy": a division by zero gives inf instead of a Python exception check per divide.
# Threading layer "workqueue": Numba's own pool, whose workers sleep between parallel regions
#   (starting a region costs about 100 us here, as the OS wakes them). The OpenMP layer starts
#   one in 2 us, but it shares the process's libgomp with torch: with both in one process torch
#   ran 5x slower (docs/performance.md). An explicit NUMBA_THREADING_LAYER in the environment
#   still wins.
FASTMATH = {"reassoc", "contract"}
OPTIONS = dict(cache=True, fastmath=FASTMATH, error_model="numpy")
if "NUMBA_THREADING_LAYER" not in os.environ:
    numba.config.THREADING_LAYER = "workqueue"

kernel = njit(**OPTIONS)
parallel_kernel = njit(parallel=True, **OPTIONS)


# --- handing out work: a shared counter ----------------------------------------------------------
# The parallel kernels split their work into more items than threads, and each thread takes the
# next item from a shared counter until none are left (dynamic scheduling). On a shared VM one
# core is sometimes slowed or taken away for a while; a fixed half for each thread would then make
# the other wait at the end of every region, while this way it takes over the remaining items.

if numba.config.DISABLE_JIT:

    def take(counter):
        """counter[0] += 1, returning the value before (plain Python when JIT is disabled)."""
        counter[0] += 1
        return counter[0] - 1

    def peek(counter):
        """counter[0] (plain Python when JIT is disabled)."""
        return counter[0]

else:
    from llvmlite import ir
    from numba.core import types
    from numba.extending import intrinsic

    @intrinsic
    def take(typingctx, counter):
        """counter[0] += 1 as one atomic step, returning the value before: the number of the item
        this thread takes. counter: an int64 array made before the prange, so all threads share it."""
        signature = types.int64(counter)

        def codegen(context, builder, sig, args):
            array = context.make_array(sig.args[0])(context, builder, args[0])
            return builder.atomic_rmw("add", array.data, ir.IntType(64)(1), "acq_rel")

        return signature, codegen

    @intrinsic
    def peek(typingctx, counter):
        """counter[0], read as one atomic step that sees every write made before the last take."""
        signature = types.int64(counter)

        def codegen(context, builder, sig, args):
            array = context.make_array(sig.args[0])(context, builder, args[0])
            return builder.load_atomic(array.data, "acquire", 8)

        return signature, codegen


@kernel
def wait_for_all(arrivals, target):
    """A barrier: count this thread in (take), then wait until `target` arrivals in all. The threads
    spin rather than sleep, so they start the next step at once (a sleeping one takes ~100 us to
    wake here). Every write made before a thread arrives is visible to all after the barrier."""
    take(arrivals)
    while peek(arrivals) < target:
        pass


# --- scratch memory: made by the caller, before any parallel region ----------------------------
# Attention and the feed-forward need scratch arrays per thread (a head's keys and values in
# panels, its scores; a block's projections and activation). An allocation that fails inside a
# prange body cannot be reported: the thread that failed leaves the region, and the others wait
# for it at the next barrier for ever, or skip its work and return wrong numbers. So no kernel
# allocates inside a region: the caller makes a `workspace` [threads, S] before it (a failure is
# then a MemoryError there), each thread carves its buffers out of its own row, and the sizes
# (attention.attention_floats, layers.feed_forward_floats) say how large S must be.
# tests/test_engine_faults.py checks the compiled regions for allocations, so none can come back
# unnoticed.

SCRATCH_ALIGN = 16  # floats: every buffer in a workspace starts on a 64-byte cache line


def make_workspace(n_threads: int, floats: int) -> np.ndarray:
    """An uninitialised float32 workspace [n_threads, S], S >= floats, each row 64-byte aligned.
    Allocated here, outside any parallel region: MemoryError if it does not fit."""
    S = -(-max(int(floats), 1) // SCRATCH_ALIGN) * SCRATCH_ALIGN
    flat = np.empty(n_threads * S + SCRATCH_ALIGN, dtype=np.float32)
    start = (-flat.ctypes.data // 4) % SCRATCH_ALIGN  # the first float on a cache-line boundary
    return flat[start : start + n_threads * S].reshape(n_threads, S)


@kernel
def aligned(floats):
    """floats rounded up to whole cache lines: where the next buffer of a workspace row starts."""
    return -(-floats // SCRATCH_ALIGN) * SCRATCH_ALIGN


@kernel
def check_workspace(workspace, floats):
    """ValueError unless each row of workspace holds `floats` values. Called before the region
    starts, where an exception reaches the caller."""
    if workspace.shape[1] < floats:
        raise ValueError("the workspace is too small for this batch")


# --- arrays passed by address: every layer's weights in one region ----------------------------------
# kernels.layers.encoder_layers runs all layers in one region, so it needs every layer's weights.
# As tuples of one array per layer, Numba compiles each `tuple[layer]` into a switch with a case
# per layer, and the whole kernel anew for every tuple length (a region over 11 layers took 75 s
# to compile, over 23 more than ten minutes); a parallel region cannot take tuples of tuples at
# all. All layers' arrays of one kind have the same shape, dtype and strides, so the first
# layer's array stands for the type, and the others travel as their addresses (addresses_of):
# same_array_at makes the view. One compiled kernel, whatever the depth.


def addresses_of(arrays: list) -> np.ndarray:
    """[a.ctypes.data for a in arrays] as int64, after checking that each array has the first's
    shape, dtype and strides (ValueError otherwise), so that same_array_at(arrays[0], address)
    is that array. The arrays must outlive every kernel that is given their addresses."""
    first = arrays[0]
    for a in arrays:  # what Numba's array type holds, and the view's shape and strides
        kind, first_kind = (
            (x.shape, x.dtype, x.strides, x.flags.writeable, x.flags.aligned, x.flags.c_contiguous) for x in (a, first)
        )
        if kind != first_kind:
            raise ValueError(f"an array of (shape, dtype, strides, flags) {kind} among arrays of {first_kind}")
    return np.array([a.ctypes.data for a in arrays], dtype=np.int64)


if numba.config.DISABLE_JIT:

    def same_array_at(like, address):
        """The array of like's shape, dtype and strides at `address` (plain NumPy when JIT is disabled)."""
        span = sum((n - 1) * s for n, s in zip(like.shape, like.strides)) + like.itemsize if like.size else 1
        memory = (ctypes.c_char * span).from_address(int(address))  # the bytes the strides reach
        return np.ndarray(like.shape, like.dtype, memory, strides=like.strides)

else:
    from numba.core import cgutils
    from numba.np.arrayobj import populate_array

    @intrinsic
    def same_array_at(typingctx, like, address):
        """The array of like's type, shape and strides at `address` (from addresses_of): a view
        that owns nothing, valid while the array there lives."""
        signature = like(like, address)

        def codegen(context, builder, sig, args):
            array = context.make_array(sig.args[0])(context, builder, args[0])
            view = context.make_array(sig.return_type)(context, builder)
            populate_array(
                view,
                data=builder.inttoptr(args[1], array.data.type),
                shape=array.shape,
                strides=array.strides,
                itemsize=array.itemsize,
                meminfo=cgutils.get_null_value(array.meminfo.type),
            )
            return view._getvalue()

        return signature, codegen
