"""crl-fast: fast contrastive reinforcement learning on GPUs.

The loss and the replay buffer need only torch (and triton on CUDA); the environments
(``crl_fast.envs``, which use gymnasium) and the training stack are imported on demand.
"""

from crl_fast.buffer import GOAL_MODES, GoalBatch, TrajectoryBuffer
from crl_fast.energy import ENERGIES, pairwise_energy
from crl_fast.loss import LOSSES, ContrastiveLoss, LossConfig, contrastive_loss
from crl_fast.loss_reference import reference_contrastive_loss

__version__ = "0.1.0"

__all__ = [
    "ENERGIES",
    "GOAL_MODES",
    "LOSSES",
    "ContrastiveLoss",
    "GoalBatch",
    "LossConfig",
    "TrajectoryBuffer",
    "__version__",
    "contrastive_loss",
    "pairwise_energy",
    "reference_contrastive_loss",
]
