"""README.md's examples, run: its ```python blocks (on CPU, through the substitutions listed here)
and the ``crl-fast`` command lines of its Training section (through the real argument parser), so
a renamed function, a changed signature or a wrong keyword or flag in the README fails here.

Blocks are read from README.md at test time and found by a marker in their text; a substitution
that matches nothing fails, so an edited example asks for this file to be updated, not ignored.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import crl_fast.envs
from crl_fast import ContrastiveLoss, contrastive_loss, reference_contrastive_loss
from crl_fast.cli import build_parser, train_config
from tests.helpers import gloo_group

README = Path(__file__).parent.parent / "README.md"

# One marker per ```python block of the README: each must be in exactly one block.
LOSS = "loss = contrastive_loss(phi, psi)"
ENCODERS = "sa_encoder("
DISTRIBUTED = "gather_negatives(psi)"
DISTRIBUTED_CLIP = "gather_negatives(img)"
CUDA_GRAPH = "torch.cuda.CUDAGraph()"
BUFFER = "capacity=1000,  # steps kept per env"
ENVS = 'make_env("point_umaze", num_envs=4096'
OWN_ENV = "class FreePoint("
TRAIN = "train("
OWN_LOOP = "from crl_fast.train import evaluate"
OFFLINE = "TrajectoryBuffer.from_dataset("
MARKERS = (LOSS, ENCODERS, DISTRIBUTED, DISTRIBUTED_CLIP, CUDA_GRAPH, BUFFER, ENVS, OWN_ENV)
MARKERS += (TRAIN, OWN_LOOP, OFFLINE)

# CPU-sized versions of the examples: {README text: what runs instead}. The loss keeps bfloat16:
# the CPU's chunked path takes it.
LOSS_ON_CPU = {'device="cuda"': 'device="cpu"', "65536": "256", ".cuda()": ""}
BUFFER_ENVS = 8
# Two updates on the CPU.
OFFLINE_ON_CPU = {'device="cuda"': 'device="cpu"', "range(100_000)": "range(2)"}
BUFFER_ON_CPU = {'device="cuda"': 'device="cpu"', "num_envs=1024": f"num_envs={BUFFER_ENVS}"}
ENV_COUNT = 64
ENVS_ON_CPU = {'device="cuda"': 'device="cpu"', "num_envs=4096": f"num_envs={ENV_COUNT}"}
# 188 collection steps of the 64 default envs, 128 updates after the default 10,000-step warm-up
# (about 2 s); device="cpu" also on a CUDA machine, where "auto" would compile the update.
TRAIN_ON_CPU = {"total_env_steps=200_000": 'total_env_steps=12_032, device="cpu"'}
# 188 steps of 64 envs: 156 of random actions, then 32 of the actor's with 128 updates (about 3 s).
OWN_LOOP_ON_CPU = {"50_000": "12_032"}


@dataclass
class Block:
    """A fenced code block of README.md: its text and the README line of its first line."""

    code: str
    line: int


def readme_blocks(language: str, text: str | None = None) -> list[Block]:
    """Every ```language block of ``text`` (default: README.md), in order."""
    text = README.read_text() if text is None else text
    pattern = rf"^```{language}\n(.*?)^```"
    return [
        Block(m.group(1), text.count("\n", 0, m.start(1)) + 1)
        for m in re.finditer(pattern, text, flags=re.MULTILINE | re.DOTALL)
    ]


def readme_block(marker: str, language: str = "python", text: str | None = None) -> Block:
    """The one ```language block of the README whose text contains ``marker``."""
    found = [b for b in readme_blocks(language, text) if marker in b.code]
    assert len(found) == 1, (
        f"README.md should have exactly one ```{language} block containing {marker!r}, found "
        f"{len(found)} (lines {[b.line for b in found]}): update tests/test_readme.py to the README"
    )
    return found[0]


def substituted(block: Block, substitutions: dict[str, str]) -> str:
    """``block``'s code with each substitution made; one that matches nothing fails."""
    code = block.code
    for old, new in substitutions.items():
        assert old in code, (
            f"substitution {old!r} -> {new!r} matches nothing in the README block at line "
            f"{block.line}: update tests/test_readme.py to the README"
        )
        code = code.replace(old, new)
    return code


