"""Every fast kernel against its reference.py twin, then FastModel against reference.forward.

Tolerances, per level (all float32):
- exp32: relative 2e-7 of np.exp (about 2 ulp).
- GELU: 1e-6 * max(1, |x|) absolute: both use the same A&S erf; the kernel computes it in fp32,
  the reference in fp64, so they differ by fp32 rounding only.
- LayerNorm, embeddings, attention, head: 2e-5 absolute on O(1) values (summation order differs:
  the kernels add in SIMD lanes, NumPy pairwise).
- Whole model: logits within 1e-4 of reference.forward and the same ranking (issue 3).
On failure each check prints the largest difference and the first values side by side.

Also runs with NUMBA_DISABLE_JIT=1 (the kernels are then plain Python): the full-size model is
skipped there, being far too slow without compilation.
"""

import math
import os

import numba
import numpy as np
import pytest

from nprerank import reference
from nprerank.kernels import attention, fp32, layers, rowwise
from nprerank import model as model_module
from nprerank.kernels import threads as thread_kernels
from nprerank.kernels.threads import SCRATCH_ALIGN, make_workspace
from nprerank.config import ModelConfig
from nprerank.layout import _pack
from nprerank.blas import blas_function, set_blas_threads
from nprerank.model import FastModel, pack, set_threads, usable_cpus
from nprerank.synthetic import make_model
from nprerank.weights import Classifier, Embeddings, Layer, LayerNorm, Linear, load_weights

JIT = not numba.config.DISABLE_JIT


def assert_close(name, got, want, atol, rtol=0.0):
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    diff = np.abs(got - want)
    limit = atol + rtol * np.abs(want)
    if not (diff <= limit).all():
        worst = np.unravel_index(np.argmax(diff - limit), diff.shape)
        side = "\n".join(f"  {g: .8f}  {w: .8f}" for g, w in zip(got.ravel()[:6], want.ravel()[:6]))
        pytest.fail(
            f"{name}: max |diff| {diff.max():.3e} (worst at {worst}: {got[worst]} vs {want[worst]}), "
            f"tolerance atol={atol} rtol={rtol}\n  fast         reference\n{side}"
        )
    print(f"{name}: max |diff| {diff.max():.3e}")


