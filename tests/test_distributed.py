"""gather_negatives: per-rank losses over gathered goals, against the loss of the global batch."""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from crl_fast import ContrastiveLoss, contrastive_loss, reference_contrastive_loss
from crl_fast.distributed import gather_negatives
from tests.helpers import gloo_group, interpreted, relative_error
from tests.test_upstream_parity import LOG_10, open_clip_leaves, open_clip_siglip

WORLD, ROWS, DIM = 2, 5, 4
LEAVES = ("log_scale", "bias")
"""Keys of a case whose values (floats) become leaf tensors: a learned scale and bias."""
CASES = {
    "binary": {"loss": "binary"},
    "infonce-penalty": {"loss": "infonce", "energy": "norm", "logsumexp_penalty": 0.1},
    "dpo": {"loss": "dpo", "energy": "cosine"},
    "flatnce": {"loss": "flatnce", "energy": "l2"},
    "ipo": {"loss": "ipo"},
    "binary-sum": {"loss": "binary", "reduction": "sum"},
    "infonce-penalty-sum": {
        "loss": "infonce",
        "energy": "norm",
        "logsumexp_penalty": 0.1,
        "reduction": "sum",
    },
    "siglip": {  # the README's SigLIP, its sum divided by the rows in the test
        "loss": "binary",
        "energy": "cosine",
        "reduction": "sum",
        "log_scale": LOG_10,
        "bias": -10.0,
    },
}


def global_batch(rows: int = WORLD * ROWS) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(rows, DIM, generator=g), torch.randn(rows, DIM, generator=g)


EQUAL = (ROWS,) * WORLD
SPLITS = {"unequal": (ROWS, 2), "equal": EQUAL}
EXCHANGED = ["binary-sum", "infonce-penalty-sum", "binary"]
Job = tuple[str, str, tuple[int, ...], bool]
"""(case, backend, split, exchange): each rank's row count ``split``, exchanged or else passed
as ``rows_per_rank``."""


def _with_leaves(case: str, dtype: torch.dtype = torch.float32) -> dict:
    """The case's keyword arguments, its scale and bias as fresh leaves that require grad."""
    kw = dict(CASES[case])
    for key in LEAVES:
        if key in kw:
            kw[key] = torch.tensor(kw[key], dtype=dtype, requires_grad=True)
    return kw


def _jobs(interpreted: bool) -> list[Job]:
    """The jobs of the two tests below (the Triton backend's where its kernels run on CPU)."""
    backends = ["torch", "triton"] if interpreted else ["torch"]
    jobs = [(case, backend, EQUAL, False) for case in CASES for backend in backends]
    return jobs + [(case, "torch", split, True) for case in EXCHANGED for split in SPLITS.values()]


def _rank(rank: int, init_file: str, out_dir: str, jobs: list[Job]) -> None:
    """One rank's loss on its rows of the global batch, for each job in turn in one process
    group; a job that raises leaves its traceback and ends the rank."""
    with gloo_group(init_file, rank, WORLD):
        for i, (case, backend, split, exchange) in enumerate(jobs):
            try:
                start, end = sum(split[:rank]), sum(split[: rank + 1])
                phi, psi = (t[start:end].requires_grad_() for t in global_batch(sum(split)))
                negatives = gather_negatives(psi, rows_per_rank=None if exchange else split[rank])
                kw = _with_leaves(case)
                loss = contrastive_loss(phi, negatives, backend=backend, **kw)
                loss.backward()
                grads = [phi.grad, psi.grad, *(kw[key].grad for key in LEAVES if key in kw)]
                torch.save((loss.detach(), *grads), f"{out_dir}/{i}-{rank}.pt")
            except Exception:
                Path(out_dir, f"{i}-{rank}.err").write_text(traceback.format_exc())
                raise
            dist.barrier()


@pytest.fixture(scope="module")
def rank_results(tmp_path_factory) -> Callable[[Job], list[tuple[torch.Tensor, ...]]]:
    """Every job's (loss, dphi, dpsi, then dlog_scale and dbias where the case learns them) of
    each rank, from one spawn of the ranks: a spawn a job
    (two fresh processes importing torch each) took ~10 s, most of this file's time."""
    out = tmp_path_factory.mktemp("ranks")
    jobs = _jobs(interpreted())
    with contextlib.suppress(mp.ProcessRaisedException, mp.ProcessExitedException):
        mp.spawn(_rank, (str(out / "init"), str(out), jobs), nprocs=WORLD)  # a job's test fails

    def results(job: Job) -> list[tuple[torch.Tensor, ...]]:
        i = jobs.index(job)
        if errors := sorted(out.glob(f"{i}-*.err")):  # each rank's: one's error, the other's echo
            pytest.fail("\n".join(f"job-rank {e.stem}: {e.read_text()}" for e in errors))
        if not all((out / f"{i}-{rank}.pt").exists() for rank in range(WORLD)):
            pytest.fail(f"not run: an earlier job failed ({sorted(out.glob('*.err'))})")
        return [torch.load(out / f"{i}-{rank}.pt") for rank in range(WORLD)]

    return results


