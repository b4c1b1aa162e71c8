"""The training loop's schedule in whole env steps: when evaluations, logs and checkpoints fall,
how many loop iterations a run has, when it first updates, and which update's metrics a log row
or checkpoint holds."""

from __future__ import annotations

from crl_fast.config import TrainConfig


def crossed(before: int, after: int, every: int) -> bool:
    """Whether a multiple of ``every`` lies in ``(before, after]``."""
    return every > 0 and after // every > before // every


def iterations(config: TrainConfig) -> int:
    """Loop iterations of a whole run: each steps every env once, until ``total_env_steps``."""
    return -(-config.total_env_steps // config.num_envs)


def first_update_step(config: TrainConfig, cuda_graph: bool) -> int | None:
    """The env step after which the loop makes its first update (None: it makes none): the end
    of the first iteration whose credit, added as the loop adds it, reaches one update; with
    CUDA graphs the first iteration that earns any (its warm-up updates run at once)."""
    if config.updates_per_env_step <= 0:
        return None
    first = max(1, -(-config.learning_starts // config.num_envs))  # first iteration that earns
    credit = 0.0
    for i in range(first, iterations(config) + 1):
        credit += config.num_envs * config.updates_per_env_step
        if cuda_graph or credit >= 1:
            return i * config.num_envs
    return None


def reports_metrics(
    update_credit: float, env_steps: int, config: TrainConfig, before: int, per_call: int
) -> bool:
    """Whether the update about to run is the last before the next training-metrics log or
    checkpoint (at the end of the first loop iteration that crosses a multiple of ``log_every``
    or ``checkpoint_every``), so that its metrics are the ones logged or saved (a resumed run
    logs the saved ones until it updates): no other update follows in this iteration (which
    began at env step ``before`` and is at ``env_steps``, with ``update_credit`` left before this
    update of ``per_call``), and the credit the iterations up to then earn stays short of
    another. The credit is added as the loop adds it, so the answer is exact."""
    credit = update_credit - per_call  # after this update
    if credit >= per_call:
        return False
    start, end = before, env_steps
    while not (
        crossed(start, end, config.log_every) or crossed(start, end, config.checkpoint_every)
    ):
        if end >= config.total_env_steps:
            return True  # training ends first
        start, end = end, end + config.num_envs
        credit += config.num_envs * config.updates_per_env_step
        if credit >= per_call:
            return False
    return True
