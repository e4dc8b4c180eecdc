"""The one place where backend-specific code paths are chosen: `RetNetConfig.kernels`.

- "plain": ordinary JAX everywhere (einsums, autodiff). Differentiable in every mode (`jax.jvp`,
  Hessian-vector products), and what XLA's GPU and TPU compilers are tuned for.
- "xla_cpu": the same functions with hand-written backward passes (`jax.custom_vjp`) that keep fewer
  residuals and write products in the layout their consumers read, `optimization_barrier`
  orderings that stop XLA:CPU from running two matmuls on the same two cores at once, and chunkwise
  retention in groups of `GROUP_TOKENS` tokens so one group's scores stay in cache. Reverse mode
  only. Measured on XLA:CPU in experiments/PERFORMANCE.md.
- "auto": "xla_cpu" when the default backend is the CPU, else "plain"; decided once, when a model
  is built (`resolve_kernels`), never inside traced code.

The pure ops take the resolved value (`kernels="plain"` by default).
"""

from __future__ import annotations

import typing
from typing import Literal

import jax

KernelChoice = Literal["auto", "xla_cpu", "plain"]
Kernels = Literal["xla_cpu", "plain"]
KERNEL_CHOICES: tuple[str, ...] = typing.get_args(KernelChoice)
RESOLVED_KERNELS: tuple[str, ...] = typing.get_args(Kernels)

# "xla_cpu" chunkwise retention: chunks are processed in groups of about this many tokens, all
# chunks of a group at once, the groups one after another (the group's scores stay in cache).
GROUP_TOKENS = 2048


def resolve_kernels(choice: str) -> Kernels:
    """"auto" -> "xla_cpu" on the CPU backend, "plain" elsewhere; the others unchanged."""
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {choice!r}")
    if choice == "auto":
        return "xla_cpu" if jax.default_backend() == "cpu" else "plain"
    return choice  # type: ignore[return-value]


def check_kernels(kernels: str) -> Kernels:
    """A resolved choice, as the pure ops take it."""
    if kernels not in RESOLVED_KERNELS:
        raise ValueError(f"kernels must be one of {RESOLVED_KERNELS} (resolve 'auto' with "
                         f"resolve_kernels first), got {kernels!r}")
    return kernels  # type: ignore[return-value]
