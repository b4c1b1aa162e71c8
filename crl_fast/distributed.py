"""Contrastive losses over the batches of several processes (SigLIP's multi-device training).

Each process scores its own rows of phi against the goals of every process:
``contrastive_loss(phi, gather_negatives(psi))``. Nothing B x B is gathered, only psi.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from crl_fast.checks import positive_int

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
"""The dtypes ranks compare by index when they exchange shapes (others are refused first)."""


def gather_negatives(
    psi: torch.Tensor, group: ProcessGroup | None = None, *, rows_per_rank: int | None = None
) -> torch.Tensor:
    """This process's ``psi`` followed by the ``psi`` of every other rank of ``group``, in rank
    order. Row i is still the positive of this process's row i of phi, and the goals of the
    other processes are extra negatives.

    Ranks may hold different numbers of rows (the last, partial batch of an epoch): first they
    exchange their row counts, widths and dtypes (a small ``all_gather`` read on the host, so the
    call waits for the device), and every rank raises a ValueError if a rank's ``psi`` is not a
    2-D floating-point tensor, has no rows, or widths or dtypes differ. ``rows_per_rank=N``, the
    same N on every rank, says that every rank holds N rows: each checks only its own ``psi`` and
    the exchange is skipped, so the call does not synchronise and can be compiled with
    ``fullgraph=True`` or captured in a CUDA graph (capture untested: it needs several GPUs).
    A rank whose ``psi`` is wrong there raises; the others then wait for it in the gather, as
    for any collective a rank skips. Nothing compares the ranks then: a different N, width or
    dtype on one rank passes that rank's check, and the gather aborts a process or reads one
    rank's bytes as another's shape.

    Gradients flow back to the rank that owns each row: ``all_gather``'s backward sums them over
    ranks. So each rank's gradients are those of the sum over ranks of the per-rank losses.
    Summed over ranks, the row losses are the loss of the global batch: binary, infonce, flatnce,
    dpo and ipo, with or without the logsumexp penalty. With ``reduction="sum"`` the sum is that
    loss; with ``"none"`` each rank's rows are the global batch's row losses of its rows. With
    ``reduction="mean"`` and equal rows it is world_size times that loss, so under DDP, which
    averages gradients over ranks, the parameters get exactly the global batch's gradient (with
    unequal rows each rank's mean weighs its rows by 1 / its count). The column
    losses (``*_backward``, ``symmetric_infonce``) do not decompose this way: their columns span
    every rank's phi.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("gather_negatives needs an initialised torch.distributed process group")
    if not isinstance(psi, torch.Tensor):
        raise TypeError(f"psi must be a tensor, got {type(psi).__name__}")
    if rows_per_rank is None:
        if torch.compiler.is_compiling() or _capturing(psi):
            raise RuntimeError(
                "gather_negatives exchanges the ranks' row counts on the host, which compiled "
                "graphs and CUDA graph capture cannot do: pass rows_per_rank"
            )
        rows = _rows_of_every_rank(psi, group)
    else:
        _check(psi)
        if psi.shape[0] != positive_int("rows_per_rank", rows_per_rank):
            raise ValueError(
                f"rows_per_rank is {rows_per_rank}, but psi has {psi.shape[0]} rows here"
            )
        rows = (rows_per_rank,) * dist.get_world_size(group)
    rank = dist.get_rank(group)
    start, end = sum(rows[:rank]), sum(rows[: rank + 1])
    everyone = _AllGatherRows.apply(psi, group, rows)  # every rank's rows, in rank order
    return torch.cat([psi, everyone[:start], everyone[end:]])


def _check(psi: torch.Tensor) -> None:
    """A ValueError or TypeError unless ``psi`` is a 2-D floating-point tensor."""
    if psi.ndim != 2:
        raise ValueError(f"psi must be a 2-D tensor (rows, features), got {tuple(psi.shape)}")
    if psi.dtype not in _DTYPES:
        raise TypeError(f"psi must be a floating-point tensor {_DTYPES}, got {psi.dtype}")


def _capturing(psi: torch.Tensor) -> bool:
    return psi.is_cuda and torch.cuda.is_current_stream_capturing()


def _rows_of_every_rank(psi: torch.Tensor, group: ProcessGroup | None) -> tuple[int, ...]:
    """Every rank's row count, after checking every rank's ``psi`` (each rank sees every
    rank's shape and dtype, so all raise, instead of the gather crashing or waiting forever)."""
    import torch.distributed as dist

    valid = psi.ndim == 2 and psi.dtype in _DTYPES
    shape = [*psi.shape, _DTYPES.index(psi.dtype)] if valid else [-1, -1, -1]
    mine = torch.tensor(shape, device=psi.device)
    shapes = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shapes, mine, group=group)
    gathered = [s.tolist() for s in shapes]  # [rows, width, dtype] of each rank, -1s: invalid
    if not valid:
        _check(psi)  # this rank's own reason
    ranks = [r if group is None else dist.get_global_rank(group, r) for r in range(len(shapes))]
    bad = [rank for rank, (n, _, _) in zip(ranks, gathered, strict=True) if n < 0]
    if bad:
        raise ValueError(f"psi is not a 2-D floating-point tensor on rank(s) {bad}")
    if len({(width, dtype) for _, width, dtype in gathered}) > 1:
        each = ", ".join(
            f"rank {rank}: {width} columns, {_DTYPES[dtype]}"
            for rank, (_, width, dtype) in zip(ranks, gathered, strict=True)
        )
        raise ValueError(f"psi must have the same width and dtype on every rank, got {each}")
    empty = [rank for rank, (n, _, _) in zip(ranks, gathered, strict=True) if n == 0]
    if empty:  # its loss would refuse the empty batch, leaving the others waiting in backward
        raise ValueError(
            f"psi has no rows on rank(s) {empty}: contrastive_loss refuses an empty batch, so "
            "give every rank at least one row"
        )
    return tuple(rows for rows, _, _ in gathered)


class _AllGatherRows(torch.autograd.Function):
    """``all_gather`` of row blocks of the given sizes (padded to the largest, as collectives
    need equal sizes); backward sums each block's gradient over the ranks (one ``all_reduce``:
    every backend has it, and psi is small) and returns this rank's block."""

    @staticmethod
    def forward(
        ctx: Any, psi: torch.Tensor, group: ProcessGroup | None, rows: Sequence[int]
    ) -> torch.Tensor:
        import torch.distributed as dist

        ctx.group, ctx.rank, ctx.rows = group, dist.get_rank(group), rows
        padded = psi.contiguous()
        if psi.shape[0] < max(rows):
            padded = torch.cat([padded, psi.new_zeros(max(rows) - psi.shape[0], psi.shape[1])])
        parts = [torch.empty_like(padded) for _ in rows]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([part[:n] for part, n in zip(parts, rows, strict=True)])

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        start = sum(ctx.rows[: ctx.rank])
        return grad[start : start + ctx.rows[ctx.rank]], None, None
