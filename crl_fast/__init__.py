"""crl-fast: fast contrastive reinforcement learning on GPUs.

The loss API needs only torch (and triton on CUDA); the RL parts live in submodules
(``crl_fast.buffer``, ``crl_fast.envs``, ``crl_fast.agent``) and are imported on demand.
"""

from crl_fast.energy import ENERGIES, pairwise_energy
from crl_fast.loss import LOSSES, ContrastiveLoss, LossConfig, contrastive_loss
from crl_fast.loss_reference import reference_contrastive_loss

__version__ = "0.1.0"

__all__ = [
    "ENERGIES",
    "LOSSES",
    "ContrastiveLoss",
    "LossConfig",
    "__version__",
    "contrastive_loss",
    "pairwise_energy",
    "reference_contrastive_loss",
]
