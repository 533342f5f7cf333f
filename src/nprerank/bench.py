"""`nprerank bench`: nprerank against torch and ONNX Runtime on the same weights, in one run.

What it owns: the three workloads of issue 3 (fixed seeds), one adapter per engine that turns
token-id sequences into logits, the interleaved timing loop, the fresh-process measurements of
memory and start-up time, and the report (a table, or one JSON document with `--json`).

Engines:
- nprerank-fast / nprerank-reference: `Reranker.from_pretrained(folder, engine=...)`, batched by
  `Reranker.run` exactly as a user's call is.
- torch-eager / torch-sdpa: transformers' model of the checkpoint (XLM-R or BERT), fp32,
  `torch.inference_mode`, padded length-sorted batches (FlagEmbedding's way of batching).
- onnxruntime: the same weights exported once with `torch.onnx.export` (dynamic batch and
  sequence axes, cached), run with every graph optimisation on, padded length-sorted batches.
- Reduced precision (issue 12): nprerank-int8 and nprerank-bf16 (`precision="int8"` / `"bf16"`),
  onnxruntime-int8 (the export fused by onnxruntime's BERT optimizer, then `quantize_dynamic`
  QInt8), openvino-int8 (NNCF static quantization, calibrated on other text), openvino-bf16 (the
  same ONNX export compiled with INFERENCE_PRECISION_HINT bf16; on a CPU without bf16
  instructions OpenVINO runs it in fp32, and the engine's load line says so), torch-bf16
  (autocast). Their error against the reference is reported (max |dlogit|, Kendall tau), not held
  to the 1e-4 agreement.
Every engine gets the same token ids (nprerank's tokenizer, "only_second" truncation), and each
engine's logits are compared with nprerank-reference's so that nobody times a broken engine.
Engines that cannot run here are reported as skipped with the reason.

Method (docs/performance.md says why): a warm-up call per engine and workload (compiling,
allocating), then `--repeats` rounds; in each round every workload runs on every engine, the
engine order rotating from round to round, so machine noise falls on all engines alike. Speed is
pairs per second (median and min of the rounds) and, from the model's useful FLOPs (no padding),
GFLOP/s against an sgemm ceiling measured in the same rounds. Peak memory and the time from
process start to first score come from a fresh process per engine (`--_child`), since a process
that has loaded torch cannot tell what nprerank alone costs.

Read next: docs/performance.md (method and measured tables); reranker.py (what is being timed).
"""

import argparse
import contextlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .arguments import positive_int
from .blas import blas_function, set_blas_threads
from .config import ModelConfig, ModelError
from .reference import pad

ENGINES = (
    "nprerank-fast",
    "nprerank-reference",
    "torch-eager",
    "torch-sdpa",
    "onnxruntime",
    "nprerank-int8",
    "onnxruntime-int8",
    "openvino-int8",
    "nprerank-bf16",
    "torch-bf16",
    "openvino-bf16",
)
# Reduced precision (issue 12): their logits differ from fp32's by design, so instead of the 1e-4
# agreement they report their error against the reference: max |dlogit| and Kendall's tau of
# the ranking they give each workload's pairs.
REDUCED = ("nprerank-int8", "onnxruntime-int8", "openvino-int8", "nprerank-bf16", "torch-bf16", "openvino-bf16")
INT8 = "nprerank-int8"
BF16 = "nprerank-bf16"
WORKLOADS = ("rerank-100", "long", "single", "long-8192")
DEFAULT_WORKLOADS = WORKLOADS[:3]  # long-8192 (one pair at v2-m3's length, issue 13) runs when named
REFERENCE = "nprerank-reference"  # the oracle every engine's logits are compared with
FAST = "nprerank-fast"
AGREEMENT = 1e-4  # max |logit difference| an engine may have from the reference (issue 3's parity bar)
BENCH_EXTRA = "install torch (CPU build) and then, from the nprerank checkout, pip install '.[bench]'"
CHILD_MARK = "nprerank-bench-child: "  # prefixes the one JSON line a child prints
SGEMM_SIZE = 2048  # the ceiling: [2048, 2048] @ [2048, 2048] fp32, 17 GFLOP, ~0.1 s on 2 cores
# Seconds of rest before each timed run. Thread pools spin after their work before they sleep
# (OpenBLAS's for 2^28 cycles, about 0.1 s; ONNX Runtime's and OpenMP's for less), and a spinning
# pool takes a core from whichever engine runs next.
SETTLE = 0.25

# Issue 3's acceptance bars: (what, engine it is compared with, workload, bar).
SPEED_BARS = (
    ("rerank-100", "onnxruntime", 1.15),
    ("rerank-100", "torch-sdpa", 1.15),
    ("long", "onnxruntime", 1.0),
    ("single", "onnxruntime", 1.0),
    ("long-8192", "torch-sdpa", 1.0),
)  # issue 13: one 8192-token pair of the v2-m3 shape
# Issue 12's: nprerank-int8 against the int8 peers (what, peer, workload, bar)
INT8_SPEED_BARS = (
    ("rerank-100", "onnxruntime-int8", 1.3),
    ("rerank-100", "openvino-int8", 1.0),
    ("long", "onnxruntime-int8", 1.0),
    ("long", "openvino-int8", 1.0),
    ("single", "onnxruntime-int8", 1.0),
    ("single", "openvino-int8", 1.0),
)
INT8_PEERS = ("onnxruntime-int8", "openvino-int8")
# and nprerank-bf16's (its error is reported, not judged: the issue asks only that it be reported)
BF16_SPEED_BARS = (("rerank-100", "torch-bf16", 1.15), ("rerank-100", "openvino-bf16", 1.0))
INT8_PEAK_RSS_BAR_MB = 350
PEAK_RSS_BAR_MB = 600
PRIVATE_BAR_MB = 200
FIRST_SCORE_BAR_S = 1.5
LONG_PRIVATE_BAR_MB = 1000  # issue 13: one 8192-token pair of the v2-m3 shape in at most 1 GB of private memory


# --- workloads -------------------------------------------------------------------------------


@dataclass
class Workload:
    name: str
    lengths: list  # token count of each pair, <s> and </s> included
    batch_size: int  # pairs per call to the model (a peer's padded batch; nprerank's upper bound)
    calls: int  # calls per timed run: "single" measures latency, one pair per call, several calls
    seed: int
    sequences: list = None  # token ids, filled in by `tokenize`
    texts: list = None  # the (query, passage) pair behind each sequence

    @property
    def pairs_per_run(self) -> int:
        return len(self.lengths) * self.calls


