"""The parallel form inside one block: `P = (q k^T) * D` (future set to 0), `P v` and `P`'s row sums.

Shared by `parallel_retention` (one block: the whole sequence) and `chunkwise_retention` (every
chunk at once). The backward pass reads the `P` stored by the forward pass (recomputing it was
measured and not kept: experiments/PERFORMANCE.md).
"""

from __future__ import annotations

import jax

from retnet_jax.ops.decay import apply_causal_decay
from retnet_jax.ops.matmul import matmul_nn, matmul_nt


def causal_block(q_ik: jax.Array, k_jk: jax.Array, v_jv: jax.Array, decay_mask_ij: jax.Array, acc,
                 *, kernels: str) -> tuple[jax.Array, jax.Array]:
    """`(P v, P.sum(-1))` with `P = where(causal, (q k^T) * D, 0)`, all over shared leading axes.

    q `[..., i, dk]`, k `[..., j, dk]`, v `[..., j, dv]` (i = j: one block), `decay_mask` broadcasting
    to `[..., i, j]`. Scores and sums in `acc`; `P` is cast to v's dtype for the product, accumulated
    in `acc`. Returns `[..., i, dv]` and `[..., i]`, both in `acc`.
    """
    scores_ij = apply_causal_decay(matmul_nt(q_ik, k_jk, acc, kernels=kernels), decay_mask_ij,
                                   kernels=kernels)
    return matmul_nn(scores_ij.astype(v_jv.dtype), v_jv, acc, kernels=kernels), scores_ij.sum(-1)
