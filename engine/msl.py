"""Multi-step loss weights (SPEC 2.1): every inner step's query loss counts, annealed to the
last."""

from __future__ import annotations


def msl_weights(epoch: int, steps: int, msl_epochs: int, enabled: bool = True) -> list[float]:
    """Per-step weights of the query losses for `epoch` (0-based), piecewise constant per epoch.

    Non-final steps decay linearly from 1/N to a floor of 0.03/N while the final step grows by
    what they lose; from `msl_epochs` on (or with MSL off) only the final step counts.
    """
    final_only = [0.0] * (steps - 1) + [1.0]
    if not enabled or epoch >= msl_epochs:
        return final_only
    n = steps
    decay = 1.0 / (n * msl_epochs)
    floor = 0.03 / n
    non_final = max(1.0 / n - epoch * decay, floor)
    final = min(1.0 / n + epoch * (n - 1) * decay, 1.0 - (n - 1) * floor)
    return [non_final] * (n - 1) + [final]
