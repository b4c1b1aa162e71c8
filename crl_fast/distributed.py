"""Contrastive losses over the batches of several processes (SigLIP's multi-device training).

Each process scores its own rows of phi against the goals of every process:
``contrastive_loss(phi, gather_negatives(psi))``. Nothing B x B is gathered, only psi.
"""

from __future__ import annotations

import torch


def gather_negatives(psi: torch.Tensor, group: object | None = None) -> torch.Tensor:
    """This process's ``psi`` followed by the ``psi`` of every other rank of ``group``, in rank
    order. Row i is still the positive of this process's row i of phi, and the goals of the
    other processes are extra negatives. Every rank must call it with the same shape.

    Gradients flow back to the rank that owns each row: ``all_gather``'s backward sums them over
    ranks. So each rank's gradients are those of the sum over ranks of the per-rank losses.
    Summed over ranks, the row losses are the loss of the global batch: binary, infonce, flatnce,
    dpo and ipo, with or without the logsumexp penalty. With ``reduction="sum"`` the sum is that
    loss. With ``reduction="mean"`` it is world_size times that loss, so under DDP, which
    averages gradients over ranks, the parameters get exactly the global batch's gradient. The
    column losses (``*_backward``, ``symmetric_infonce``) do not decompose this way: their
    columns span every rank's phi.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("gather_negatives needs an initialised torch.distributed process group")
    if not isinstance(psi, torch.Tensor) or psi.ndim != 2:
        shape = tuple(psi.shape) if isinstance(psi, torch.Tensor) else type(psi).__name__
        raise ValueError(f"psi must be a 2-D tensor (rows, features), got {shape}")
    rank, rows = dist.get_rank(group), psi.shape[0]
    everyone = _AllGatherRows.apply(psi, group)  # every rank's rows, in rank order
    return torch.cat([psi, everyone[: rank * rows], everyone[(rank + 1) * rows :]])


class _AllGatherRows(torch.autograd.Function):
    """``all_gather`` of row blocks; backward sums each block's gradient over the ranks (one
    ``all_reduce``: every backend has it, and psi is small) and returns this rank's block."""

    @staticmethod
    def forward(ctx, psi: torch.Tensor, group: object | None) -> torch.Tensor:
        import torch.distributed as dist

        ctx.group, ctx.rank = group, dist.get_rank(group)
        parts = [torch.empty_like(psi) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, psi.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad.chunk(dist.get_world_size(ctx.group))[ctx.rank], None
