"""The SCST reward: ``avlm.metrics.CiderD.score`` on a batch ÷ pycocoevalcap ``Cider().compute_score``, side by side.

Run it::

    python bench/cider_reward.py                        # 64 clips x 5 samples, df from 400 training clips
    python bench/cider_reward.py --clips 32 --samples 8 --repeats 9

The data are the caption demo's grammar (``avlm.data.caption_demo.caption_clip``): a training set of clips with 5
normalised references each, from which :class:`~avlm.metrics.cider.CiderD` takes its document frequencies once.
A batch is ``--clips`` training clips with ``--samples`` sampled captions each, as a policy samples them: a reference
phrasing of the clip or of a clip with one attribute changed, with a word dropped or repeated now and then.
pycocoevalcap scores the same batch the way a naive reward does, ``Cider().compute_score`` on already-tokenised text
(no Java), taking its document frequencies from the batch's references. Both sides alternate, after one untimed
round; medians are printed. Before timing, CiderD is checked against pycocoevalcap's ``CiderScorer`` with the same
document frequencies (``coco_cider_d``) and, with the batch's references as document frequencies, against
``Cider().compute_score``. The target is a ratio <= 0.07.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from pycocoevalcap.cider.cider import Cider

from avlm.data.caption_demo import ATTRIBUTES, caption_clip
from avlm.metrics import normalize_caption
from avlm.metrics.cider import CiderD, coco_cider_d

TOLERANCE = 1e-9


def random_attributes(rng: np.random.Generator) -> dict[str, str]:
    return {name: str(rng.choice(values)) for name, values in ATTRIBUTES.items()}


def sample_caption(attributes: dict[str, str], rng: np.random.Generator) -> str:
    """A caption a half-trained policy might sample: right or one attribute off, sometimes a word dropped/doubled."""
    attributes = dict(attributes)
    if rng.random() < 0.5:
        name = str(rng.choice(list(ATTRIBUTES)))
        attributes[name] = str(rng.choice(ATTRIBUTES[name]))
    words = normalize_caption(str(rng.choice(caption_clip(attributes, rng)))).split()
    if rng.random() < 0.3:
        at = int(rng.integers(len(words)))
        words = words[:at] + words[at + 1 :] if rng.random() < 0.5 else words[: at + 1] + words[at:]
    return " ".join(words)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--train-clips", type=int, default=400)
    parser.add_argument("--clips", type=int, default=64)
    parser.add_argument("--samples", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    rng = np.random.default_rng(args.seed)
    clips = [random_attributes(rng) for _ in range(args.train_clips)]
    train_references = [[normalize_caption(c) for c in caption_clip(attributes, rng)] for attributes in clips]
    batch_clips = rng.choice(args.train_clips, args.clips, replace=False)
    items = np.repeat(batch_clips, args.samples)
    candidates = [sample_caption(clips[i], rng) for i in items]
    gts = {k: train_references[i] for k, i in enumerate(items)}
    res = {k: [candidate] for k, candidate in enumerate(candidates)}

    start = time.perf_counter()
    cider = CiderD(train_references)
    setup_seconds = time.perf_counter() - start
    ours = cider.score(candidates, items)
    theirs = coco_cider_d(candidates, list(gts.values()), document_frequency_references=train_references)
    batch_df = CiderD([gts[k] for k in range(len(candidates))]).score(candidates, np.arange(len(candidates)))
    _, coco = Cider().compute_score(gts, res)
    differences = (float(np.abs(ours - theirs).max()), float(np.abs(batch_df - coco).max()))
    if max(differences) > TOLERANCE:
        raise SystemExit(f"CiderD disagrees with pycocoevalcap by {max(differences):.3g}")

    sides = {
        "CiderD.score": lambda: cider.score(candidates, items),
        "pycocoevalcap Cider": lambda: Cider().compute_score(gts, res),
    }
    times: dict[str, list[float]] = {name: [] for name in sides}
    for side in sides.values():  # untimed: imports, first allocations
        side()
    names = list(sides)
    for repeat in range(args.repeats):
        for name in names[repeat % 2 :] + names[: repeat % 2]:
            start = time.perf_counter()
            sides[name]()
            times[name].append(time.perf_counter() - start)

    print(
        f"{args.clips} clips x {args.samples} samples = {len(candidates)} candidates, 5 references each; "
        f"CiderD df from {args.train_clips} training clips (built once in {setup_seconds * 1e3:.1f} ms)"
    )
    print(
        f"agreement: vs CiderScorer with the training df {differences[0]:.2g}, "
        f"vs Cider().compute_score with the batch df {differences[1]:.2g} (max abs difference)"
    )
    medians = {name: statistics.median(seconds) for name, seconds in times.items()}
    for name, median in medians.items():
        print(f"  {name:<22} {median * 1e3:8.2f} ms per batch (median of {args.repeats})")
    ratio = medians["CiderD.score"] / medians["pycocoevalcap Cider"]
    print(f"ratio CiderD / pycocoevalcap: {ratio:.4f} (target <= 0.07): {'met' if ratio <= 0.07 else 'NOT met'}")


if __name__ == "__main__":
    main()
