"""Numba kernels for the fast forward pass, one module per concern.

model.py runs the same steps as reference.py, but over a *packed* batch: the tokens of all B
sequences lie back to back in one [N, C] matrix, sequence b in rows offsets[b]:offsets[b+1], so
no pad token is ever multiplied. The matrix products (about 95% of the work) are made by one
kernel per precision that keeps a tile of results in vector registers while it runs through K,
on weights layout.py has packed into panels. The rest is done around them, each step in one pass
over memory, with the biases added as the products are made. Every kernel names the function it
must equal (its twin: in reference.py, or in int8.py and bf16.py for the reduced precisions,
which also define those formats); tests/test_kernels.py, test_quantized.py and test_bf16.py check
each one against it.

Legend (every module):  N tokens in the packed batch, B sequences, offsets [B+1] row ranges of
         the sequences, C hidden size (768), H heads (12), D head size (C / H = 64), F
         feed-forward width (3072), M rows, K the summed dimension of a product, P panels of PANEL
         output columns.

Signatures: output first, then inputs, then sizes. Arrays are float32 with contiguous columns
unless a docstring says otherwise (model.py checks the weights once at its boundary, never inside
the loops). An output may be the same array as an input where the docstring says so (every
element is read before it is written).

Read the modules in this order:
  threads.py    the Numba options, the threads' work counter and barrier, their scratch memory
  rowwise.py    exp and GELU that vectorise; embeddings, LayerNorm and the head, row by row
  isa.py        every choice of instruction set: the fp32 tile's shape, the int8 and bf16 paths
  fp32.py       the fp32 product on packed panels, and its tile in LLVM IR
  attention.py  attention per sequence and head, an online softmax over blocks of keys
  int8.py       the int8 product: rows quantized as they are made, one tile per instruction set
  bf16.py       the product on bf16 weights, one tile per instruction set
  layers.py     a layer's steps after attention at every precision; whole layers in one region

Read next: model.py, which calls these in reference.py's order (int8_model.py and bf16_model.py
for the other precisions).
"""