def make_workloads(names: list, max_tokens: int, quick: bool) -> list:
    """Issue 3's workloads (or tiny ones with --quick), lengths capped at what the model can take."""
    cap = lambda n: min(n, max_tokens)  # noqa: E731
    rng = np.random.default_rng(100)
    if quick:
        specs = {
            "rerank-100": Workload("rerank-100", [cap(int(n)) for n in rng.integers(10, 61, size=8)], 4, 1, 100),
            "long": Workload("long", [cap(512)] * 2, 32, 1, 512),
            "single": Workload("single", [cap(128)], 1, 2, 128),
            "long-8192": Workload("long-8192", [cap(8192)], 1, 1, 8192),
        }
    else:
        specs = {
            "rerank-100": Workload("rerank-100", [cap(int(n)) for n in rng.integers(40, 251, size=100)], 32, 1, 100),
            "long": Workload("long", [cap(512)] * 16, 32, 1, 512),
            "single": Workload("single", [cap(128)], 1, 10, 128),
            "long-8192": Workload("long-8192", [cap(8192)], 1, 1, 8192),  # one pair (issue 13)
        }
    return [specs[name] for name in names]


QUERY = "what is the giant panda and why does it eat bamboo in the mountains of china"


def tokenize(workload: Workload, tokenizer) -> None:
    """Give each pair of the workload real text and exactly its token count.

    rerank-100 is one query against many passages; long and single pair the query with
    different passages too. Passages are deterministic multilingual text (synthetic.corpus),
    made longer than needed and cut by the tokenizer to the wanted length ("only_second": the
    query stays whole), so the token counts are real counts of the model's own tokenizer.
    """
    from .synthetic import corpus

    workload.sequences, workload.texts = [], []
    for i, length in enumerate(workload.lengths):
        lines = 40
        while True:
            passage = " ".join(corpus(lines=lines, seed=workload.seed * 1000 + i))
            (ids,) = tokenizer.encode_pairs([(QUERY, passage)], max_length=length)
            if len(ids) == length or lines > 5000:
                break
            lines *= 2  # this tokenizer packs the text densely: take more of it
        if len(ids) != length:
            raise ModelError(f"could not make a {length}-token pair for {workload.name} with this tokenizer")
        workload.sequences.append(ids)
        workload.texts.append((QUERY, passage))


def useful_flops(tokens: int, config: ModelConfig) -> float:
    """Multiply-adds x 2 that one unpadded pair of `tokens` tokens needs (elementwise work not counted)."""
    T, C, F = tokens, config.hidden_size, config.intermediate_size
    projections = 2 * T * C * 4 * C  # query, key, value, attention output: [T, C] @ [C, C] each
    attention = 2 * 2 * T * T * C  # scores Q K^T and the weighted sum P V, over all heads
    feed_forward = 2 * 2 * T * C * F  # [T, C] @ [C, F] and [T, F] @ [F, C]
    head = 2 * C * C + 2 * C  # dense + out_proj on the first token only
    return config.num_hidden_layers * (projections + attention + feed_forward) + head


# --- engines ---------------------------------------------------------------------------------
# Each engine: `.tokenizer` (nprerank's PairTokenizer) and `.logits(sequences, batch_size)` ->
# [N] float32 logits in input order.


class NprerankEngine:
    def __init__(self, folder: Path, threads: int, engine: str, precision: str = "fp32"):
        from .reranker import Reranker

        self.reranker = Reranker.from_pretrained(folder, engine=engine, threads=threads, precision=precision)
        self.tokenizer = self.reranker.tokenizer

    def logits(self, sequences: list, batch_size: int) -> np.ndarray:
        return self.reranker.run(sequences, batch_size)


def padded_batches(sequences: list, batch_size: int, pad_token_id: int):
    """Longest first, `batch_size` pairs at a time, each batch padded to its longest pair.

    This is how FlagEmbedding and sentence-transformers batch for torch: sorting wastes less on
    padding than input order, but the shorter pairs of each batch still carry pad tokens.
    Yields (input positions, [B, T] int64 ids, [B, T] int64 attention mask).
    """
    order = sorted(range(len(sequences)), key=lambda i: -len(sequences[i]))
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        ids, mask = pad([sequences[i] for i in batch], pad_token_id)  # [B, T], [B, T]
        yield batch, ids, mask


def _peer_tokenizer(folder: Path):
    from .tokenizer import PairTokenizer

    config = ModelConfig.from_json(folder / "config.json")
    return PairTokenizer(folder / "tokenizer.json", config.default_max_length), config.pad_token_id


class TorchEngine:
    """transformers' model; bf16=True runs it under torch.autocast("cpu", bfloat16), the
    mixed precision torch offers on CPUs (its matrix products in bf16, reductions in fp32)."""

    def __init__(self, folder: Path, threads: int, attention: str, bf16: bool = False):
        self.bf16 = bf16
        import torch
        from transformers import AutoModelForSequenceClassification
        from transformers.utils import logging

        logging.set_verbosity_error()
        logging.disable_progress_bar()
        torch.set_num_threads(threads)
        self.torch = torch
        self.tokenizer, self.pad_token_id = _peer_tokenizer(folder)
        model = AutoModelForSequenceClassification.from_pretrained(str(folder), attn_implementation=attention)
        self.model = model.float().eval()
        self.config = ModelConfig.from_json(folder / "config.json")

    def logits(self, sequences: list, batch_size: int) -> np.ndarray:
        out = np.empty(len(sequences), dtype=np.float32)
        autocast = self.torch.autocast("cpu", dtype=self.torch.bfloat16, enabled=self.bf16)
        with self.torch.inference_mode(), autocast:
            for batch, ids, mask in padded_batches(sequences, batch_size, self.pad_token_id):
                types = self.config.architecture.token_type_ids(ids, mask)  # BERT's segments; XLM-R's zeros
                result = self.model(
                    input_ids=self.torch.from_numpy(ids),
                    attention_mask=self.torch.from_numpy(mask),
                    token_type_ids=self.torch.from_numpy(types),
                )
                out[batch] = result.logits[:, 0].float().numpy()  # float(): torch-bf16's are bf16
        return out


