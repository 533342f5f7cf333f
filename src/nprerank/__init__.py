"""nprerank: BAAI's bge-reranker-base cross-encoder in NumPy + Numba.

    from nprerank import Reranker
    reranker = Reranker.from_pretrained("BAAI/bge-reranker-base")
    reranker.rerank("Which one is cooler?", [{"text": "a cyberpunk lizzard"}, {"text": "a cyberpunk cat"}])

Modules, in the order they depend on each other (read them in this order too):
config.py -> architectures.py -> weights.py -> tokenizer.py (+ unigram.py, wordpiece.py) -> reference.py
-> kernels/ (+ blas.py; its __init__ gives its own order) -> layout.py -> model.py
(+ precisions.py: int8.py, kernels/int8.py, int8_model.py for precision="int8";
   bf16.py, kernels/bf16.py, bf16_model.py for precision="bf16"; kernels/isa.py chooses their paths)
-> reranker.py (+ hub.py, finding the model) -> startup.py (the warm-up)
-> cli.py / server/ / batch.py (+ ray.py) / bench.py (+ bench_scale.py).
synthetic.py makes random-weight test models; nothing at run time imports it.
docs/architecture.md walks the forward pass with shapes.
"""

from .config import ModelConfig, ModelError

__version__ = "0.1.0"
__all__ = ["Reranker", "ModelConfig", "ModelError", "__version__"]


def __getattr__(name: str):
    """`nprerank.Reranker`, imported when first asked for (PEP 562): it brings numpy, Numba and the
    kernels, and the command line (cli.py, which imports this package first) must be able to answer
    --help, a usage error or a Ctrl-C before that, as one line."""
    if name == "Reranker":
        from .reranker import Reranker

        return Reranker
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