def _check_against_the_global_batch(results, case: str, split: tuple[int, ...]) -> None:
    """Each rank's loss is its rows' loss against its goals then the other ranks' (in rank
    order); summed over ranks, the losses and gradients (a learned scale's and bias's too) are
    the global batch's."""
    losses, dphi, dpsi, *dleaves = zip(*results, strict=True)
    phi, psi = (t.double().requires_grad_() for t in global_batch(sum(split)))
    kw = _with_leaves(case, torch.float64)
    for rank, loss in enumerate(losses):
        start, end = sum(split[:rank]), sum(split[: rank + 1])
        goals = torch.cat([psi[start:end], psi[:start], psi[end:]]).detach()
        want = reference_contrastive_loss(phi[start:end].detach(), goals, **kw)
        assert relative_error(loss, want) < 1e-5
    if len(set(split)) > 1 and kw.get("reduction") != "sum":
        return  # the ranks' means weigh rows unequally: no global loss to compare with
    factor = 1 if kw.get("reduction") == "sum" else WORLD
    truth = factor * reference_contrastive_loss(phi, psi, **kw)
    leaves = [kw[key] for key in LEAVES if key in kw]
    want_grads = torch.autograd.grad(truth, [phi, psi, *leaves])
    assert relative_error(sum(losses), truth) < 1e-5
    got_grads = [torch.cat(dphi), torch.cat(dpsi), *(sum(d) for d in dleaves)]
    for got, want in zip(got_grads, want_grads, strict=True):
        assert relative_error(got, want) < 1e-5


@pytest.mark.parametrize(
    "backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]
)
@pytest.mark.parametrize("case", CASES)
def test_ranks_add_up_to_the_global_batch(case, backend, rank_results):
    """Summed over ranks, the mean losses are world_size times the global batch's mean loss (the
    summed losses are its summed loss), and each rank's gradients are those of that sum."""
    results = rank_results((case, backend, EQUAL, False))
    _check_against_the_global_batch(results, case, EQUAL)


@pytest.mark.parametrize("split", SPLITS.values(), ids=SPLITS)
@pytest.mark.parametrize("case", EXCHANGED)
def test_ranks_exchanging_their_rows_add_up_to_the_global_batch(case, split, rank_results):
    """Without rows_per_rank, e.g. the last batch of an epoch, 5 rows on one rank and 2 on the
    other: each rank's loss is its rows' and the summed losses still add up to the global
    batch's, gradients included (before, gloo aborted one process and the other went on with
    rows it never received)."""
    results = rank_results((case, "torch", split, True))
    _check_against_the_global_batch(results, case, split)


@pytest.mark.parametrize(
    "backend", ["torch", pytest.param("triton", marks=pytest.mark.interpreter)]
)
def test_siglip_ranks_are_open_clips_gathered_siglip(backend, rank_results):
    """Each rank's SigLIP loss (its sum divided by its rows) is open_clip's ``SigLipLoss`` on
    that rank with the other ranks' texts gathered (``dist_impl="gather"``; its ``bidir`` and
    ``shift`` exchanges add the same blocks): the rank's own block with labels ``2 I - 1``, the
    others' ``negative_only``. Each rank's scale and bias gradients are open_clip's on that
    rank, and its towers' outputs get open_clip's gradient of the losses summed over ranks
    (what an autograd all-gather sends back; DDP then averages the ranks' parameter grads)."""
    results = rank_results(("siglip", backend, EQUAL, False))
    losses, dimg, dtxt, dscale, dbias = (torch.stack(r) / ROWS for r in zip(*results, strict=True))
    img, txt = (t.double().requires_grad_() for t in global_batch())
    blocks = txt.split(ROWS)
    total = 0.0
    for rank in range(WORLD):
        texts = torch.cat([blocks[rank], *(b for r, b in enumerate(blocks) if r != rank)])
        scale, bias = open_clip_leaves()
        up = open_clip_siglip(img.split(ROWS)[rank], texts, scale, bias)
        want = (up, *torch.autograd.grad(up, (scale, bias), retain_graph=True))
        for got, w in zip((losses[rank], dscale[rank], dbias[rank]), want, strict=True):
            assert relative_error(got, w) < 1e-5
        total = total + up
    for got, w in zip((dimg, dtxt), torch.autograd.grad(total, (img, txt)), strict=True):
        assert relative_error(got.flatten(0, 1), w) < 1e-5