def run_block(
    marker: str, substitutions: dict[str, str] | None = None, **names: Any
) -> dict[str, Any]:
    """Run the README block with ``marker`` (after ``substitutions``) in a namespace holding
    ``names``, the names it uses from the text around it; returns the namespace. Tracebacks
    name README.md and the block's line there."""
    block = readme_block(marker)
    code = "\n" * (block.line - 1) + substituted(block, substitutions or {})
    namespace = {"__name__": "readme_example", **names}
    exec(compile(code, str(README), "exec"), namespace)
    return namespace


def embeddings(rows: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``phi`` and ``psi`` for the fragments that take them from an earlier block."""
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(rows, dim, generator=g, requires_grad=True) for _ in range(2))


def test_every_python_block_has_a_test():
    """Each ```python block holds exactly one marker, so a new or renamed example is noticed."""
    blocks = readme_blocks("python")
    assert blocks, "README.md has no ```python blocks: is the fence syntax still ```python?"
    for block in blocks:
        held = [m for m in MARKERS if m in block.code]
        assert len(held) == 1, (
            f"README.md's ```python block at line {block.line} holds markers {held}: give it "
            "exactly one (add a test for a new example to tests/test_readme.py)"
        )


def test_fused_loss_example():
    """The loss block at CPU size: every call, the SigLIP module and backward."""
    ns = run_block(LOSS, LOSS_ON_CPU)
    assert ns["phi"].dtype == torch.bfloat16 and ns["phi"].grad is not None
    assert set(ns["metrics"]) >= {"categorical_accuracy", "binary_accuracy"}
    assert ns["loss"].ndim == 0 and torch.isfinite(ns["loss"])


def test_own_encoders_example():
    """The fragment with encoders of one's own, on a batch shaped like the point U-maze's."""
    rows, obs_dim, action_dim, goal_dim, repr_dim = 256, 4, 2, 2, 64
    g = torch.Generator().manual_seed(0)
    ns = run_block(
        ENCODERS,
        torch=torch,
        contrastive_loss=contrastive_loss,
        sa_encoder=torch.nn.Linear(obs_dim + action_dim, repr_dim),
        goal_encoder=torch.nn.Linear(goal_dim, repr_dim),
        obs=torch.randn(rows, obs_dim, generator=g),
        action=torch.rand(rows, action_dim, generator=g) * 2 - 1,
        goal=torch.randn(rows, goal_dim, generator=g),
    )
    assert ns["phi"].shape == ns["psi"].shape == (rows, repr_dim)
    assert torch.isfinite(ns["loss"]) and "categorical_accuracy" in ns["metrics"]


def test_gather_negatives_example(tmp_path):
    """The multi-process fragment in a one-process gloo group, where psi gathers to itself."""
    assert not dist.is_initialized(), "a process group is left over from another test"
    with gloo_group(tmp_path / "store"):
        phi, psi = embeddings(8, 4)
        ns = run_block(DISTRIBUTED, contrastive_loss=contrastive_loss, phi=phi, psi=psi)
        ns["loss"].backward()
    torch.testing.assert_close(ns["loss"], contrastive_loss(phi, psi))
    assert phi.grad is not None and psi.grad is not None


CLIP_RANKS, CLIP_ROWS = 2, 6


