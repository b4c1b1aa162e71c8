"""Contrastive losses over the batches of several processes (SigLIP's multi-device training).

Each process scores its own rows of phi against the goals of every process:
``contrastive_loss(phi, gather_negatives(psi))``. Nothing B x B is gathered, only psi.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from crl_fast.checks import positive_int

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
"""The dtypes ranks compare by index when they exchange shapes (others are refused first)."""


def gather_negatives(
    psi: torch.Tensor, group: object | None = None, *, rows_per_rank: int | None = None
) -> torch.Tensor:
    """This process's ``psi`` followed by the ``psi`` of every other rank of ``group``, in rank
    order. Row i is still the positive of this process's row i of phi, and the goals of the
    other processes are extra negatives.

    Ranks may hold different numbers of rows (the last, partial batch of an epoch): first they
    exchange their row counts, widths and dtypes (a small ``all_gather`` read on the host, so the
    call waits for the device), and every rank raises the same ValueError if widths or dtypes
    differ. ``rows_per_rank=N`` says that every rank holds N rows: each checks its own count and
    the exchange is skipped, so the call can be captured in a CUDA graph. A rank whose count is
    wrong raises; the others then wait for it in the gather, as for any collective a rank skips.

    Gradients flow back to the rank that owns each row: ``all_gather``'s backward sums them over
    ranks. So each rank's gradients are those of the sum over ranks of the per-rank losses.
    Summed over ranks, the row losses are the loss of the global batch: binary, infonce, flatnce,
    dpo and ipo, with or without the logsumexp penalty. With ``reduction="sum"`` the sum is that
    loss. With ``reduction="mean"`` and equal rows it is world_size times that loss, so under
    DDP, which averages gradients over ranks, the parameters get exactly the global batch's
    gradient (with unequal rows each rank's mean weighs its rows by 1 / its count). The column
    losses (``*_backward``, ``symmetric_infonce``) do not decompose this way: their columns span
    every rank's phi.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("gather_negatives needs an initialised torch.distributed process group")
    if not isinstance(psi, torch.Tensor) or psi.ndim != 2:
        shape = tuple(psi.shape) if isinstance(psi, torch.Tensor) else type(psi).__name__
        raise ValueError(f"psi must be a 2-D tensor (rows, features), got {shape}")
    if psi.dtype not in _DTYPES:
        raise TypeError(f"psi must be a floating-point tensor {_DTYPES}, got {psi.dtype}")
    world = dist.get_world_size(group)
    if rows_per_rank is None:
        rows = _rows_of_every_rank(psi, group)
    elif psi.shape[0] != positive_int("rows_per_rank", rows_per_rank):
        raise ValueError(f"rows_per_rank is {rows_per_rank}, but psi has {psi.shape[0]} rows here")
    else:
        rows = (rows_per_rank,) * world
    rank = dist.get_rank(group)
    start, end = sum(rows[:rank]), sum(rows[: rank + 1])
    everyone = _AllGatherRows.apply(psi, group, rows)  # every rank's rows, in rank order
    return torch.cat([psi, everyone[:start], everyone[end:]])


def _rows_of_every_rank(psi: torch.Tensor, group: object | None) -> tuple[int, ...]:
    """Every rank's row count, after checking that all ranks' psi have this one's width and
    dtype (each rank sees every rank's, so all raise alike instead of crashing the gather)."""
    import torch.distributed as dist

    mine = torch.tensor([psi.shape[0], psi.shape[1], _DTYPES.index(psi.dtype)], device=psi.device)
    shapes = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(shapes, mine, group=group)
    gathered = [s.tolist() for s in shapes]  # [rows, width, dtype] of each rank
    if len({(width, dtype) for _, width, dtype in gathered}) > 1:
        ranks = ", ".join(
            f"rank {r}: {width} columns, {_DTYPES[dtype]}"
            for r, (_, width, dtype) in enumerate(gathered)
        )
        raise ValueError(f"psi must have the same width and dtype on every rank, got {ranks}")
    return tuple(rows for rows, _, _ in gathered)


class _AllGatherRows(torch.autograd.Function):
    """``all_gather`` of row blocks of the given sizes (padded to the largest, as collectives
    need equal sizes); backward sums each block's gradient over the ranks (one ``all_reduce``:
    every backend has it, and psi is small) and returns this rank's block."""

    @staticmethod
    def forward(ctx, psi: torch.Tensor, group: object | None, rows: Sequence[int]) -> torch.Tensor:
        import torch.distributed as dist

        ctx.group, ctx.rank, ctx.rows = group, dist.get_rank(group), rows
        padded = psi.contiguous()
        if psi.shape[0] < max(rows):
            padded = torch.cat([padded, psi.new_zeros(max(rows) - psi.shape[0], psi.shape[1])])
        parts = [torch.empty_like(padded) for _ in rows]
        dist.all_gather(parts, padded, group=group)
        return torch.cat([part[:n] for part, n in zip(parts, rows, strict=True)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        start = sum(ctx.rows[: ctx.rank])
        return grad[start : start + ctx.rows[ctx.rank]], None, None