def onnx_path(folder: Path) -> Path:
    """Where the ONNX export of this model folder is cached (keyed by the checkpoint's identity)."""
    import hashlib

    from .layout import cache_dir

    weights = (folder / "model.safetensors").resolve()
    stat = weights.stat()
    # "v2": exports since issue 13 take token_type_ids too; older cached ones are not reused
    key = hashlib.sha256(f"v2|{weights}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_dir() / f"onnx-{key}" / "model.onnx"


def export_onnx(folder: Path) -> Path:
    """Export the checkpoint with torch.onnx.export (once; later runs reuse the file)."""
    path = onnx_path(folder)
    if path.exists():
        return path
    import warnings

    import torch
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()
    print(f"exporting {folder} to ONNX (once, cached in {path.parent}) ...", file=sys.stderr, flush=True)
    model = AutoModelForSequenceClassification.from_pretrained(str(folder), attn_implementation="eager")
    model = model.float().eval()
    ids = torch.tensor([[0, 5, 6, 7, 2, 2, 8, 9, 2], [0, 5, 6, 2, 2, 8, 2, 1, 1]])
    mask = (ids != 1).long()
    types = torch.zeros_like(ids)  # an input for BERT's segments (zeros for XLM-R, which has one)
    tmp = path.with_name(f"model.tmp{os.getpid()}.onnx")
    tmp.parent.mkdir(parents=True, exist_ok=True)
    axes = {"batch": 0, "sequence": 1}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python-side branches on shapes
        torch.onnx.export(
            model,
            (ids, mask, types),
            str(tmp),
            input_names=["input_ids", "attention_mask", "token_type_ids"],
            output_names=["logits"],
            dynamic_axes={
                "input_ids": {v: k for k, v in axes.items()},
                "attention_mask": {v: k for k, v in axes.items()},
                "token_type_ids": {v: k for k, v in axes.items()},
                "logits": {0: "batch"},
            },
            opset_version=17,
            dynamo=False,
        )
    os.replace(tmp, path)
    return path


def onnx_int8_path(folder: Path) -> Path:
    """Where the int8 ONNX model is cached, beside the export."""
    return onnx_path(folder).with_name("model-int8.onnx")


def quantize_onnx(folder: Path) -> Path:
    """ONNX Runtime's int8 model, the way CPU deployments make it (infinity, optimum): the export
    fused by onnxruntime.transformers' BERT optimizer (attention, LayerNorm and GELU kernels), then
    `quantize_dynamic` with QInt8 weights (per tensor, its default). Once; later runs reuse it."""
    path = onnx_int8_path(folder)
    if path.exists():
        return path
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers import optimizer

    config = ModelConfig.from_json(folder / "config.json")
    _progress(f"fusing and quantizing the ONNX export to int8 (once, cached in {path.parent}) ...")
    fused = path.with_name(f"model-fused.tmp{os.getpid()}.onnx")
    tmp = path.with_name(f"model-int8.tmp{os.getpid()}.onnx")
    try:
        optimizer.optimize_model(
            str(export_onnx(folder)),
            model_type="bert",
            num_heads=config.num_attention_heads,
            hidden_size=config.hidden_size,
        ).save_model_to_file(str(fused))
        # the fused graph's com.microsoft nodes defeat shape inference: say what unknown tensors are
        quantize_dynamic(
            str(fused),
            str(tmp),
            weight_type=QuantType.QInt8,
            extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
        )
        os.replace(tmp, path)
    finally:
        fused.unlink(missing_ok=True)
        tmp.unlink(missing_ok=True)
    return path


def openvino_int8_path(folder: Path) -> Path:
    return onnx_path(folder).with_name("openvino-int8.xml")


CALIBRATION_PAIRS = 300


def calibration_pairs(tokenizer, count: int = CALIBRATION_PAIRS) -> list:
    """Token ids of `count` pairs that are not the benchmark's: other queries, other passages
    (synthetic.corpus with seeds the workloads never use), 32-256 tokens."""
    from .synthetic import corpus

    rng = np.random.default_rng(7)
    lines = corpus(lines=4 * count, seed=777)
    pairs = [(lines[i], " ".join(lines[count + 3 * i : count + 3 * i + 12])) for i in range(count)]
    lengths = np.minimum(rng.integers(32, 257, count), tokenizer.max_length)  # what the model can take
    return [tokenizer.encode_pairs([pair], max_length=int(n))[0] for pair, n in zip(pairs, lengths)]


def quantize_openvino(folder: Path) -> Path:
    """OpenVINO's int8 model: the same ONNX export, post-training static quantization by NNCF
    (TRANSFORMER model type, CALIBRATION_PAIRS calibration pairs of other text). Once, cached."""
    path = openvino_int8_path(folder)
    if path.exists():
        return path
    import nncf
    import openvino as ov

    tokenizer, pad_token_id = _peer_tokenizer(folder)
    _progress(f"quantizing the ONNX export with NNCF for OpenVINO (once, cached in {path.parent}) ...")
    model = ov.convert_model(str(export_onnx(folder)))
    config = ModelConfig.from_json(folder / "config.json")
    samples = [
        onnx_inputs(config, ids, mask) for _, ids, mask in padded_batches(calibration_pairs(tokenizer), 1, pad_token_id)
    ]
    with contextlib.redirect_stdout(sys.stderr):  # NNCF's progress bars would break --json's one document
        quantized = nncf.quantize(
            model, nncf.Dataset(samples), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(samples)
        )
    tmp = path.with_name(f"openvino-int8.tmp{os.getpid()}.xml")
    ov.save_model(quantized, str(tmp))
    os.replace(tmp.with_suffix(".bin"), path.with_suffix(".bin"))
    os.replace(tmp, path)
    return path


class OpenVinoEngine:
    """OpenVINO's CPU plugin. precision "int8": the NNCF-quantized model (quantize_openvino), with
    OpenVINO's compiled-model cache; "bf16": the plain ONNX export asked for bf16 inference
    (INFERENCE_PRECISION_HINT), and its load line says what it kept: on a CPU without bf16
    instructions it stays fp32."""

    def __init__(self, folder: Path, threads: int, precision: str):
        import openvino as ov

        path = openvino_int8_path(folder) if precision == "int8" else onnx_path(folder)
        if not path.exists():
            raise ModelError(f"no OpenVINO {precision} model at {path}: the parent bench process makes it")
        core = ov.Core()
        options = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
        if precision == "int8":
            core.set_property({"CACHE_DIR": str(path.with_name("openvino-cache"))})  # later starts skip compiling
        else:
            options["INFERENCE_PRECISION_HINT"] = "bf16"
        self.model = core.compile_model(str(path), "CPU", options)
        if precision == "bf16":  # what it runs: the hint it kept, and its executed graph's element types
            kept = self.model.get_property("INFERENCE_PRECISION_HINT")
            runs = sorted(
                {op.get_rt_info()["runtimePrecision"].astype(str) for op in self.model.get_runtime_model().get_ops()}
            )
            print(
                f"openvino-bf16: INFERENCE_PRECISION_HINT {kept}; layers run in {', '.join(runs)}",
                file=sys.stderr,
                flush=True,
            )
        self.tokenizer, self.pad_token_id = _peer_tokenizer(folder)
        self.config = ModelConfig.from_json(folder / "config.json")

    def logits(self, sequences: list, batch_size: int) -> np.ndarray:
        out = np.empty(len(sequences), dtype=np.float32)
        for batch, ids, mask in padded_batches(sequences, batch_size, self.pad_token_id):
            result = self.model(onnx_inputs(self.config, ids, mask))
            out[batch] = result[self.model.output(0)][:, 0]
        return out


class OnnxRuntimeEngine:
    def __init__(self, folder: Path, threads: int, int8: bool = False):
        import onnxruntime as ort

        path = onnx_int8_path(folder) if int8 else onnx_path(folder)
        if not path.exists():
            raise ModelError(f"no ONNX export at {path}: the parent bench process makes it")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.tokenizer, self.pad_token_id = _peer_tokenizer(folder)
        self.config = ModelConfig.from_json(folder / "config.json")

    def logits(self, sequences: list, batch_size: int) -> np.ndarray:
        out = np.empty(len(sequences), dtype=np.float32)
        for batch, ids, mask in padded_batches(sequences, batch_size, self.pad_token_id):
            (result,) = self.session.run(["logits"], onnx_inputs(self.config, ids, mask))
            out[batch] = result[:, 0]
        return out


def onnx_inputs(config: ModelConfig, ids, mask) -> dict:
    """The ONNX export's three inputs for a padded batch: ids, mask and the architecture's token
    types (BERT's segments; XLM-R's zeros)."""
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": config.architecture.token_type_ids(ids, mask)}


def missing(engine: str) -> str | None:
    """Why an engine cannot run here, or None. Checks installs only; loading may still fail."""
    needs = {
        "torch-eager": ("torch", "transformers"),
        "torch-sdpa": ("torch", "transformers"),
        "onnxruntime": ("onnxruntime",),
        "torch-bf16": ("torch", "transformers"),
        "onnxruntime-int8": ("onnxruntime", "onnx"),
        "openvino-int8": ("openvino", "nncf"),
        "openvino-bf16": ("openvino",),
    }.get(engine, ())
    absent = [name for name in needs if importlib.util.find_spec(name) is None]
    if absent:
        return f"{' and '.join(absent)} not installed ({BENCH_EXTRA})"
    return None


def load_engine(engine: str, folder: Path, threads: int):
    """The engine, loaded in this process, with numpy's BLAS on `threads` threads (nprerank-fast
    sets its own threads from `threads=`)."""
    if engine != FAST:
        set_blas_threads(threads)
    if engine == FAST:
        return NprerankEngine(folder, threads, "fast")
    if engine == REFERENCE:
        return NprerankEngine(folder, threads, "reference")
    if engine == "torch-eager":
        return TorchEngine(folder, threads, "eager")
    if engine == "torch-sdpa":
        return TorchEngine(folder, threads, "sdpa")
    if engine == "onnxruntime":
        return OnnxRuntimeEngine(folder, threads)
    if engine in (INT8, "nprerank-bf16"):
        return NprerankEngine(folder, threads, "fast", precision=engine.removeprefix("nprerank-"))
    if engine == "torch-bf16":
        return TorchEngine(folder, threads, "sdpa", bf16=True)
    if engine == "onnxruntime-int8":
        return OnnxRuntimeEngine(folder, threads, int8=True)
    if engine in ("openvino-int8", "openvino-bf16"):
        return OpenVinoEngine(folder, threads, engine.removeprefix("openvino-"))
        return OpenVinoEngine(folder, threads)
    raise ValueError(f"unknown engine {engine!r}")


def prepare(engine: str, folder: Path) -> str | None:
    """Make the files an engine loads (the ONNX export, the int8 models), once, in the parent;
    the reason it cannot run, or None."""
    makers = {
        "onnxruntime": (onnx_path, export_onnx),
        "openvino-bf16": (onnx_path, export_onnx),
        "onnxruntime-int8": (onnx_int8_path, quantize_onnx),
        "openvino-int8": (openvino_int8_path, quantize_openvino),
    }
    if engine not in makers or makers[engine][0](folder).exists():
        return None
    if not onnx_path(folder).exists() and missing("torch-eager"):
        return f"the ONNX export needs torch: {missing('torch-eager')}"
    try:
        makers[engine][1](folder)
    except Exception as e:  # report, don't crash the whole bench
        return f"preparing {engine} failed: {type(e).__name__}: {e}"
    return None


# --- each engine in a process of its own ------------------------------------------------------
# Engines sharing one process disturb each other: after nprerank-reference had run (it allocates
# and frees about a GB), nprerank-fast's next single-pair run was now and then 10-20% slower in
# the same process. So every timed engine lives in a worker process (`--_worker ENGINE`) that
# loads it once and, told over a pipe, runs a workload and answers with its logits or its time.
# The parent keeps the rounds, the interleaving and the rests, as before; a user's process runs
# one engine too.


class EngineProcess:
    """One engine, loaded in a worker process; `.logits(name)` and `.seconds(name)` run a workload."""

    def __init__(self, engine: str, folder: Path, threads: int, work_file: Path, log: Path):
        command = [
            sys.executable,
            "-m",
            "nprerank.bench",
            "--_worker",
            engine,
            "--model",
            str(folder),
            "--threads",
            str(threads),
            "--_child-input",
            str(work_file),
        ]
        self.log = log
        with open(log, "w") as errors:
            self.process = subprocess.Popen(
                command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=errors, text=True
            )

    def ready(self) -> None:
        """Wait until the engine has loaded; RuntimeError with the worker's reason if it did not."""
        self._answer()

    def logits(self, workload: str) -> np.ndarray:
        return np.array(self._ask({"run": workload, "answer": "logits"})["logits"], dtype=np.float32)

    def seconds(self, workload: str) -> dict:
        """{"seconds": wall time of one run, "peak_anonymous_mb": the worker's peak private memory in it}"""
        return self._ask({"run": workload, "answer": "seconds"})

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.stdin.close()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()

    def _ask(self, request: dict) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        return self._answer()

    def _answer(self) -> dict:
        for line in self.process.stdout:  # libraries may print too: the answer is the marked line
            if line.startswith(CHILD_MARK):
                answer = json.loads(line[len(CHILD_MARK) :])
                if "error" in answer:
                    raise RuntimeError(answer["error"])
                return answer
        last = " | ".join(self.log.read_text().strip().splitlines()[-3:])
        raise RuntimeError(f"worker exited {self.process.wait()}: {last or 'no output'}")


def worker_main(args) -> int:
    """In a worker process: load one engine, then run the workloads the parent names on stdin."""
    work = json.loads(Path(args.child_input).read_text())  # name -> {sequences, batch_size, calls}

    def answer(message: dict) -> None:
        print(CHILD_MARK + json.dumps(message), flush=True)

    try:
        engine = load_engine(args.worker, Path(args.model), args.threads)
    except Exception as e:  # report, don't crash the whole bench
        answer({"error": f"failed to load: {type(e).__name__}: {e}"})
        return 1
    answer({"ready": True})
    memory = AnonymousMemoryPeak()  # the peak of each timed run: the loaded engine plus what the run adds
    for line in sys.stdin:
        request = json.loads(line)
        workload = work[request["run"]]
        run_once = lambda: engine.logits(workload["sequences"], workload["batch_size"])  # noqa: E731
        if request["answer"] == "logits":
            answer({"logits": run_once().tolist()})
        else:
            memory.reset()
            seconds = _seconds(lambda: [run_once() for _ in range(workload["calls"])])
            answer({"seconds": seconds, "peak_anonymous_mb": memory.peak() * 1024 / 1e6})
    return 0


# --- the machine: BLAS, sgemm ceiling, memory, process start ---------------------------------


def blas_runtime() -> dict:
    """Which BLAS numpy calls, which kernel it picked for this CPU, and its thread count."""
    config = np.show_config(mode="dicts").get("Build Dependencies", {}).get("blas", {})
    info = {
        "name": config.get("name"),
        "version": config.get("version"),
        "env": {
            k: os.environ[k]
            for k in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")
            if k in os.environ
        },
    }
    if importlib.util.find_spec("threadpoolctl"):
        from threadpoolctl import threadpool_info

        for pool in threadpool_info():
            if pool.get("user_api") == "blas" and "numpy" in pool.get("filepath", ""):
                info.update(kernel=pool.get("architecture"), threads=pool.get("num_threads"), source="threadpoolctl")
                return info
    import ctypes

    corename = blas_function("get_corename")
    if corename is not None:
        corename.restype = ctypes.c_char_p
        info.update(
            kernel=corename().decode(),
            threads=blas_function("get_num_threads")(),
            source="OpenBLAS get_corename via ctypes",
        )
    return info


def sgemm_gflops(size: int = SGEMM_SIZE, tries: int = 5) -> float:
    """Best of `tries` fp32 [size, size] @ [size, size] products: what BLAS can reach here, now."""
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))
    out = np.empty((size, size), dtype=np.float32)
    np.matmul(a, b, out=out)  # first call: threads start, pages fault in
    best = min(_seconds(lambda: np.matmul(a, b, out=out)) for _ in range(tries))
    return 2 * size**3 / best / 1e9


