"""gather_negatives: per-rank losses over gathered goals, against the loss of the global batch."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from crl_fast import contrastive_loss, reference_contrastive_loss
from crl_fast.distributed import gather_negatives
from tests.helpers import max_error

WORLD, ROWS, DIM = 2, 5, 4
CASES = {
    "binary": {"loss": "binary"},
    "infonce-penalty": {"loss": "infonce", "energy": "norm", "logsumexp_penalty": 0.1},
    "dpo": {"loss": "dpo", "energy": "cosine"},
    "flatnce": {"loss": "flatnce", "energy": "l2"},
    "ipo": {"loss": "ipo"},
    "binary-sum": {"loss": "binary", "reduction": "sum"},
}


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(WORLD * ROWS, DIM, generator=g), torch.randn(WORLD * ROWS, DIM, generator=g)


def _rank(rank: int, init_file: str, out_dir: str, case: str, backend: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        phi, psi = (t[rank * ROWS : (rank + 1) * ROWS].requires_grad_() for t in global_batch())
        loss = contrastive_loss(phi, gather_negatives(psi), backend=backend, **CASES[case])
        loss.backward()
        torch.save((loss.detach(), phi.grad, psi.grad), f"{out_dir}/{rank}.pt")
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("case", CASES)
def test_ranks_add_up_to_the_global_batch(case, backend, tmp_path):
    """Summed over ranks, the mean losses are world_size times the global batch's mean loss (the
    summed losses are its summed loss), and each rank's gradients are those of that sum."""
    mp.spawn(_rank, (str(tmp_path / "init"), str(tmp_path), case, backend), nprocs=WORLD)
    losses, dphi, dpsi = zip(*(torch.load(tmp_path / f"{r}.pt") for r in range(WORLD)), strict=True)
    phi, psi = (t.double().requires_grad_() for t in global_batch())
    factor = 1 if CASES[case].get("reduction") == "sum" else WORLD
    truth = factor * reference_contrastive_loss(phi, psi, **CASES[case])
    truth.backward()
    assert max_error(sum(losses), truth) < 1e-5 * max(1.0, truth.abs().item())
    for got, want in ((torch.cat(dphi), phi.grad), (torch.cat(dpsi), psi.grad)):
        assert max_error(got, want) < 1e-5 * max(1.0, want.abs().max().item())


def test_needs_a_process_group():
    with pytest.raises(RuntimeError, match="process group"):
        gather_negatives(torch.randn(3, 2))