MISMATCHES = {  # rank 1's psi, then each rank's error
    "width and dtype": (
        torch.randn(3, DIM + 1, dtype=torch.float64),
        [
            "psi must have the same width and dtype on every rank, got rank 0: 4 columns, "
            "torch.float32, rank 1: 5 columns, torch.float64"
        ]
        * WORLD,
    ),
    "integer": (
        torch.ones(3, DIM, dtype=torch.int64),
        [
            "psi is not a 2-D floating-point tensor on rank(s) [1]",
            "psi must be a floating-point tensor",
        ],
    ),
    "1-D": (
        torch.randn(3),
        [
            "psi is not a 2-D floating-point tensor on rank(s) [1]",
            "psi must be a 2-D tensor (rows, features), got (3,)",
        ],
    ),
    "empty": (torch.randn(0, DIM), ["psi has no rows on rank(s) [1]"] * WORLD),
}


def _mismatched_rank(rank: int, init_file: str, out_dir: str, case: str) -> None:
    with gloo_group(init_file, rank, WORLD):
        psi = MISMATCHES[case][0] if rank else torch.randn(3, DIM)
        try:
            gather_negatives(psi)
        except (TypeError, ValueError) as error:
            Path(out_dir, f"{rank}.txt").write_text(str(error))


@pytest.mark.parametrize("case", MISMATCHES)
def test_a_rank_with_other_goals_makes_every_rank_raise(case, tmp_path):
    """Every rank raises, naming the problem, where the gather would crash or wait forever (or,
    for a rank without rows, its loss would raise and the others wait in backward)."""
    mp.spawn(_mismatched_rank, (str(tmp_path / "init"), str(tmp_path), case), nprocs=WORLD)
    for rank, want in enumerate(MISMATCHES[case][1]):
        assert (tmp_path / f"{rank}.txt").read_text().startswith(want)


@pytest.fixture
def one_process_group(tmp_path):
    with gloo_group(tmp_path / "init"):
        yield


@pytest.mark.usefixtures("one_process_group")
def test_rows_per_rank_is_checked_here_and_skips_the_exchange(monkeypatch):
    psi = torch.randn(4, DIM)
    with pytest.raises(ValueError, match="rows_per_rank is 3, but psi has 4 rows here"):
        gather_negatives(psi, rows_per_rank=3)
    with pytest.raises(ValueError, match="rows_per_rank must be a positive int"):
        gather_negatives(psi, rows_per_rank=4.0)
    exchanged = []
    gather = dist.all_gather
    monkeypatch.setattr(dist, "all_gather", lambda *a, **k: exchanged.append(a) or gather(*a, **k))
    torch.testing.assert_close(gather_negatives(psi, rows_per_rank=4), psi)
    assert len(exchanged) == 1  # the rows only
    torch.testing.assert_close(gather_negatives(psi), psi)
    assert len(exchanged) == 3  # the shapes, then the rows


@pytest.mark.usefixtures("one_process_group")
def test_psi_must_be_floating_point():
    with pytest.raises(TypeError, match="psi must be a floating-point tensor"):
        gather_negatives(torch.ones(4, DIM, dtype=torch.int64), rows_per_rank=4)
    with pytest.raises(TypeError, match="psi must be a tensor, got list"):
        gather_negatives([[1.0]])


@pytest.mark.usefixtures("one_process_group", "fresh_dynamo")
def test_compiled_whole_only_with_rows_per_rank():
    """rows_per_rank keeps the call free of host reads, so it compiles into one graph; the
    exchange cannot, and says what to pass."""
    psi = torch.randn(4, DIM)
    compiled = torch.compile(lambda p: gather_negatives(p, rows_per_rank=4), fullgraph=True)
    torch.testing.assert_close(compiled(psi), psi)
    with pytest.raises(Exception, match="pass rows_per_rank"):
        torch.compile(gather_negatives, fullgraph=True)(psi)


def test_needs_a_process_group():
    with pytest.raises(RuntimeError, match="process group"):
        gather_negatives(torch.randn(3, 2))


@pytest.mark.usefixtures("one_process_group")
def test_a_learned_scale_and_bias_can_be_sharded_after_deferred_initialisation():
    """FSDP (fully_shard) takes the module built on meta, then to_empty and reset_parameters
    give its init values; FSDP refuses 0-d parameters, and the scale and bias were 0-d."""
    from torch.distributed.fsdp import fully_shard

    kw = {"learn_scale": True, "init_log_scale": 2.3, "learn_bias": True, "init_bias": -10.0}
    with torch.device("meta"):
        sharded = ContrastiveLoss("binary", **kw)
    fully_shard(sharded)
    sharded.to_empty(device="cpu").reset_parameters()
    phi, psi = global_batch()
    sharded(phi, psi).backward()
    plain = ContrastiveLoss("binary", **kw)
    plain(phi, psi).backward()
    for got, want in zip(sharded.parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(got.full_tensor(), want.detach())
        torch.testing.assert_close(got.grad.full_tensor(), want.grad)
