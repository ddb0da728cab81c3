"""Pure-PyTorch ops: the CPU path in both modes, and the oracle the GPU kernels are tested against.

`invariant` ops make a row's bits independent of its company. Measured on this CPU: row 0 of
`x[:m] @ W.T` changes with `m` for almost every `m`, because the BLAS library picks its blocking
and threading from the whole shape. Two shapes of call are invariant by construction:
- a call whose shape never changes: a float matmul runs in chunks of exactly `ROWS_PER_CALL`
  rows (the last zero-padded);
- a batched matmul, whose items all have one fixed shape: each item is computed alike whatever
  the batch count. Attention is built from those (`attention.attention_invariant`).
`fast` ops are plain torch calls over the whole batch: faster, not batch-invariant.

By concern: `rows` (matmul, norms, SiLU, log-softmax, RoPE: each row on its own), `attention`
(the paged KV cache and both attention paths, with their per-step plans), `noise` (the seeded
Gumbel noise and token sampling). Quantized matmuls: `kernels/quantized.py`.
"""

import torch


def as_dtype(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """x in `dtype`: x itself when it already is, as `x.to(dtype)` would return, without its call.

    A conversion to a tensor's own dtype still costs a dispatched op: about 1 us, and 2-3x that
    inside a CPU decode step, whose weight streaming leaves the caches cold between matmuls. A
    float32 decode step of the default model made about 200 of them."""
    return x if x.dtype == dtype else x.to(dtype)