def _seconds(work) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def seconds_since_process_start() -> float:
    """Now minus the kernel's record of this process's start (/proc/self/stat field 22, 10 ms ticks)."""
    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # fields from the 3rd on; the name may hold spaces
    start = int(fields[22 - 3]) / os.sysconf("SC_CLK_TCK")
    return time.clock_gettime(time.CLOCK_BOOTTIME) - start


def _proc_kb(path: str, names: tuple) -> dict:
    values = dict.fromkeys(names, 0)
    with open(path) as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in values:
                values[key] = int(rest.split()[0])
    return values


class AnonymousMemoryPeak:
    """Samples RssAnon (resident anonymous memory) every few ms on a thread and keeps the peak.

    The kernel keeps a peak for the whole RSS (ru_maxrss) but not for anonymous memory, the part
    that is really this process's own: memory-mapped weights are page cache, shared and droppable.
    """

    def __init__(self, interval: float = 0.005):
        self.peak_kb, self.interval, self.running = 0, interval, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()

    def _sample(self):
        while self.running:
            self.peak_kb = max(self.peak_kb, _proc_kb("/proc/self/status", ("RssAnon",))["RssAnon"])
            time.sleep(self.interval)

    def peak(self) -> int:
        """The peak so far, kB."""
        return max(self.peak_kb, _proc_kb("/proc/self/status", ("RssAnon",))["RssAnon"])

    def reset(self) -> None:
        """Start a new peak from now."""
        self.peak_kb = 0

    def stop(self) -> int:
        self.running = False
        self.thread.join()
        return self.peak()


