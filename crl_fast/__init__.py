"""crl-fast: fast contrastive reinforcement learning on GPUs.

The loss, the replay buffer and the agent need only torch (and triton on CUDA); the
environments (``crl_fast.envs``, which use gymnasium) and the training loop
(``crl_fast.train``, ``crl-fast train``) are imported on demand.
"""

from crl_fast.agent import CRL
from crl_fast.buffer import GOAL_MODES, GoalBatch, TrajectoryBuffer
from crl_fast.config import AgentConfig, TrainConfig
from crl_fast.energy import ENERGIES, pairwise_energy
from crl_fast.loss import LOSSES, ContrastiveLoss, LossConfig, contrastive_loss
from crl_fast.loss_reference import reference_contrastive_loss

__version__ = "0.1.0"

__all__ = [
    "CRL",
    "ENERGIES",
    "GOAL_MODES",
    "LOSSES",
    "AgentConfig",
    "ContrastiveLoss",
    "GoalBatch",
    "LossConfig",
    "TrainConfig",
    "TrajectoryBuffer",
    "__version__",
    "contrastive_loss",
    "pairwise_energy",
    "reference_contrastive_loss",
]
