"""The fast forward pass: reference.py's steps over packed batches, with Numba kernels.

`FastModel(weights, config, threads)(sequences)` -> [B] float32 logits, in the order given. It
must equal reference.forward on the same sequences to 1e-4 (tests/test_kernels.py). The steps
keep reference.py's names and order, so the two files can be read side by side:

    embeddings -> encoder_layer x L (attention, feed_forward, each + residual + layer_norm)
               -> classification_head

What differs, and why:
- Packed batches: the tokens of all sequences lie back to back in one [N, C] matrix (offsets
  [B+1] mark the sequences), so no pad token is multiplied and attention needs no mask.
- Every x @ W.T + b is kernels.fp32.linear_forward on layout.py's packed copy of W (panels,
  memory-mapped from a cache file), with the bias added as the product is made. No BLAS is called.
- Each layer is three steps: the query, key and value projections (one product on their [C, 3C]
  weight); attention; and all the rest, which works row by row (kernels.layers.output_feed_forward).
  Waking Numba's sleeping threads for a parallel region costs ~100 us, so all layers but the
  last run in one region (kernels.layers.encoder_layers), the threads meeting at spin barriers
  between the steps, at every precision. The layers' weights reach it by address (the first
  layer's arrays stand for their type), so it is compiled once whatever the model's depth.
- Position and token-type ids are numbered per sequence by the architecture (embedding_ids:
  XLM-R's or BERT's, architectures.py), the one place the two differ before the head.
- The last layer computes queries, attention output and feed-forward for each sequence's first
  token only: the classification head reads nothing else (keys and values still cover all).
- Safe to call from several Python threads: one forward pass at a time in the process
  (ENGINE_LOCK), as Numba's thread pool takes one launch at a time. Each call first checks that
  model.safetensors is as it was loaded (weights.Weights.changed), and the thread count follows
  the CPUs the process may use (set_threads).
- Memory is bounded by the batch: the [N, C] hidden states, the [N, 3C] projections and the [N, C]
  attention output, reused by every layer, and a workspace row per thread for the kernels'
  scratch (a head's keys, values and scores; a block of rows' [rows, F] activation). All are
  made before the kernels run: none allocates inside a parallel region, where a failure could
  not be reported (it would hang the other threads or leave wrong numbers).

Legend:  N tokens in the packed batch, B sequences, C hidden size, H heads, F feed-forward width.

Read next: kernels/ (what each kernel fuses; its __init__ says in what order to read them),
layout.py (the packed weights), reference.py (the maths in plain NumPy).
"""

import os
import threading
import warnings
from pathlib import Path
from types import SimpleNamespace

import numba
import numpy as np

from . import precisions
from .blas import set_blas_threads
from .config import ModelConfig
from .kernels import attention, fp32, rowwise
from .kernels import layers as layer_kernels  # "layers" is the list of Layers in this module
from .kernels.threads import addresses_of, make_workspace
from .layout import LayerMatrices, gemm_weights
from .weights import Classifier, Embeddings, Layer, Weights, embedding_rows, refuse_if_changed

# kernels.layers.encoder_layers' barriers need a thread of their own for every prange iteration: true
# of Numba's workqueue layer (kernels.threads' choice) and of OpenMP, not promised by TBB.
ONE_REGION = numba.config.THREADING_LAYER in ("workqueue", "omp")


def layer_products(m: LayerMatrices) -> tuple:
    """The qkv, attention output, intermediate and output products of a layer, each a (panels,
    bias) tuple as kernels.layers takes them (at fp32 and bf16)."""
    return (
        (m.qkv, m.qkv_bias),
        (m.attention_output, m.attention_output_bias),
        (m.intermediate, m.intermediate_bias),
        (m.output, m.output_bias),
    )


# The encoder's `steps` at fp32: what makes encoder_layer's qkv product (linear_forward), a layer's
# product tuples (products) and the path the products take (isa); bf16_model.BF16Steps and
# int8_model.forward's at the other precisions
FP32_STEPS = SimpleNamespace(linear_forward=fp32.linear_forward, products=layer_products, isa=0)

# One forward pass at a time in the whole process, whatever the FastModel: Numba's workqueue layer
# has one pool of threads and aborts the process (SIGABRT) when two Python threads launch parallel
# regions at once (issue 10), and one pass already keeps every core busy, so two at once would
# only share them. Checking and packing the input stay outside the lock (tokenizing is the
# Reranker's, before it calls us).
ENGINE_LOCK = threading.Lock()