# --- fresh-process measurements --------------------------------------------------------------


def child_main(args) -> int:
    """In a fresh process: load one engine, score one pair (first score), then rerank-100; print JSON."""
    sampler = AnonymousMemoryPeak()
    folder = Path(args.model)
    work = json.loads(Path(args.child_input).read_text())
    engine = load_engine(args.child, folder, args.threads)
    query, passage, max_length = work["first"]
    engine.logits(engine.tokenizer.encode_pairs([(query, passage)], max_length=max_length), 1)
    first_score = seconds_since_process_start()
    engine.logits(work["rerank"], work["batch_size"])
    peak_anonymous_kb = sampler.stop()
    rollup = _proc_kb("/proc/self/smaps_rollup", ("Rss", "Anonymous", "Private_Clean", "Private_Dirty"))
    result = {
        "first_score_s": round(first_score, 3),
        # VmHWM, not ru_maxrss: Linux carries the parent's RSS at fork into the child's ru_maxrss
        "peak_rss_mb": _proc_kb("/proc/self/status", ("VmHWM",))["VmHWM"] * 1024 / 1e6,
        "peak_anonymous_mb": peak_anonymous_kb * 1024 / 1e6,
        "end_anonymous_mb": rollup["Anonymous"] * 1024 / 1e6,
        "end_private_mb": (rollup["Private_Clean"] + rollup["Private_Dirty"]) * 1024 / 1e6,
        "end_rss_mb": rollup["Rss"] * 1024 / 1e6,
    }
    print(CHILD_MARK + json.dumps(result), flush=True)
    return 0


def measure_start(engine: str, folder: Path, threads: int, work_file: Path, env: dict | None = None) -> dict:
    """Run `python -m nprerank.bench --_child ENGINE` and read its one JSON line."""
    command = [
        sys.executable,
        "-m",
        "nprerank.bench",
        "--_child",
        engine,
        "--model",
        str(folder),
        "--threads",
        str(threads),
        "--_child-input",
        str(work_file),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=1200, env={**os.environ, **(env or {})})
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(CHILD_MARK):
            return json.loads(line[len(CHILD_MARK) :])
    last = " | ".join(done.stderr.strip().splitlines()[-3:])
    return {"error": f"child exited {done.returncode}: {last or 'no output'}"}


def measure_starts(engines: list, folder: Path, threads: int, single: Workload, rerank: Workload) -> dict:
    """Start-up time and memory per engine, each in fresh processes; nprerank-fast cold and cached.

    The cold start compiles every Numba kernel and writes the weight layout file (layout.py): the
    child runs with NUMBA_CACHE_DIR and NPRERANK_CACHE pointing at empty folders (so nobody's
    cache is deleted); the second child with the same folders finds both there, as every later
    start does.
    """
    starts = {}
    with tempfile.TemporaryDirectory(prefix="nprerank-bench-") as tmp:
        work_file = Path(tmp) / "work.json"
        work_file.write_text(
            json.dumps(
                {
                    "first": [*single.texts[0], single.lengths[0]],
                    "rerank": rerank.sequences,
                    "batch_size": rerank.batch_size,
                }
            )
        )
        for engine in engines:
            _progress(f"fresh process: {engine}")
            if engine == FAST:
                caches = {"NUMBA_CACHE_DIR": str(Path(tmp) / "numba-cache"), "NPRERANK_CACHE": str(Path(tmp) / "cache")}
                cold = measure_start(engine, folder, threads, work_file, caches)
                starts[engine] = {**measure_start(engine, folder, threads, work_file, caches), "cold": cold}
            else:
                starts[engine] = measure_start(engine, folder, threads, work_file)
    return starts


# --- the run ---------------------------------------------------------------------------------


def _progress(message: str) -> None:
    print(f"[bench] {message}", file=sys.stderr, flush=True)


def resolve_model(args) -> tuple:
    """(folder, description) from --model or --random; ModelError with the reason otherwise."""
    if getattr(args, "outliers", False) and not args.random:
        raise ValueError("--outliers shapes the --random model only; give --random with it")
    if getattr(args, "random_shape", None):
        return random_shape(args.random_shape)
    if args.random:
        absent = [name for name in ("torch", "transformers", "sentencepiece") if importlib.util.find_spec(name) is None]
        if absent:
            raise ModelError(
                f"--random builds a random checkpoint with {', '.join(absent)}, not installed ({BENCH_EXTRA})"
            )
        from .synthetic import BGE_RERANKER_BASE, make_model

        outliers = 4 if getattr(args, "outliers", False) else 0
        _progress("random bge-reranker-base-shaped checkpoint (seed 1; about a minute to build the first time)")
        # with a tokenizer of the real size (250,002 pieces): its memory and load time are part of
        # every start, and the 800-piece test tokenizer would hide them
        return (
            make_model(seed=1, real_size_tokenizer=True, outliers=outliers, **BGE_RERANKER_BASE),
            "random weights, bge-reranker-base shape, real-size tokenizer "
            f"(synthetic.make_model(seed=1, real_size_tokenizer=True, outliers={outliers}))",
        )
    from .hub import check_folder, resolve

    folder = check_folder(resolve(args.model))  # a folder, or a Hub repo id as everywhere else
    return folder, str(folder)


