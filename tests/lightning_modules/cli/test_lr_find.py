"""The learning-rate finder's line: the steps it ran, where a diverging loss stopped it, and its suggestion."""

from __future__ import annotations

import math

from lightning.pytorch.tuner.lr_finder import _LRFinder  # what Tuner.lr_find returns

from lightning_modules.cli.lr_find import describe_lr_find


def _finder(losses: list[float]) -> _LRFinder:
    """A finder whose sweep from 1e-8 to 1 over 100 steps ran `len(losses)` of them with these smoothed losses."""
    finder = _LRFinder("exponential", 1e-8, 1.0, 100)
    lrs = [1e-8 * 1e8 ** (step / 99) for step in range(len(losses))]
    finder.results = {"lr": lrs, "loss": losses}
    return finder


def test_a_sweep_cut_short_by_a_diverging_loss_says_where_and_how_many_steps_the_suggestion_comes_from() -> None:
    falling = [2.0 - 0.04 * step for step in range(36)]  # lowest 0.6
    finder = _finder([*falling, 2.5])  # step 37 above 4 x 0.6: Lightning's early stop
    suggestion = finder.suggestion()
    assert suggestion is not None
    assert describe_lr_find(finder, suggestion, applied=True) == (
        f"Learning-rate finder: stopped at step 37 of 100, lr {finder.results['lr'][-1]:.3g} (the smoothed loss rose "
        f"above 4x its lowest); suggests lr={suggestion:.3g} from those 37 steps (applied)"
    )


def test_a_whole_sweep_says_its_steps_and_a_sweep_without_a_suggestion_keeps_the_rate() -> None:
    whole = _finder([2.0 - 0.01 * step for step in range(100)])
    suggestion = whole.suggestion()
    assert suggestion is not None
    line = describe_lr_find(whole, suggestion, applied=False)
    assert line == f"Learning-rate finder: 100 of 100 steps, lr 1e-08 to 1; suggests lr={suggestion:.3g}"
    flat = _finder([math.nan] * 12)  # stopped without a diverging loss, no finite loss to suggest from
    assert describe_lr_find(flat, flat.suggestion(), applied=True) == (
        f"Learning-rate finder: stopped at step 12 of 100, lr {flat.results['lr'][-1]:.3g}; no suggestion (too few "
        "finite losses); keeping the configured rate"
    )
