"""A fragrance-formula environment with the Gymnasium API.

Each episode asks for a target accord: a profile over ``NOTES`` olfactory notes (citrus,
rose, musk, ...). The agent composes a formula by adding one unit of one of ``INGREDIENTS``
ingredients per step, for ``formula_units`` steps. An ingredient smells of a fixed mix of
notes (the catalogue, the same for every instance), and a formula's profile is the
unit-weighted sum of its ingredients' profiles.

- Observation (``NOTES * 2`` = 40 floats): the target profile, then the formula's profile,
  each scaled to unit length (zeros for the empty formula).
- Action: ``Discrete(INGREDIENTS)`` = 60, the ingredient to add.
- Reward: the step's gain in cosine similarity between formula and target, so an episode's
  return is the final formula's similarity, in [0, 1].

Small enough that a PPO update takes milliseconds on a CPU, yet a random policy scores
clearly below a trained one, so learning (and a broken update) shows in the reward.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from numpy.typing import NDArray

NOTES = 20
INGREDIENTS = 60
CATALOGUE_SEED = 2024


def ingredient_catalogue() -> NDArray[np.float64]:
    """Each ingredient's note profile: a few dominant notes, the same in every process."""
    rng = np.random.default_rng(CATALOGUE_SEED)
    catalogue = rng.gamma(shape=0.3, scale=1.0, size=(INGREDIENTS, NOTES))
    return np.asarray(catalogue / catalogue.sum(axis=1, keepdims=True), dtype=np.float64)


def _unit(vector: NDArray[np.float64]) -> NDArray[np.float64]:
    norm = float(np.linalg.norm(vector))
    return vector / norm if norm > 0.0 else np.zeros_like(vector)


class FragranceFormulaEnv(gym.Env[NDArray[np.float32], np.int64]):
    """Compose a formula, one ingredient unit per step, towards a target accord."""

    metadata = {"render_modes": []}  # noqa: RUF012 (Gymnasium declares it per instance)

    def __init__(self, formula_units: int = 12, accord_size: int = 3) -> None:
        self.formula_units = formula_units
        self.accord_size = accord_size
        self.catalogue = ingredient_catalogue()
        self.observation_space = gym.spaces.Box(0.0, 1.0, shape=(2 * NOTES,), dtype=np.float32)
        self.action_space = gym.spaces.Discrete(INGREDIENTS)
        self._target = np.zeros(NOTES)
        self._formula = np.zeros(NOTES)
        self._units = 0

    def _similarity(self) -> float:
        return float(_unit(self._formula) @ self._target)

    def _observation(self) -> NDArray[np.float32]:
        return np.concatenate([self._target, _unit(self._formula)]).astype(np.float32)

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[NDArray[np.float32], dict[str, Any]]:
        super().reset(seed=seed)
        # A reachable target: a random blend of a few ingredients, plus a little noise.
        chosen = self.np_random.choice(INGREDIENTS, size=self.accord_size, replace=False)
        weights = self.np_random.dirichlet(np.ones(self.accord_size))
        accord = weights @ self.catalogue[chosen] + self.np_random.uniform(0, 0.02, NOTES)
        self._target = _unit(accord)
        self._formula = np.zeros(NOTES)
        self._units = 0
        return self._observation(), {}

    def step(
        self, action: np.int64
    ) -> tuple[NDArray[np.float32], float, bool, bool, dict[str, Any]]:
        if not self.action_space.contains(action):
            raise ValueError(f"action {action!r} is not an ingredient index")
        before = self._similarity()
        self._formula = self._formula + self.catalogue[int(action)]
        self._units += 1
        similarity = self._similarity()
        terminated = self._units >= self.formula_units
        return (
            self._observation(),
            similarity - before,
            terminated,
            False,
            {"similarity": similarity},
        )