def random_shape(name: str) -> tuple:
    """(folder, description) of a random checkpoint of a named model's full shape (synthetic.SHAPES):
    base, large and v2-m3 with the real-size XLM-R tokenizer, minilm-l6/-l12 with a WordPiece one."""
    absent = [name for name in ("torch", "transformers", "sentencepiece") if importlib.util.find_spec(name) is None]
    if absent:
        raise ModelError(
            f"--random-shape builds a random checkpoint with {', '.join(absent)}, not installed ({BENCH_EXTRA})"
        )
    from .synthetic import MODEL_MAX_LENGTH, SHAPES, make_model

    spec = dict(SHAPES[name])
    bert = spec.get("architecture") == "bert"
    _progress(f"random {name}-shaped checkpoint (seed 1; built once and cached, minutes for the large ones)")
    folder = make_model(seed=1, real_size_tokenizer=not bert, model_max_length=MODEL_MAX_LENGTH.get(name), **spec)
    return folder, f"random weights, {name} shape (synthetic.SHAPES[{name!r}], seed 1)"


def run(args) -> dict:
    folder, description = resolve_model(args)
    config = ModelConfig.from_json(folder / "config.json")
    set_blas_threads(args.threads)
    report = {
        "command": " ".join(getattr(args, "command", None) or [Path(sys.argv[0]).name, *sys.argv[1:]]),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "model": {
            "path": str(folder),
            "description": description,
            "layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size,
            "vocab_size": config.vocab_size,
        },
        "threads": args.threads,
        "repeats": args.repeats,
        "quick": args.quick,
        "machine": machine_info(),
        "engines": {},
        "workloads": {},
        "startup": {},
    }

    workloads = make_workloads(args.workloads, config.max_tokens, args.quick)
    tokenizer, _ = _peer_tokenizer(folder)  # the same tokenizer every engine has
    if args.startup_only:  # memory and start-up only: no speed rounds, no reference engine
        single, rerank = make_workloads(["single", "rerank-100"], config.max_tokens, args.quick)
        for workload in (single, rerank):
            tokenize(workload, tokenizer)
        report["startup"] = measure_starts(args.engines, folder, args.threads, single, rerank)
        report["acceptance"] = acceptance(report)
        return report
    for workload in workloads:
        tokenize(workload, tokenizer)

    engines = {}  # name -> EngineProcess
    with tempfile.TemporaryDirectory(prefix="nprerank-bench-") as tmp:
        work_file = Path(tmp) / "work.json"
        work_file.write_text(
            json.dumps(
                {w.name: {"sequences": w.sequences, "batch_size": w.batch_size, "calls": w.calls} for w in workloads}
            )
        )
        try:
            for name in dict.fromkeys([REFERENCE, *args.engines]):  # the reference always: it checks the others
                reason = missing(name) or prepare(name, folder)
                if reason is None:
                    _progress(f"loading {name} (in a process of its own)")
                    engines[name] = EngineProcess(name, folder, args.threads, work_file, Path(tmp) / f"{name}.log")
                report["engines"][name] = (
                    {"status": "ok"} if reason is None else {"status": "skipped", "reason": reason}
                )
            for name, engine in list(engines.items()):  # they load side by side; wait for each
                try:
                    engine.ready()
                except RuntimeError as e:
                    report["engines"][name] = {"status": "skipped", "reason": str(e)}
                    engine.close()
                    del engines[name]
            if REFERENCE not in engines:
                raise ModelError(f"nprerank-reference could not load: {report['engines'][REFERENCE]['reason']}")
            timed = [name for name in args.engines if name in engines]
            if REFERENCE not in args.engines:
                report["engines"][REFERENCE]["note"] = "used for the logit check only, not timed"

            # warm-up: compile, allocate, and keep each engine's logits to compare with the reference
            logits = {}
            for workload in workloads:
                for name in dict.fromkeys([REFERENCE, *timed]):
                    _progress(f"warm-up {workload.name} on {name}")
                    logits[workload.name, name] = engines[name].logits(workload.name)

            seconds = {(w.name, name): [] for w in workloads for name in timed}
            peak_anonymous = {(w.name, name): 0.0 for w in workloads for name in timed}  # MB, over all rounds
            sgemm = []
            for round_ in range(args.repeats):
                sgemm.append(sgemm_gflops())
                for workload in workloads:
                    shift = round_ % len(timed)
                    for name in timed[shift:] + timed[:shift]:  # rotate who goes first
                        time.sleep(SETTLE)  # let the previous engine's spinning threads go idle
                        run = engines[name].seconds(workload.name)
                        seconds[workload.name, name].append(run["seconds"])
                        peak_anonymous[workload.name, name] = max(
                            peak_anonymous[workload.name, name], run["peak_anonymous_mb"]
                        )
                    _progress(
                        f"round {round_ + 1}/{args.repeats} {workload.name}: "
                        + ", ".join(
                            f"{name} {workload.pairs_per_run / seconds[workload.name, name][-1]:.2f}" for name in timed
                        )
                        + " pairs/s"
                    )
        finally:
            for engine in engines.values():
                engine.close()
    ceiling = statistics.median(sgemm)
    report["machine"]["sgemm_gflops"] = {"median": ceiling, "runs": sgemm, "size": SGEMM_SIZE}

    for workload in workloads:
        flops = sum(useful_flops(n, config) for n in workload.lengths) * workload.calls
        entry = {
            "pairs": len(workload.lengths),
            "calls": workload.calls,
            "batch_size": workload.batch_size,
            "tokens": sum(workload.lengths),
            "min_tokens": min(workload.lengths),
            "max_tokens": max(workload.lengths),
            "useful_gflop_per_run": flops / 1e9,
            "results": {},
        }
        reference_logits = logits[workload.name, REFERENCE]
        for name in timed:
            rates = [workload.pairs_per_run / s for s in seconds[workload.name, name]]
            difference = float(np.max(np.abs(logits[workload.name, name] - reference_logits)))
            tau = kendall_tau(logits[workload.name, name], reference_logits) if len(reference_logits) > 1 else None
            entry["results"][name] = {
                "pairs_per_s": {"median": statistics.median(rates), "min": min(rates), "runs": rates},
                "seconds": seconds[workload.name, name],
                "gflops": flops / 1e9 / statistics.median(seconds[workload.name, name]),
                "max_abs_logit_diff_vs_reference": difference,
                "kendall_tau_vs_reference": tau,
                # reduced precision is expected to differ: its error is reported, not judged here
                "agrees": None if name in REDUCED else difference <= AGREEMENT,
                "peak_anonymous_mb": peak_anonymous[workload.name, name],
            }
            entry["results"][name]["ceiling_fraction"] = entry["results"][name]["gflops"] / ceiling
        if FAST in entry["results"]:
            fast = entry["results"][FAST]["pairs_per_s"]["median"]
            for result in entry["results"].values():
                result["fast_ratio"] = fast / result["pairs_per_s"]["median"]
        report["workloads"][workload.name] = entry

    if not args.no_startup:
        single = (
            next((w for w in workloads if w.name == "single"), None)
            or make_workloads(["single"], config.max_tokens, args.quick)[0]
        )
        rerank = (
            next((w for w in workloads if w.name == "rerank-100"), None)
            or make_workloads(["rerank-100"], config.max_tokens, args.quick)[0]
        )
        for workload in (single, rerank):
            if workload.sequences is None:
                tokenize(workload, tokenizer)
        report["startup"] = measure_starts(timed, folder, args.threads, single, rerank)
    report["acceptance"] = acceptance(report)
    return report