class FastModel:
    """precision: a row of precisions.py: "fp32" (exact to reference.forward, this module's
    forward), "int8" (the encoder's products at int8, int8_model.forward; equal to int8.forward
    up to fp32 rounding) or "bf16" (the products on bf16 weights, bf16_model.forward; equal to
    reference.forward on bf16.rounded weights up to fp32 rounding). isa: for precisions with
    ISA-specific kernels, the argument of its paths' choose (kernels.isa.INT8.choose for int8,
    kernels.isa.BF16.choose for bf16; None: $NPRERANK_ISA / $NPRERANK_BF16_ISA or the best this CPU
    has). ValueError for an unknown
    precision or ISA; ModelError for weights the precision cannot pack."""

    def __init__(
        self,
        weights: Weights,
        config: ModelConfig,
        threads: int | None = None,
        precision: str = "fp32",
        isa: str | None = None,
    ):
        row = precisions.check(precision)
        self.weights, self.config, self.precision = weights, config, precision
        paths = precisions.load(row.isa) if row.isa else None  # a kernels.isa.Paths
        self.isa = paths.choose(isa) if paths else None
        self.options = {"isa": paths.code(self.isa)} if paths else {}  # the forward's extra keywords
        self.threads = set_threads(threads)
        self.forward = precisions.load(row.forward)
        self.matrices = gemm_weights(weights, precision)  # [LayerMatrices] * L (or the precision's), packed
        _check_float32(weights, self.matrices if precision == "fp32" else [])

    def __call__(self, sequences: list) -> np.ndarray:
        """[ids] * B, unpadded token-id sequences -> [B] float32 logits. Safe to call from several
        Python threads: the passes run one after another (ENGINE_LOCK). ModelError once
        model.safetensors has changed since it was loaded (Weights.changed)."""
        ids, offsets = pack(sequences, self.config)  # [N], [B+1]
        refuse_if_changed(self.weights)  # ModelError rather than stale or mixed weights
        with ENGINE_LOCK:
            numba.set_num_threads(self.threads)  # Numba's count is per calling thread, so set it here
            return self.forward(ids, offsets, self.weights, self.matrices, self.config, **self.options)