def _clip_rank(rank: int, init_file: str, out_dir: str) -> None:
    """One rank of the distributed CLIP example, on its rows of ``embeddings``' global batch."""
    from crl_fast.distributed import gather_negatives

    with gloo_group(init_file, rank, CLIP_RANKS):
        rows = slice(rank * CLIP_ROWS, (rank + 1) * CLIP_ROWS)
        img, txt = (
            t[rows].detach().requires_grad_() for t in embeddings(CLIP_RANKS * CLIP_ROWS, 8)
        )
        ns = run_block(
            DISTRIBUTED_CLIP, ContrastiveLoss=ContrastiveLoss, gather_negatives=gather_negatives,
            img=img, txt=txt,
        )  # fmt: skip
        ns["loss"].backward()
        grads = (img.grad, txt.grad, ns["clip"].log_scale.grad)
        torch.save((ns["loss"].detach(), *grads), f"{out_dir}/{rank}.pt")
        dist.barrier()


def test_distributed_clip_example(tmp_path):
    """The CLIP example on 2 gloo processes: summed over ranks, its losses and gradients are
    world size times those of CLIP's loss (half of symmetric_infonce) on the global batch."""
    mp.spawn(_clip_rank, (str(tmp_path / "init"), str(tmp_path)), nprocs=CLIP_RANKS)
    losses, d_img, d_txt, d_scale = zip(
        *(torch.load(tmp_path / f"{r}.pt") for r in range(CLIP_RANKS)), strict=True
    )
    img, txt = (t.detach().double().requires_grad_() for t in embeddings(CLIP_RANKS * CLIP_ROWS, 8))
    log_scale = torch.tensor([2.6593], dtype=torch.float64, requires_grad=True)  # as the module
    truth = (
        CLIP_RANKS
        * reference_contrastive_loss(
            img, txt, loss="symmetric_infonce", energy="cosine", log_scale=log_scale
        )
        / 2
    )
    truth.backward()
    got = (sum(losses), torch.cat(d_img), torch.cat(d_txt), sum(d_scale))
    for name, a, want in zip(
        ("loss", "img", "txt", "log_scale"),
        got,
        (truth, img.grad, txt.grad, log_scale.grad),
        strict=True,
    ):
        torch.testing.assert_close(a.double(), want.detach(), rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.gpu
def test_cuda_graph_example():
    """The CUDA-graph block as written, then one step of the replay its comment describes."""
    ns = run_block(CUDA_GRAPH, torch=torch, contrastive_loss=contrastive_loss)
    phi, psi, graph = ns["static_phi"], ns["static_psi"], ns["graph"]
    new_phi, new_psi = torch.randn_like(phi), torch.randn_like(psi)
    phi.data.copy_(new_phi)
    psi.data.copy_(new_psi)
    graph.replay()
    torch.cuda.synchronize()
    want = contrastive_loss(new_phi, new_psi)
    torch.testing.assert_close(ns["static_loss"], want, rtol=1e-4, atol=1e-4)
    assert torch.isfinite(phi.grad).all() and torch.isfinite(psi.grad).all()


@pytest.mark.gpu
def test_fused_loss_example_as_written():
    """The loss block unchanged: B = 65,536 bfloat16 rows on the GPU."""
    ns = run_block(LOSS)
    assert torch.isfinite(ns["loss"]) and ns["phi"].grad is not None


def test_buffer_example():
    """The buffer block on CPU, extended with 50 steps of episodes that end every 20 steps."""
    steps, n = 50, BUFFER_ENVS
    g = torch.Generator().manual_seed(0)
    ends = torch.arange(steps)[:, None].expand(steps, n) % 20 == 19
    ns = run_block(
        BUFFER,
        BUFFER_ON_CPU,
        obs=torch.randn(steps, n, 4, generator=g),
        act=torch.rand(steps, n, 2, generator=g) * 2 - 1,
        next_ag=torch.randn(steps, n, 2, generator=g),
        term=torch.zeros(steps, n, dtype=torch.bool),
        trunc=ends.clone(),
    )
    batch = ns["batch"]
    assert batch.observation.shape == (256, 4) and batch.action.shape == (256, 2)
    assert batch.goal.shape == (256, 2)


def test_offline_example():
    """The dataset block on an OGBench-shaped dataset (float32 arrays, float terminals, x, y
    leading each observation and telling its episode): goals stay in their episodes."""
    lengths = [30, 7, 51, 12]
    episode = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    obs = torch.cat([episode[:, None].float(), torch.rand(len(episode), 3)], 1)
    terminals = torch.zeros(len(episode))
    terminals[torch.tensor(lengths).cumsum(0) - 1] = 1.0
    dataset = {
        "observations": obs.numpy(),
        "actions": (torch.rand(len(episode), 2) * 2 - 1).numpy(),
        "next_observations": obs.numpy(),
        "terminals": terminals.numpy(),
    }
    ns = run_block(OFFLINE, OFFLINE_ON_CPU, dataset=dataset)
    batch = ns["buf"].sample(512)
    assert len(ns["buf"]) == sum(lengths) and ns["buf"].goal_dim == 2
    assert torch.equal(batch.observation[:, 0], batch.goal[:, 0])


def test_envs_example():
    """The env block on CPU with fewer envs, stepped with random actions in [-1, 1]."""
    action = torch.rand(ENV_COUNT, 2, generator=torch.Generator().manual_seed(0)) * 2 - 1
    ns = run_block(ENVS, ENVS_ON_CPU, action=action)
    assert set(ns["obs"]) >= {"observation", "achieved_goal", "desired_goal"}
    assert ns["reward"].shape == ns["terminated"].shape == (ENV_COUNT,)
    assert "point_umaze" in ns["ENV_NAMES"]


def test_own_env_example(monkeypatch):
    """The env of one's own registers and steps. The registry is a copy without "free_point":
    tests/free_point_env.py (another definition, imported by other tests) registers that name."""
    registry = {k: v for k, v in crl_fast.envs._FACTORIES.items() if k != "free_point"}
    monkeypatch.setattr(crl_fast.envs, "_FACTORIES", registry)
    ns = run_block(OWN_ENV)
    env = crl_fast.envs.make_env("free_point", num_envs=4, seed=0)
    assert isinstance(env, ns["FreePoint"]) and env.max_episode_steps == 50
    obs, _ = env.reset(seed=0)
    moved = env.step(torch.ones(4, 2))[0]
    torch.testing.assert_close(moved["observation"], (obs["observation"] + 0.1).clamp(0, 1))


def test_train_example(tmp_path, monkeypatch):
    """The train() block, a few seconds long, writing its run under tmp_path/runs."""
    monkeypatch.chdir(tmp_path)
    ns = run_block(TRAIN, TRAIN_ON_CPU)
    run_dir = tmp_path / ns["result"]["run_dir"]
    assert run_dir.parent == tmp_path / "runs"
    assert (run_dir / "config.json").exists() and (run_dir / "metrics.jsonl").exists()
    assert 0.0 <= ns["result"]["eval/success"] <= 1.0


def test_own_loop_example(capsys):
    """The CleanRL-style loop, cut short: it fills its buffer, updates and prints the eval."""
    ns = run_block(OWN_LOOP, OWN_LOOP_ON_CPU)
    assert len(ns["buf"]) == 12_032 and ns["buf"].capacity == 12_032 // 64
    assert all(torch.isfinite(v) for v in ns["metrics"].values())
    printed = capsys.readouterr().out
    assert "'eval/success'" in printed and "'eval/final_distance'" in printed
    # seeded throughout (the buffer's generator too), so the README's figure repeats
    again = run_block(OWN_LOOP, OWN_LOOP_ON_CPU)
    assert all(torch.equal(again["metrics"][k], v) for k, v in ns["metrics"].items())
    assert capsys.readouterr().out == printed


def command_lines(text: str | None = None) -> list[tuple[int, str, list[str]]]:
    """(README line, command, its arguments after ``crl-fast``) of each ``crl-fast`` line of the
    Training section's ```bash block (comments left out)."""
    text = README.read_text() if text is None else text
    section = re.search(r"^## Training\n(.*?)(?=^## )", text, flags=re.MULTILINE | re.DOTALL)
    assert section, "README.md has no '## Training' section"
    start = text.count("\n", 0, section.start(1))
    block = readme_block("crl-fast train", "bash", section.group(1))
    lines = block.code.splitlines()
    return [
        (start + block.line + i, c, shlex.split(c, comments=True)[1:])
        for i, c in enumerate(lines)
        if c.startswith("crl-fast ")
    ]


def test_training_command_lines_parse():
    """Every ``crl-fast train`` / ``eval`` line of the Training section is accepted by the real
    parser (placeholders such as ``<time>`` are just path strings), and every ``train`` line that
    starts a new run from the defaults makes a valid config. Nothing runs."""
    commands = command_lines()
    assert {argv[0] for _, _, argv in commands} == {"train", "eval"}, commands
    refused = []
    for line, command, argv in commands:
        stderr = io.StringIO()
        try:
            with contextlib.redirect_stderr(stderr):
                args = build_parser().parse_args(argv)
            given = {k: v for k, v in vars(args).items() if k != "command"}
            if args.command == "train" and not (given.get("resume") or "config" in given):
                train_config(given)  # value checks: types, choices, JSON, --jaxgcrl-critic
        except SystemExit:
            message = stderr.getvalue().strip().rpartition("\n")[2]  # argparse's "error:" line
            refused.append(f"line {line}: {command}\n  {message}")
        except (TypeError, ValueError) as error:
            refused.append(f"line {line}: {command}\n  {error}")
    assert not refused, "README.md command lines refused:\n" + "\n".join(refused)


def heading_anchors(text: str) -> set[str]:
    """The anchors GitHub gives the Markdown headings of ``text`` (code blocks' ``#`` comments
    left out): lower case, punctuation dropped, spaces as hyphens, repeats numbered -1, -2, ..."""
    prose = re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)
    anchors: set[str] = set()
    for heading in re.findall(r"^#+ (.+)$", prose, flags=re.MULTILINE):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        anchor, repeat = slug, 0
        while anchor in anchors:
            repeat += 1
            anchor = f"{slug}-{repeat}"
        anchors.add(anchor)
    return anchors


