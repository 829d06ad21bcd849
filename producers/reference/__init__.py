"""The reference trainer: the guide's PPO loop on a small fragrance-formula environment.

Needs the ``torch`` extra (and Gymnasium). The demo runs it; it is also the worked example
of ``TorchRunOps`` in a real training loop.
"""

from producers.reference.env import FragranceFormulaEnv
from producers.reference.ppo import PPOConfig, ReferencePPOTrainer

__all__ = ["FragranceFormulaEnv", "PPOConfig", "ReferencePPOTrainer"]