def kendall_tau(scores: np.ndarray, reference: np.ndarray) -> float:
    """Kendall's tau-a of two scorings of the same items: (concordant - discordant pairs) / all
    pairs; 1.0 when they rank the items alike. O(n^2), for the bench's 100 pairs."""
    scores, reference = np.asarray(scores, np.float64), np.asarray(reference, np.float64)
    upper = np.triu_indices(len(scores), k=1)
    agreement = np.sign(np.subtract.outer(scores, scores)[upper]) * np.sign(
        np.subtract.outer(reference, reference)[upper]
    )
    return float(agreement.sum() / len(agreement))


def machine_info() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    versions = {}
    for name in ("numpy", "numba", "torch", "transformers", "onnxruntime"):
        if importlib.util.find_spec(name):
            from importlib.metadata import PackageNotFoundError, version

            try:
                versions[name] = version(name)
            except PackageNotFoundError:
                pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "versions": versions,
        "blas": blas_runtime(),
        "env": {k: v for k, v in os.environ.items() if k.startswith(("NUMBA_", "NPRERANK_", "OMP_", "MKL_"))},
    }


def acceptance(report: dict) -> list:
    """Issue 3's bars (and issue 13's long-pair memory, issue 12's int8 and bf16 bars) as [{check,
    value, bar, status}]; status PASS, FAIL or N/A (with why)."""
    return (
        speed_checks(report, FAST, SPEED_BARS)
        + [long_memory_check(report)]
        + start_checks(
            report,
            FAST,
            (
                ("peak RSS", "peak_rss_mb", PEAK_RSS_BAR_MB, " MB"),
                ("peak private (anonymous) memory", "peak_anonymous_mb", PRIVATE_BAR_MB, " MB"),
                ("cached start to first score", "first_score_s", FIRST_SCORE_BAR_S, " s"),
            ),
        )
        + int8_acceptance(report)
        + (speed_checks(report, BF16, BF16_SPEED_BARS) if _ran(report, BF16) else [])
    )


def _ran(report: dict, engine: str) -> bool:
    """Whether `engine` was timed on any workload."""
    return any(engine in entry.get("results", {}) for entry in report["workloads"].values())


def speed_checks(report: dict, engine: str, bars: tuple) -> list:
    """One check per (workload, peer, bar): engine's median pairs/s over the peer's, >= bar."""
    checks = []
    for workload, peer, bar in bars:
        check = {"check": f"{engine} / {peer} on {workload}", "bar": f">= {bar:.2f}x"}
        results = report["workloads"].get(workload, {}).get("results", {})
        if engine in results and peer in results:
            ratio = results[engine]["pairs_per_s"]["median"] / results[peer]["pairs_per_s"]["median"]
            check.update(value=f"{ratio:.2f}x", status="PASS" if ratio >= bar else "FAIL")
        else:
            check.update(value=None, status="N/A", why=f"{workload} not run on {engine} and {peer}")
        checks.append(check)
    return checks


def long_memory_check(report: dict) -> dict:
    """Issue 13's bar: nprerank-fast's peak private memory while it scores the 8192-token pair."""
    long_pair = report["workloads"].get("long-8192", {}).get("results", {}).get(FAST)
    check = {"check": f"{FAST} peak private (anonymous) memory on long-8192", "bar": f"<= {LONG_PRIVATE_BAR_MB} MB"}
    if long_pair:
        peak = long_pair["peak_anonymous_mb"]
        check.update(value=f"{peak:.0f} MB", status="PASS" if peak <= LONG_PRIVATE_BAR_MB else "FAIL")
    else:
        check.update(value=None, status="N/A", why=f"long-8192 not run on {FAST}")
    return check


def start_checks(report: dict, engine: str, bars: tuple) -> list:
    """One check per (name, key, bar, unit) of the engine's fresh-process measurements, <= bar."""
    start, checks = report["startup"].get(engine, {}), []
    for name, key, bar, unit in bars:
        check = {"check": f"{engine} {name}", "bar": f"<= {bar}{unit}"}
        if key in start:
            check.update(
                value=f"{start[key]:.{2 if unit == ' s' else 0}f}{unit}", status="PASS" if start[key] <= bar else "FAIL"
            )
        else:
            check.update(value=None, status="N/A", why=start.get("error", "start-up not measured"))
        checks.append(check)
    return checks


def int8_acceptance(report: dict) -> list:
    """Issue 12's bars for nprerank-int8: speed against the int8 peers, error no worse than the
    better peer's on rerank-100 (max |dlogit| and Kendall's tau against fp32), and its memory and
    start-up. Only when nprerank-int8 ran."""
    if not _ran(report, INT8):
        return []
    results = {name: entry.get("results", {}) for name, entry in report["workloads"].items()}
    checks = speed_checks(report, INT8, INT8_SPEED_BARS)
    rerank = results.get("rerank-100", {})
    peers = [peer for peer in INT8_PEERS if peer in rerank]
    for what, key, better in (
        ("max |dlogit| vs fp32", "max_abs_logit_diff_vs_reference", min),
        ("Kendall tau vs fp32", "kendall_tau_vs_reference", max),
    ):
        best = better(rerank[peer][key] for peer in peers) if peers else None
        check = {
            "check": f"{INT8} {what} on rerank-100",
            "bar": f"{'<=' if better is min else '>='} the better "
            f"int8 peer's" + (f" ({best:.4f})" if best is not None else ""),
        }
        if INT8 in rerank and peers:
            value = rerank[INT8][key]
            check.update(
                value=f"{value:.4f}", status="PASS" if (value <= best if better is min else value >= best) else "FAIL"
            )
        else:
            check.update(value=None, status="N/A", why="rerank-100 not run on nprerank-int8 and an int8 peer")
        checks.append(check)
    return checks + start_checks(
        report,
        INT8,
        (
            ("peak RSS", "peak_rss_mb", INT8_PEAK_RSS_BAR_MB, " MB"),
            ("cached start to first score", "first_score_s", FIRST_SCORE_BAR_S, " s"),
        ),
    )


# --- the report ------------------------------------------------------------------------------