def test_links_to_sections_name_a_heading():
    """Every ``](#anchor)`` link of the README (the contents list's, say) leads to a heading, so a
    renamed or removed section fails here, not on a reader's click."""
    text = README.read_text()
    anchors = heading_anchors(text)
    assert heading_anchors("# A b\n```\n# c\n```\n## A, b!\n### A b\n") == {"a-b", "a-b-1", "a-b-2"}
    broken = sorted(set(re.findall(r"\]\(#([^)]*)\)", text)) - anchors)
    assert re.search(r"\]\(#", text), "the README links to none of its sections"
    assert not broken, f"README.md links to sections that no heading makes: {broken}"


# Flags the README quotes from other programs: pip, ruff and pytest-benchmark.
OTHER_TOOLS_FLAGS = {"--index-url", "--no-deps", "--config-settings", "--check", "--benchmark-only"}


def parser_flags(parser: argparse.ArgumentParser) -> set[str]:
    """Every option string of ``parser`` and of its subcommands' parsers."""
    flags: set[str] = set()
    for action in parser._actions:
        flags.update(action.option_strings)
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                flags |= parser_flags(sub)
    return flags


def test_every_flag_exists():
    """Every ``--flag`` the README names, in prose too, is an option of ``crl-fast`` or of a script
    in bench/ or tests/ (found in their source), or one of OTHER_TOOLS_FLAGS: a renamed or removed
    flag fails here."""
    scripts = [
        *Path(README.parent, "bench").glob("*.py"),
        README.parent / "tests/compile_kernels.py",
    ]
    known = parser_flags(build_parser()) | OTHER_TOOLS_FLAGS
    known |= {f for p in scripts for f in re.findall(r"[\"'](--[a-z][\w-]*)[\"']", p.read_text())}
    named = set(re.findall(r"(?<![\w-])--[a-z][\w-]*", README.read_text()))
    assert "--no-tf32" in named and "--no-tf32" in known, "the flags were not found"
    assert not named - known, f"README.md names flags that nothing defines: {sorted(named - known)}"