def pack(sequences: list, config: ModelConfig) -> tuple:
    """[ids] * B -> (ids [N] int64, offsets [B+1] int64), checking every id and length."""
    if not isinstance(sequences, (list, tuple)) or not sequences:
        raise ValueError("sequences must be a non-empty list of token-id lists")
    lengths = np.array([len(s) for s in sequences], dtype=np.int64)
    offsets = np.zeros(len(sequences) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    ids = np.fromiter((i for s in sequences for i in s), dtype=np.int64, count=int(offsets[-1]))
    if lengths.min() < 1:
        raise ValueError(f"sequence {int(np.argmin(lengths))} is empty")
    if lengths.max() > config.max_tokens:
        raise ValueError(
            f"sequence {int(np.argmax(lengths))} has {lengths.max()} tokens; "
            f"the model takes at most {config.max_tokens}"
        )
    bad = (ids < 0) | (ids >= config.vocab_size)
    if bad.any():
        where = int(np.searchsorted(offsets, np.argmax(bad), side="right") - 1)
        raise ValueError(
            f"sequence {where} holds token id {ids[np.argmax(bad)]}: ids must be in [0, {config.vocab_size})"
        )
    return ids, offsets


def embeddings(ids, offsets, p: Embeddings, config: ModelConfig):
    x = embedding_rows(p.word, ids)  # [N, C], a fresh fp32 array whatever the table's dtype
    x = np.ascontiguousarray(x, dtype=np.float32)
    position_ids, token_type_ids = embedding_ids(ids, offsets, config)  # [N], [N]
    rowwise.embeddings_forward(
        x,
        x,
        p.position,
        p.token_type,
        p.norm.weight,
        p.norm.bias,
        position_ids,
        token_type_ids,
        np.float32(config.layer_norm_eps),
    )
    return x  # [N, C]


def embedding_ids(ids, offsets, config: ModelConfig) -> tuple:
    """Packed ids [N] -> (position ids [N], token type ids [N]): the architecture's own numbering
    (architectures.py, the same functions reference.embeddings calls), sequence by sequence."""
    architecture = config.architecture
    positions, types = np.empty(len(ids), dtype=np.int64), np.empty(len(ids), dtype=np.int64)
    for start, stop in zip(offsets[:-1], offsets[1:]):
        sequence = ids[None, start:stop]  # [1, T]
        mask = np.ones(sequence.shape, dtype=np.int64)  # a packed sequence has no padding
        positions[start:stop] = architecture.position_ids(sequence, mask, config.pad_token_id)[0]
        types[start:stop] = architecture.token_type_ids(sequence, mask)[0]
    return positions, types


def encoder_layer(
    x,
    offsets,
    p: Layer,
    m: LayerMatrices,
    buffers,
    config: ModelConfig,
    first_tokens_only: bool = False,
    steps=FP32_STEPS,
):
    """reference.encoder_layer over the packed batch x [N, C], in three parallel regions: the
    query, key and value projections (one product on the [C, 3C] weight), attention, and the rest
    (kernels.layers.output_feed_forward). Used for the last layer (and for every layer where
    encoder_layers cannot be). Returns the new hidden states [Q, C]: x itself, updated in
    place, or in the last layer a new [B, C] array of the first tokens' rows. steps: what makes
    the qkv product (linear_forward) and the feed-forward's path (isa): FP32_STEPS, or
    bf16_model.BF16Steps; the feed-forward's scratch is buffers' workspace and codes."""
    threads, workspace = len(buffers["workspace"]), buffers["workspace"]
    qkv = buffers["qkv"]  # [N, 3 * width]: query, key and value side by side
    panels, width = len(m.qkv) // 3, m.width  # per projection
    if first_tokens_only:
        # the classification head reads only the <s> rows: they alone ask (keys and values cover all)
        query_offsets = np.arange(len(offsets), dtype=np.int64)  # one query per sequence
        hidden = np.ascontiguousarray(x[offsets[:-1]])  # [B, C]
        steps.linear_forward(qkv, width, x, m.qkv[panels:], m.qkv_bias[width:], threads)  # keys, values
        queries = qkv[: len(hidden)]  # the <s> queries go in the first B rows
        steps.linear_forward(queries, 0, hidden, m.qkv[:panels], m.qkv_bias[:width], threads)
    else:
        query_offsets, hidden, queries = offsets, x, qkv
        steps.linear_forward(qkv, 0, x, m.qkv, m.qkv_bias, threads)
    context = buffers["context"][: len(hidden)]  # [Q, C]
    attention.attention_forward(
        context, queries, qkv, width, offsets, query_offsets, config.num_attention_heads, workspace
    )
    layer_kernels.output_feed_forward(
        hidden,
        context,
        (m.attention_output, m.attention_output_bias),
        p.attention_norm.weight,
        p.attention_norm.bias,
        (m.intermediate, m.intermediate_bias),
        (m.output, m.output_bias),
        p.output_norm.weight,
        p.output_norm.bias,
        np.float32(config.layer_norm_eps),
        steps.isa,
        workspace,
        buffers["codes"],
    )
    return hidden


def encoder_layers(x, offsets, layers: list, buffers, config: ModelConfig, steps=FP32_STEPS):
    """encoder_layer for each (Layer, matrices) of `layers` in turn, in one parallel region
    (kernels.layers.encoder_layers): the threads meet at barriers between the steps instead of being
    woken for each. x [N, C] is updated in place. steps: as encoder_layer's; the qkv product's
    prepared rows are buffers' row_codes and row_scales."""
    # each layer's arrays in the kernel's order: its four products' (panels, scales, corrections,
    # bias), then its LayerNorms' (attention norm weight, bias, output norm weight, bias)
    arrays = [[*(four_parts(product) for product in steps.products(m)), norm_parts(p)] for p, m in layers]  # [L][5][4]
    # the first layer's arrays stand for their kind; every layer's travel as addresses (kernels/threads.py)
    addresses = np.empty((len(layers), 5, 4), dtype=np.int64)  # [L, kind, part]
    for kind in range(5):
        for part in range(4):
            addresses[:, kind, part] = addresses_of([a[kind][part] for a in arrays])
    layer_kernels.encoder_layers(
        x,
        buffers["qkv"],
        buffers["context"],
        offsets,
        layers[0][1].width,
        config.num_attention_heads,
        np.float32(config.layer_norm_eps),
        *arrays[0],  # qkv, output, up and down parts, norms
        addresses,
        steps.isa,
        buffers["row_codes"],
        buffers["row_scales"],
        buffers["workspace"],
        buffers["codes"],
    )


NO_SCALES, NO_CORRECTIONS = np.empty(0, np.float32), np.empty(0, np.int32)


def four_parts(product: tuple) -> tuple:
    """(panels, scales, corrections, bias) of a product tuple: int8's as it is, fp32's and bf16's
    (panels, bias) with empty scales and corrections."""
    return product if len(product) == 4 else (product[0], NO_SCALES, NO_CORRECTIONS, product[1])


def norm_parts(p: Layer) -> tuple:
    """A layer's two LayerNorms as (attention norm weight, bias, output norm weight, bias)."""
    return p.attention_norm.weight, p.attention_norm.bias, p.output_norm.weight, p.output_norm.bias


def encoder(x, offsets, layers: list, buffers, config: ModelConfig, steps=FP32_STEPS, layer=None):
    """All encoder layers on x [N, C], `layers` [(Layer, matrices)] * L: the first L - 1 in one
    region (encoder_layers) where the threading layer allows, the last
    for the first tokens only. Returns [B, C], each sequence's <s> row. layer: the precision's
    encoder_layer (this module's by default; int8_model's at int8)."""
    layer = layer or encoder_layer
    *layers, last = layers
    if layers and ONE_REGION:
        encoder_layers(x, offsets, layers, buffers, config, steps)
    else:
        for p, m in layers:
            x = layer(x, offsets, p, m, buffers, config, steps=steps)
    return layer(x, offsets, *last, buffers, config, first_tokens_only=True, steps=steps)  # [B, C]


def classification_head(first, p: Classifier):
    logits = np.empty(len(first), dtype=np.float32)  # [B]
    rowwise.classification_head_forward(logits, first, p.dense.weight, p.dense.bias, p.out_proj.weight, p.out_proj.bias)
    return logits


def make_buffers(offsets, m: LayerMatrices, config: ModelConfig) -> dict:
    """The arrays every layer's kernels write, for a batch of offsets [B+1] (N tokens): qkv [N, 3
    width], context [N, C], workspace [threads, S], and codes [threads, 0] (fp32 quantizes and
    rounds nothing; bf16_model.forward puts its own in their place). Made before any parallel
    region: a failed allocation is a MemoryError here, never a thread lost inside a region
    (kernels/threads.py, "scratch memory")."""
    N, B = int(offsets[-1]), len(offsets) - 1
    threads = 1 if numba.config.DISABLE_JIT else numba.get_num_threads()  # without JIT prange is a loop
    output, intermediate = (m.attention_output, m.attention_output_bias), (m.intermediate, m.intermediate_bias)
    floats = max(
        attention.attention_floats(offsets, offsets, config.head_size),  # the last layer's need less
        *(layer_kernels.feed_forward_floats(rows, threads, output, intermediate) for rows in (N, B)),
    )
    return {  # reused by every layer
        "qkv": np.empty((N, 3 * m.width), dtype=np.float32),
        "context": np.empty((N, config.hidden_size), dtype=np.float32),
        "workspace": make_workspace(threads, floats),  # [threads, S]: each thread's scratch
        "codes": np.empty((threads, 0), dtype=np.float32),  # [threads, 0]: fp32 needs none
        "row_codes": np.empty((N, 0), dtype=np.float32),  # the qkv product's prepared rows: none at fp32
        "row_scales": np.empty(0, dtype=np.float32),
    }


def forward(ids, offsets, weights: Weights, matrices: list, config: ModelConfig):
    """Packed ids [N] with offsets [B+1] -> [B] logits. matrices: layout.gemm_weights(weights)."""
    buffers = make_buffers(offsets, matrices[0], config)
    x = embeddings(ids, offsets, weights.embeddings, config)  # [N, C]
    x = encoder(x, offsets, list(zip(weights.layers, matrices)), buffers, config)  # [B, C]: the <s> rows
    return classification_head(x, weights.classifier)  # [B]


# --- threads -----------------------------------------------------------------------------------


def set_threads(threads: int | None) -> int:
    """Use `threads` (or $NPRERANK_NUM_THREADS) threads in Numba's kernels and in OpenBLAS (which
    the fast path does not call, but the reference engine's NumPy products do). Returns the count
    in force.

    By default, one per CPU this process may use (`usable_cpus`: its affinity mask and its
    container's CPU quota), never more than Numba's pool. More threads than that only compete:
    the kernels' threads spin at barriers waiting for each other, and on 2 CPUs one pair took 15x
    longer with 4 threads and 41x with 8 (issue 10). So a larger explicit count is capped too,
    with a warning saying what was used.
    """
    if threads is None:
        value = os.environ.get("NPRERANK_NUM_THREADS", "").strip()
        if value and (not value.isdigit() or int(value) < 1):
            raise ValueError(f"NPRERANK_NUM_THREADS must be a positive integer, got {value!r}")
        threads = int(value) if value else None
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1):
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    cpus, pool = usable_cpus(), numba.config.NUMBA_NUM_THREADS  # Numba's pool is sized at start-up
    usable = min(cpus, pool)
    if threads is None:
        threads = usable
    elif threads > usable:
        why = (
            f"this process may use {cpus} CPU{'s' * (cpus > 1)}" if cpus <= pool else f"Numba's pool has {pool} threads"
        )
        warnings.warn(
            f"nprerank: {threads} threads asked for, but {why}; using {usable} "
            "(more threads than CPUs spin against each other and run many times slower)",
            stacklevel=3,
        )
        threads = usable
    numba.set_num_threads(int(threads))
    set_blas_threads(int(threads))
    return int(threads)