def format_report(report: dict) -> str:
    blas = report["machine"]["blas"]
    sgemm = report["machine"].get("sgemm_gflops")  # not measured with --startup-only
    lines = [
        f"nprerank bench  {report['date']}",
        f"model: {report['model']['description']}",
        f"threads {report['threads']}, repeats {report['repeats']}{', QUICK workloads' if report['quick'] else ''}; "
        f"{report['machine']['cpu']}, {report['machine']['cores']} cores",
        f"numpy BLAS: {blas.get('name')} {blas.get('version')}, kernel {blas.get('kernel', '?')}"
        + (f" ({', '.join(f'{k}={v}' for k, v in blas['env'].items())})" if blas.get("env") else ""),
    ]
    if sgemm:
        lines.append(
            f"sgemm ceiling: {sgemm['median']:.0f} GFLOP/s (fp32 {sgemm['size']}^3 matmul, median of rounds, "
            f"best of 5 each)"
        )
    for name, state in report["engines"].items():
        if state["status"] != "ok":
            lines.append(f"skipped: {name}: {state['reason']}")
    for name, entry in report["workloads"].items():
        lines += [
            "",
            f"{name}: {entry['pairs']} pair(s) x {entry['calls']} call(s), {entry['min_tokens']}-"
            f"{entry['max_tokens']} tokens ({entry['tokens']} in all), batches of {entry['batch_size']}, "
            f"{entry['useful_gflop_per_run']:.4g} useful GFLOP per run",
        ]
        header = (
            f"  {'engine':<20}{'pairs/s med':>12}{'min':>8}{'fast / it':>11}{'GFLOP/s':>9}{'% ceil':>8}"
            f"{'max|dlogit|':>13}{'tau':>7}{'peak anon MB':>14}"
        )
        lines.append(header)
        for engine, r in entry["results"].items():
            tau = r.get("kendall_tau_vs_reference")
            lines.append(
                f"  {engine:<20}{r['pairs_per_s']['median']:>12.2f}{r['pairs_per_s']['min']:>8.2f}"
                f"{_ratio(r.get('fast_ratio')):>11}{r['gflops']:>9.1f}{100 * r['ceiling_fraction']:>7.0f}%"
                f"{r['max_abs_logit_diff_vs_reference']:>13.1e}{'-' if tau is None else f'{tau:.3f}':>7}"
                f"{r['peak_anonymous_mb']:>14.0f}" + ("  DISAGREES" if r["agrees"] is False else "")
            )
    if report["startup"]:
        lines += [
            "",
            "fresh process per engine: start -> first score (1 pair), then rerank-100; memory in MB",
            f"  {'engine':<28}{'first score s':>14}{'peak RSS':>10}{'peak anon':>11}{'end private':>13}",
        ]
        for engine, s in report["startup"].items():
            rows = ([(f"{engine} (cold: compiling)", s["cold"])] if "cold" in s else []) + [
                (f"{engine} (cached)" if "cold" in s else engine, s)
            ]
            for label, row in rows:
                if "error" in row:
                    lines.append(f"  {label:<28}{row['error']}")
                else:
                    lines.append(
                        f"  {label:<28}{row['first_score_s']:>14.2f}{row['peak_rss_mb']:>10.0f}"
                        f"{row['peak_anonymous_mb']:>11.0f}{row['end_private_mb']:>13.0f}"
                    )
    lines += ["", "acceptance, issues 3, 12 and 13 (bars are for the full-size model on 2 threads):"]
    for check in report["acceptance"]:
        value = check["value"] if check["value"] is not None else f"({check['why']})"
        lines.append(f"  {check['status']:<5} {check['check']}: {value} (bar {check['bar']})")
    return "\n".join(lines)


def _ratio(value) -> str:
    return "-" if value is None else f"{value:.2f}x"


# --- command line ----------------------------------------------------------------------------


def _names(allowed: tuple):
    def parse(text: str) -> list:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"{', '.join(unknown) or 'nothing'} not among {', '.join(allowed)}")
        return list(dict.fromkeys(names))

    return parse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    model = parser.add_mutually_exclusive_group(required=True)
    model.add_argument(
        "--model",
        "-m",
        metavar="PATH",
        help="a bge-reranker-base folder (config.json, tokenizer.json, model.safetensors)",
    )
    model.add_argument(
        "--random",
        action="store_true",
        help="a random full-size bge-reranker-base-shaped checkpoint, built once and cached (needs the bench extra)",
    )
    model.add_argument(
        "--random-shape",
        choices=["base", "large", "v2-m3", "minilm-l6", "minilm-l12"],
        help="a random checkpoint of that model's full shape (docs/models.md), built once and cached",
    )
    parser.add_argument(
        "--outliers",
        action="store_true",
        help="with --random: 4 hidden dimensions 20-50x larger in every LayerNorm (int8's hard case)",
    )
    parser.add_argument(
        "--engines",
        type=_names(ENGINES),
        default=list(ENGINES),
        help=f"comma-separated, default all: {','.join(ENGINES)}",
    )
    parser.add_argument(
        "--workloads",
        type=_names(WORKLOADS),
        default=list(DEFAULT_WORKLOADS),
        help=f"comma-separated, default {','.join(DEFAULT_WORKLOADS)}; also: long-8192",
    )
    parser.add_argument("--threads", type=positive_int, default=2, help="threads for every engine (default 2)")
    parser.add_argument(
        "--repeats", type=positive_int, default=3, help="timed rounds per engine and workload (default 3)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="tiny workloads (a few pairs): checks the bench, measures nothing"
    )
    startup = parser.add_mutually_exclusive_group()
    startup.add_argument(
        "--no-startup", action="store_true", help="skip the fresh-process memory and start-up measurements"
    )
    startup.add_argument(
        "--startup-only",
        action="store_true",
        help="only the fresh-process memory and start-up measurements of --engines (no speed rounds)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    parser.add_argument(
        "--scale",
        action="store_true",
        help="issue 14's benchmarks instead (bench_scale.py): "
        "nprerank batch vs the library in a loop, serve --workers 2 vs 1, memory per worker",
    )
    from .bench_scale import add_arguments as scale_arguments

    scale_arguments(parser)
    parser.add_argument("--_child", dest="child", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--_worker", dest="worker", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--_child-input", dest="child_input", help=argparse.SUPPRESS)


def run_from_args(args) -> int:
    if getattr(args, "child", None):
        return child_main(args)
    if getattr(args, "worker", None):
        return worker_main(args)
    from . import bench_scale

    measure, report_of = (bench_scale.run, bench_scale.format_report) if args.scale else (run, format_report)
    try:
        report = measure(args)
    except (ModelError, OSError) as e:  # a model or a file that cannot be used: 1, as in every command
        print(f"nprerank bench: error: {e}", file=sys.stderr)
        return 1
    except ValueError as e:  # options that cannot work together
        print(f"nprerank bench: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=1) if args.json else report_of(report))
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="nprerank bench", description=__doc__.split("\n\n")[0])
    add_arguments(parser)
    args = parser.parse_args(argv)
    args.command = ["python -m nprerank.bench", *(sys.argv[1:] if argv is None else argv)]
    return run_from_args(args)


if __name__ == "__main__":
    sys.exit(main())
