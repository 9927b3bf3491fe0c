"""``avlm.stats.bootstrap_ci`` on an item-mean metric ÷ a plain vectorised numpy bootstrap, side by side.

Run it::

    python bench/bootstrap.py                       # 10,000 resamples x 1,000 items, 9 repeats
    python bench/bootstrap.py --items 5000 --repeats 3

The floor is the shortest numpy bootstrap of a mean: one ``rng.integers`` index matrix (resamples x items), a
gather, a mean over axis 1 and ``np.percentile`` at 2.5 / 97.5. ``bootstrap_ci`` draws the same index matrix
(same generator, same seed, so both sides compute the same interval: checked) and adds its validation and the
interval's bookkeeping; BCa adds the jackknife and the bias / acceleration levels. The three calls alternate within
each repeat, in an order rotated from one repeat to the next, so all see the same machine state and none always
goes first; medians are printed. The target is a percentile ratio <= 1.2.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from avlm.stats import bootstrap_ci


def numpy_floor(values: np.ndarray, n_resamples: int, seed: int) -> tuple[float, float]:
    """95% percentile interval of the mean, the plain way."""
    rng = np.random.default_rng(seed)
    indices = rng.integers(0, values.shape[0], (n_resamples, values.shape[0]))
    means = values[indices].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def timed(function) -> tuple[float, object]:
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--items", type=int, default=1_000)
    parser.add_argument("--resamples", type=int, default=10_000)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    # A per-item metric in [0, 1] with a long right tail, like CIDEr-D / SPIDEr per caption.
    values = np.random.default_rng(123).beta(2.0, 5.0, size=args.items)
    draws = {"n_resamples": args.resamples, "seed": args.seed}
    sides = {
        "numpy floor": lambda: numpy_floor(values, args.resamples, args.seed),
        "bootstrap_ci percentile": lambda: bootstrap_ci(values, method="percentile", **draws),
        "bootstrap_ci bca": lambda: bootstrap_ci(values, method="bca", **draws),
    }
    times: dict[str, list[float]] = {name: [] for name in sides}
    # One untimed round first: page faults of the first large allocation and imports are not what is measured.
    for side in sides.values():
        side()
    names = list(sides)
    for repeat in range(args.repeats):
        # Rotate the order: the first side of a round pays the allocator's fresh pages for its 80 MB arrays.
        for name in names[repeat % 3 :] + names[: repeat % 3]:
            seconds, result = timed(sides[name])
            times[name].append(seconds)
            if name == "numpy floor":
                floor = result
            elif name == "bootstrap_ci percentile":
                percentile = result
        if (percentile.low, percentile.high) != floor:
            raise SystemExit(f"the two sides disagree: {percentile} vs numpy {floor}")

    floor_median = statistics.median(times["numpy floor"])
    print(f"{args.resamples:,} resamples x {args.items:,} items, median of {args.repeats} repeats")
    for name, seconds in times.items():
        median = statistics.median(seconds)
        print(f"  {name:<26} {median * 1e3:8.1f} ms   ratio {median / floor_median:5.2f}")
    ratio = statistics.median(times["bootstrap_ci percentile"]) / floor_median
    print(f"percentile ratio {ratio:.2f} (target <= 1.2): {'met' if ratio <= 1.2 else 'NOT met'}")


if __name__ == "__main__":
    main()