def usable_cpus() -> int:
    """CPUs this process may run on: its affinity mask (taskset, a container's cpuset), and no
    more than its cgroup's CPU quota (docker --cpus, a Kubernetes CPU limit), rounded down: with a
    quota of 1.5 CPUs a second spinning thread would only be throttled."""
    count = affinity_cpus()
    quota = cgroup_cpu_quota()
    if quota is not None:
        count = min(count, max(1, int(quota)))
    return count


def affinity_cpus() -> int:
    """CPUs in this process's affinity mask (os.cpu_count() where the OS has no such mask)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cgroup_cpu_quota(root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup and its ancestors, in CPUs (quota / period), or None
    when there is none or no cgroup file can be read. cgroup v2: `cpu.max` ("max 100000" or
    "150000 100000"); v1: `cpu.cfs_quota_us` (-1: none) over `cpu.cfs_period_us`."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        lines = []
    folders = []  # (controller folder, this process's path in it)
    for line in lines:
        _, controllers, path = (line.split(":", 2) + ["", ""])[:3]
        if controllers == "":  # v2: one unified hierarchy
            folders.append((root, path))
        elif "cpu" in controllers.split(","):  # v1: the cpu controller's own hierarchy
            folders += [(root / name, path) for name in (controllers, "cpu", "cpu,cpuacct")]
    folders.append((root, "/"))  # a container sees its own cgroup as the root
    quotas = []
    for folder, path in folders:
        here = folder / path.strip("/")
        while True:  # the quota of every ancestor applies too
            quotas.append(_quota_in(here))
            if here == folder or folder not in here.parents:
                break
            here = here.parent
    quotas = [q for q in quotas if q is not None]
    return min(quotas) if quotas else None


def _quota_in(folder: Path) -> float | None:
    """The CPU quota set in one cgroup folder, in CPUs, or None."""
    try:
        quota, period = (folder / "cpu.max").read_text().split()[:2]  # v2
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota = int((folder / "cpu.cfs_quota_us").read_text())  # v1
        period = int((folder / "cpu.cfs_period_us").read_text())
        return None if quota <= 0 or period <= 0 else quota / period
    except (OSError, ValueError):
        return None


def _check_float32(weights: Weights, matrices: list) -> None:
    """The kernels take float32 C-contiguous arrays; weights.py and layout.py guarantee it, checked once here."""
    arrays = [weights.embeddings.position, weights.embeddings.token_type, weights.embeddings.norm.weight]
    for layer, layer_matrices in zip(weights.layers, matrices):
        arrays += [layer.attention_norm.weight, layer_matrices.qkv, layer_matrices.output, layer.output_norm.bias]
    for array in arrays:
        if array.dtype != np.float32 or not array.flags.c_contiguous:
            raise ValueError(f"FastModel needs float32 C-contiguous weights, got {array.dtype} {array.shape}")