def random(rng, *shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def linear_params(rng, out, inp):
    return Linear(random(rng, out, inp, scale=1 / math.sqrt(inp)), random(rng, out, scale=0.1))


def norm_params(rng, C):
    return LayerNorm(1 + random(rng, C, scale=0.1), random(rng, C, scale=0.1))


def packed_from_padded(padded, lengths):
    """[B, T, C] padded -> [N, C] packed rows of the real tokens."""
    return np.concatenate([padded[b, :n] for b, n in enumerate(lengths)])


def offsets_of(lengths):
    return np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


# Very different lengths in one pack, a one-token sequence, and odd sizes.
LENGTHS = [1, 17, 3, 40, 2]


def test_exp32_matches_numpy():
    x = np.concatenate([np.linspace(-87, 88, 20001), [0.0, -1e-8, 1e-8, -0.34657, 0.34657]]).astype(np.float32)
    got = np.array([rowwise.exp32(v) for v in x[:: 1 if JIT else 40]])
    want = np.exp(x[:: 1 if JIT else 40].astype(np.float64))
    assert_close("exp32", got, want, atol=0.0, rtol=2e-7)


def test_gelu32_matches_reference():
    x = np.concatenate([np.linspace(-12, 12, 4001), [0.0, -0.0, 1e-7, -1e-7, -30.0, 30.0]]).astype(np.float32)
    got = np.array([rowwise.gelu32(v) for v in x[:: 1 if JIT else 20]])
    want = reference.gelu(x[:: 1 if JIT else 20].astype(np.float64))
    assert_close("gelu32", got, want, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("table_dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("architecture", ["XLMRobertaForSequenceClassification", "BertForSequenceClassification"])
def test_embeddings_forward_matches_reference(table_dtype, architecture):
    """Both numberings: RoBERTa's positions from pad + 1 (a typed "<pad>" skipped), BERT's from 0
    with token type 1 after the first [SEP] (id 2 here, which also ends every sequence)."""
    rng = np.random.default_rng(3)
    C, vocab, pad = 24, 50, 1
    config = ModelConfig(
        vocab_size=vocab,
        hidden_size=C,
        num_attention_heads=4,
        max_position_embeddings=45,
        pad_token_id=pad,
        type_vocab_size=2,
        architecture_name=architecture,
    )
    word = random(rng, vocab, C)
    if table_dtype == "float16":
        word = word.astype(np.float16)
    elif table_dtype == "bfloat16":
        word = (word.view(np.uint32) >> 16).astype(np.uint16)  # bf16 bits, as weights.py keeps them
    p = Embeddings(word=word, position=random(rng, 45, C), token_type=random(rng, 2, C), norm=norm_params(rng, C))
    sequences = [[0] + list(rng.integers(1, vocab, n - 1)) for n in LENGTHS]  # id 1: a typed "<pad>"
    sequences = [s[: len(s) // 2] + [2] + s[len(s) // 2 : -1] + [2] if len(s) > 2 else s for s in sequences]
    want = reference.embeddings(*reference.pad(sequences, pad), p, config)  # [B, T, C]
    ids, offsets = pack(sequences, config)
    from nprerank.model import embeddings

    got = embeddings(ids, offsets, p, config)
    lengths = [len(s) for s in sequences]
    assert_close(
        f"embeddings_forward ({table_dtype} table, {architecture})", got, packed_from_padded(want, lengths), atol=2e-5
    )


# M: fewer rows than threads, a ragged last tile, more than PANEL_ROWS; K: more than DEPTH (sums of
# slices); N: not a multiple of PANEL (zero columns in the last panel)
@pytest.mark.parametrize("M,K,N", [(2, 5, 1), (7, 30, 50), (fp32.PANEL_ROWS + 17, 600, 33)])
def test_linear_forward_matches_numpy(M, K, N):
    """x @ W + b on layout.py's panels, split over 1-3 threads, from a strided view into columns 5... of out."""
    rng = np.random.default_rng(6)
    linear = linear_params(rng, N, K)
    panels, bias = _pack([linear])
    x = random(rng, M, K + 3)[:, 1 : K + 1]  # rows 4 * (K + 3) bytes apart
    want = x.astype(np.float64) @ linear.weight.T.astype(np.float64) + linear.bias
    for threads in (1, 2, 3):
        out = np.full((M, 5 + len(bias) + 8), np.nan, dtype=np.float32)
        fp32.linear_forward(out, 5, x, panels, bias, threads)
        assert_close(f"linear_forward {M}x{K}x{N} {threads} threads", out[:, 5 : 5 + N], want, atol=2e-5, rtol=1e-5)
        assert (out[:, 5 + N : 5 + len(bias)] == 0).all(), "the padding columns should come out zero"
        assert np.isnan(out[:, :5]).all() and np.isnan(out[:, 5 + len(bias) :]).all(), "wrote outside its columns"


def test_output_feed_forward_matches_reference():
    """Everything after attention in reference.encoder_layer, with rows split over 1-3 threads."""
    rng = np.random.default_rng(7)
    C, F, M = 40, 3 * fp32.PANEL + 5, layers.BLOCK_TILES * fp32.TILE_ROWS + 9  # two blocks of rows
    layer = Layer(
        *(linear_params(rng, C, C) for _ in range(4)),
        norm_params(rng, C),
        linear_params(rng, F, C),
        linear_params(rng, C, F),
        norm_params(rng, C),
    )
    hidden, context = random(rng, M, C), random(rng, M, C)
    eps = 1e-5
    h = reference.layer_norm(hidden + reference.linear(context, layer.attention_output), layer.attention_norm, eps)
    want = reference.layer_norm(h + reference.feed_forward(h, layer), layer.output_norm, eps)
    packed = {name: _pack([getattr(layer, name)]) for name in ("attention_output", "intermediate", "output")}
    for threads in (1, 2, 3):
        got = hidden.copy()
        floats = layers.feed_forward_floats(M, threads, packed["attention_output"], packed["intermediate"])
        layers.output_feed_forward(
            got,
            context,
            packed["attention_output"],
            layer.attention_norm.weight,
            layer.attention_norm.bias,
            packed["intermediate"],
            packed["output"],
            layer.output_norm.weight,
            layer.output_norm.bias,
            np.float32(eps),
            0,  # fp32 has one path
            make_workspace(threads, floats),
            np.empty((threads, 0), np.float32),  # and needs no codes
        )
        assert_close(f"output_feed_forward {threads} threads", got, want, atol=3e-5)


@pytest.mark.parametrize("threads", [2, 3, 4])
def test_feed_forward_blocks_come_in_whole_rounds_of_the_threads(threads):
    """Every thread gets as many feed-forward blocks as the others: 3 blocks on 2 threads (one
    128-token pair with AVX2's 6-row tiles) left one thread idle a third of the time."""
    for M in range(threads * fp32.TILE_ROWS, 2000):
        rows = layers._rows_per_block(M, threads)
        blocks = -(-M // rows)
        assert blocks % threads == 0, f"M={M}: {blocks} blocks of {rows} rows on {threads} threads"
        assert rows <= layers.BLOCK_TILES * fp32.TILE_ROWS, f"M={M}: blocks of {rows} rows are too large"


@pytest.mark.parametrize("C,H", [(30, 5), (64, 4), (4 * 80, 4)])  # head size 6, 16 and 80 (> PANEL)
def test_attention_forward_matches_reference(C, H):
    """Query, key and value side by side in one [N, 3C] array, as model.py passes them. One
    sequence is longer than DEPTH, so its probabilities times v is summed in slices."""
    lengths = LENGTHS + [fp32.DEPTH + 44]
    rng = np.random.default_rng(4)
    layer = Layer(
        *(linear_params(rng, C, C) for _ in range(4)),
        norm_params(rng, C),
        linear_params(rng, 2 * C, C),
        linear_params(rng, C, 2 * C),
        norm_params(rng, C),
    )
    config = ModelConfig(hidden_size=C, num_attention_heads=H)
    B, T = len(lengths), max(lengths)
    padded = random(rng, B, T, C)
    padding = np.arange(T)[None, :] >= np.array(lengths)[:, None]  # [B, T]
    want = packed_from_padded(reference.attention(padded, padding, layer, config), lengths)  # [N, C]

    x = packed_from_padded(padded, lengths)  # [N, C]
    offsets = offsets_of(lengths)
    qkv = np.concatenate([reference.linear(x, p) for p in (layer.query, layer.key, layer.value)], axis=1)
    context = np.empty((len(x), C), dtype=np.float32)
    workspace = make_workspace(2, attention.attention_floats(offsets, offsets, C // H))
    attention.attention_forward(context, qkv, qkv, C, offsets, offsets, H, workspace)
    got = reference.linear(context, layer.attention_output)
    assert_close(f"attention_forward C={C} H={H}", got, want, atol=2e-5)

    # only each sequence's first token asks (the last layer)
    first = np.ascontiguousarray(qkv[offsets[:-1], :C])
    context = np.empty((B, C), dtype=np.float32)
    workspace = make_workspace(3, attention.attention_floats(offsets, np.arange(B + 1), C // H))
    attention.attention_forward(context, first, qkv, C, offsets, np.arange(B + 1), H, workspace)
    got_first = reference.linear(context, layer.attention_output)
    assert_close(f"attention_forward first tokens C={C} H={H}", got_first, want[offsets[:-1]], atol=2e-5)


def naive_online_attention(q, k, v, block):
    """The online softmax in plain NumPy, one query at a time and one block of keys at a time:
    the twin of attention._attend_block. q [Q, D], k and v [T, D] -> [Q, D]."""
    scale = 1.0 / math.sqrt(q.shape[1])
    out = np.zeros(q.shape)
    for i in range(len(q)):
        highest, total, acc = -np.inf, 0.0, np.zeros(q.shape[1])
        for k0 in range(0, len(k), block):
            scores = k[k0 : k0 + block] @ q[i]  # [block]
            new_highest = max(highest, scores.max())
            rescale = math.exp((highest - new_highest) * scale)  # 0 for the first block
            e = np.exp((scores - new_highest) * scale)
            total = total * rescale + e.sum()
            acc = acc * rescale + e @ v[k0 : k0 + block]
            highest = new_highest
        out[i] = acc / total
    return out


@pytest.mark.parametrize("T", [attention.KEY_BLOCK, attention.KEY_BLOCK + 1, 2 * attention.KEY_BLOCK + 37])
def test_attention_over_several_key_blocks(T):
    """Sequences longer than a block of keys go through the online softmax. A key in the last
    block matches some queries strongly, so their running max rises late and what was summed
    before must be rescaled. Kernel, naive twin and the exact softmax (float64) agree."""
    H, D = 2, 24
    C = H * D
    rng = np.random.default_rng(T)
    lengths = [T, 5]
    N = sum(lengths)
    qkv = random(rng, N, 3 * C)
    qkv[T - 1, C : 2 * C] *= 4  # a late, large key
    qkv[: T // 3, :C] += qkv[T - 1, C : 2 * C]  # queries that point at it
    offsets = offsets_of(lengths)
    context = np.empty((N, C), dtype=np.float32)
    attention.attention_forward(
        context,
        qkv,
        qkv,
        C,
        offsets,
        offsets,
        H,
        make_workspace(2, attention.attention_floats(offsets, offsets, D)),
    )
    for b, h in [(0, 0), (0, 1), (1, 1)]:
        rows, columns = slice(offsets[b], offsets[b + 1]), slice(h * D, (h + 1) * D)
        q, k, v = (qkv[rows, part * C :][:, columns].astype(np.float64) for part in range(3))
        exact = reference.softmax(q @ k.T / math.sqrt(D)) @ v  # [T, D], float64
        if b == 0 and h == 0:  # the twin is slow: a sample of the queries
            sample = np.r_[0:4, T // 3 - 2 : T // 3 + 2, T - 3 : T]
            twin = naive_online_attention(q[sample], k, v, attention.KEY_BLOCK)
            assert_close(f"naive online softmax T={T}", twin, exact[sample], atol=1e-9)
        assert_close(f"attention_forward T={T} sequence {b} head {h}", context[rows, columns], exact, atol=2e-5)


def test_attention_memory_grows_linearly_with_length():
    """A thread's attention scratch is O(T): keys and values, not a [T, T] matrix (issue 13)."""
    D = 64

    def floats(T):
        offsets = np.array([0, T], dtype=np.int64)
        return attention.attention_floats(offsets, offsets, D)

    assert floats(8192) <= 2 * floats(4096) + SCRATCH_ALIGN * 8
    assert floats(8192) * 4 < 8 * 1024 * 1024  # under 8 MB per thread at 8192 tokens (T^2 alone: 256 MB)


def test_a_too_small_workspace_is_refused_before_the_region():
    """The sizes are checked before the threads start, where an error can reach the caller."""
    offsets = offsets_of([3, 40])
    qkv = np.zeros((43, 3 * 32), dtype=np.float32)
    context = np.empty((43, 32), dtype=np.float32)
    small = make_workspace(2, attention.attention_floats(offsets, offsets, 8) - SCRATCH_ALIGN)
    with pytest.raises(ValueError, match="workspace is too small"):
        attention.attention_forward(context, qkv, qkv, 32, offsets, offsets, 4, small)


def test_classification_head_forward_matches_reference():
    rng = np.random.default_rng(5)
    B, C = 3, 20
    p = Classifier(dense=linear_params(rng, C, C), out_proj=linear_params(rng, 1, C))
    hidden = random(rng, B, 4, C)
    logits = np.empty(B, dtype=np.float32)
    rowwise.classification_head_forward(
        logits, np.ascontiguousarray(hidden[:, 0]), p.dense.weight, p.dense.bias, p.out_proj.weight, p.out_proj.bias
    )
    assert_close("classification_head_forward", logits, reference.classification_head(hidden, p), atol=2e-5)


# --- the whole model -------------------------------------------------------------------------


def load(folder):
    config = ModelConfig.from_json(folder / "config.json")
    return load_weights(folder / "model.safetensors", config), config


def check_model(name, folder, lengths, seed=0):
    weights, config = load(folder)
    rng = np.random.default_rng(seed)
    lengths = [min(n, config.max_tokens) for n in lengths]
    sequences = [[0] + [int(i) for i in rng.integers(3, config.vocab_size, n - 1)] for n in lengths]
    sequences[1][-1] = config.pad_token_id  # a "<pad>" typed in a text: attended to, but no position
    got = FastModel(weights, config, threads=2)(sequences)
    # the reference runs them as one padded batch; the fast path packs them
    want = reference.forward(*reference.pad(sequences, config.pad_token_id), weights, config)
    assert got.dtype == np.float32 and got.shape == (len(sequences),)
    assert_close(f"FastModel {name}", got, want, atol=1e-4)
    assert np.argsort(-got, kind="stable").tolist() == np.argsort(-want, kind="stable").tolist(), (
        f"{name}: ranking differs\n  fast {got}\n  ref  {want}"
    )


def test_fast_model_matches_reference_on_tiny_models(tiny_models):
    check_model(tiny_models.name, tiny_models, [1, 30, 4, 90, 2, 17])


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_fast_model_on_half_precision_checkpoints(dtype):
    check_model(dtype, make_model(dtype=dtype), [5, 64, 1, 33])


@pytest.mark.skipif(not JIT, reason="the full-size model is far too slow with NUMBA_DISABLE_JIT=1")
def test_fast_model_matches_reference_on_full_model(full_model):
    check_model("full size", full_model, [128, 3, 60, 200, 1, 37, 255, 90], seed=1)


@pytest.mark.skipif(not model_module.ONE_REGION, reason="this threading layer runs a region per step")
@pytest.mark.parametrize("precision", ["fp32", "int8", "bf16"])
def test_one_region_equals_a_region_per_step(precision, monkeypatch):
    """kernels.layers.encoder_layers runs layers 1..L-1 in one region, each layer's weights by
    address: on a five-layer model it gives the very logits that a region per step gives (the
    same kernels, each layer's weights passed as arrays), at every precision. A wrong address or
    a layer's weights read twice would change them."""
    weights, config = load(make_model(num_hidden_layers=5))
    sequences = [[0, *range(5, 5 + n)] for n in (40, 3, 17, 1)]
    one_region = FastModel(weights, config, threads=2, precision=precision)(sequences)
    monkeypatch.setattr(model_module, "ONE_REGION", False)
    per_step = FastModel(weights, config, threads=2, precision=precision)(sequences)
    np.testing.assert_array_equal(one_region, per_step)


@numba.njit
def largest_of(x):
    return rowwise.largest(x)


def test_largest_is_the_max():
    """rowwise.largest orders the floats by their bits (vectorised): equal to np.max on negatives,
    signed zeros, denormals and infinities."""
    rng = np.random.default_rng(7)
    tiny = np.float32(1e-40)  # a denormal
    cases = [
        -rng.uniform(1, 9, 37).astype(np.float32),
        np.array([-0.0, 0.0, -0.0], np.float32),
        np.array([-0.0], np.float32),
        np.array([-tiny, tiny, -1.0], np.float32),
        np.array([-np.inf, -3.0], np.float32),
        np.array([1.0, np.inf, -np.inf], np.float32),
        rng.standard_normal(513).astype(np.float32),
    ]
    for x in cases:
        got = largest_of(x)
        assert got == x.max() and np.signbit(got) == np.signbit(x.max()) or (got == 0 and x.max() == 0), (x, got)
    column = rng.standard_normal((5, 40)).astype(np.float32)[:, 3]  # a strided view
    assert largest_of(column) == column.max()


@numba.njit
def second_array_doubled(arrays_like, addresses):
    view = thread_kernels.same_array_at(arrays_like, addresses[1])
    view *= 2
    return view.sum()


def test_arrays_by_address():
    """addresses_of refuses an array unlike the first; same_array_at is the array at the address."""
    first, second = np.zeros((2, 3), np.float32), np.arange(6, dtype=np.float32).reshape(2, 3)
    assert second_array_doubled(first, thread_kernels.addresses_of([first, second])) == 30
    np.testing.assert_array_equal(second, 2 * np.arange(6).reshape(2, 3))  # the view was of `second` itself
    for odd in (np.zeros((3, 3), np.float32), first.astype(np.float64), np.zeros((3, 2), np.float32).T):
        with pytest.raises(ValueError, match="among arrays of"):
            thread_kernels.addresses_of([first, odd])


def test_fast_model_rejects_bad_sequences(tiny_model):
    weights, config = load(tiny_model)
    model = FastModel(weights, config)
    cases = {
        "non-empty list": [],
        "sequence 1 is empty": [[0, 5], []],
        f"must be in [0, {config.vocab_size})": [[0, config.vocab_size]],
        "must be in": [[0, -3]],
        "at most": [[0] * (config.max_tokens + 1)],
    }
    for message, sequences in cases.items():
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
            model(sequences)


def test_thread_control(monkeypatch):
    try:
        assert set_threads(1) == 1
        assert numba.get_num_threads() == 1
        monkeypatch.setenv("NPRERANK_NUM_THREADS", "1")
        assert set_threads(None) == 1
        monkeypatch.setenv("NPRERANK_NUM_THREADS", "two")
        with pytest.raises(ValueError, match="NPRERANK_NUM_THREADS"):
            set_threads(None)
        with pytest.raises(ValueError, match="threads must be a positive integer"):
            set_threads(0)
        monkeypatch.delenv("NPRERANK_NUM_THREADS")
        assert set_threads(None) == min(usable_cpus(), numba.config.NUMBA_NUM_THREADS)
    finally:
        set_threads(numba.config.NUMBA_NUM_THREADS)


def test_blas_thread_count_is_set():
    """NumPy's bundled OpenBLAS is found and its thread count really changes."""
    getter = blas_function("get_num_threads")
    if getter is None:
        pytest.skip("NumPy does not use OpenBLAS here")
    try:
        assert set_blas_threads(1) and getter() == 1
        assert set_blas_threads(2) and getter() == min(2, os.cpu_count() or 1)
    finally:
        set_blas_threads(os.cpu_count() or 1)


def test_layers_in_one_region_equal_a_region_per_step(tiny_model, monkeypatch):
    """layers.encoder_layers (the threads meet at barriers) against the same kernels run one
    parallel region per step: every item is computed the same way whichever thread takes it, so
    the logits must be identical, not merely close."""
    import nprerank.model

    weights, config = load(tiny_model)
    assert len(weights.layers) > 1
    model = FastModel(weights, config, threads=2)
    rng = np.random.default_rng(8)
    sequences = [[0] + [int(i) for i in rng.integers(3, config.vocab_size, n)] + [2] for n in (30, 1, 90, 7)]
    together = model(sequences)
    monkeypatch.setattr(nprerank.model, "ONE_REGION", False)
    np.testing.assert_array_equal(model(sequences), together)
