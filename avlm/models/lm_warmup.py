"""``lm-tiny-warm``: the random tiny GPT-2 after a brief text-only warm-up on the caption demo's grammar.

A random ``lm-tiny`` knows no language, so a retention probe (does fusion keep what the frozen LM knew?) has
nothing to measure on it. The warm-up gives it something to lose: a few hundred steps of causal-LM training on
sentences drawn from :mod:`avlm.data.caption_demo`'s templates and synonyms (every attribute combination, fixed
seed, normalised with :func:`~avlm.metrics.normalize_caption` like the captioner's training text), after which
it knows e.g. that "there are three loud" is followed by a plural noun. It never sees a retention question: the
probe's items (:mod:`avlm.data.retention_demo`) are built separately from the same grammar.

The warm-up is deterministic (one CPU thread, no dropout, batches from a seeded generator) and its weights are
cached under the avlm cache dir in a folder keyed by the tokenizer's vocabulary, the init seed, the steps and
:data:`WARMUP_VERSION`, so rebuilding a checkpoint's LM gives the same weights without training again.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from avlm.data.caption_demo import ATTRIBUTES, caption_clip
from avlm.data.generated import generate_once
from avlm.errors import ConfigError
from avlm.metrics.captioning import normalize_caption

logger = logging.getLogger(__name__)

# Bump whenever the corpus or the training changes: it is part of the cache key.
WARMUP_VERSION = "v1"
WARMUP_STEPS = 200
WARMUP_TEXT_SEED = 0
WARMUP_BATCH_SIZE = 32
WARMUP_LEARNING_RATE = 3e-3
WARMUP_DRAWS_PER_COMBINATION = 4
_MAX_LENGTH = 32
_WEIGHTS_FILE = "lm.pt"


def warmup_corpus(
    *, seed: int = WARMUP_TEXT_SEED, draws_per_combination: int = WARMUP_DRAWS_PER_COMBINATION
) -> list[str]:
    """The warm-up text: the demo's 5 captions of every attribute combination, drawn several times, normalised.

    Args:
        seed: seed of the synonym draws.
        draws_per_combination: how many clips' worth of captions per attribute combination.

    Returns:
        ``64 · 5 · draws_per_combination`` normalised sentences (1,280 by default), in a fixed order.
    """
    rng = np.random.default_rng([seed, 11])
    combinations = [dict(zip(ATTRIBUTES, values, strict=True)) for values in itertools.product(*ATTRIBUTES.values())]
    return [
        normalize_caption(caption)
        for _ in range(draws_per_combination)
        for attributes in combinations
        for caption in caption_clip(attributes, rng)
    ]


def vocabulary_digest(tokenizer: Any) -> str:
    """SHA-256 of the tokenizer's token -> id table (and its special token ids): the cache key's vocabulary part."""
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id],
    }
    return hashlib.sha256(json.dumps(payload).encode("utf-8")).hexdigest()


def warm_lm_folder_name(tokenizer: Any, *, init_seed: int, steps: int) -> str:
    """The cache folder name of a warm-up: version, seed, steps and a hash of the vocabulary."""
    return f"lm_tiny_warm_{WARMUP_VERSION}_s{init_seed}_n{steps}_{vocabulary_digest(tokenizer)[:16]}"


def build_warm_lm(
    tokenizer: Any,
    *,
    init_seed: int = 0,
    steps: int = WARMUP_STEPS,
    cache_dir: str | os.PathLike | None = None,
) -> nn.Module:
    """``lm-tiny`` (initialised from ``init_seed``) warmed up on caption-grammar text; trained once, then cached.

    Args:
        tokenizer: the caption tokenizer of :func:`~avlm.models.build_caption_tokenizer` (sets the vocabulary).
        init_seed: seed of the initialisation and of the batch order.
        steps: optimizer steps of the warm-up.
        cache_dir: cache folder; None = :func:`~avlm.data.generated.default_cache_dir`.

    Returns:
        The warmed-up GPT-2 in eval mode (not frozen: the captioner freezes it).
    """
    from avlm.models.captioner import build_causal_lm

    lm = build_causal_lm("lm-tiny", tokenizer, init_seed=init_seed)
    folder = generate_once(
        cache_dir,
        warm_lm_folder_name(tokenizer, init_seed=init_seed, steps=steps),
        lambda target: _warm_up_into(target, lm, tokenizer, seed=init_seed, steps=steps),
        f"lm-tiny-warm ({steps} steps)",
    )
    lm.load_state_dict(torch.load(folder / _WEIGHTS_FILE, map_location="cpu", weights_only=True))
    return lm.eval()


def warm_up_lm(lm: nn.Module, tokenizer: Any, *, seed: int, steps: int) -> dict[str, float]:
    """Train ``lm`` in place on :func:`warmup_corpus` with next-token cross-entropy.

    AdamW at :data:`WARMUP_LEARNING_RATE` with a linear decay, batches of :data:`WARMUP_BATCH_SIZE` sentences drawn
    with replacement from a generator seeded with ``seed``, dropout off and one CPU thread, so the same inputs give
    the same weights.

    Args:
        lm: a causal LM on the CPU, e.g. ``lm-tiny``.
        tokenizer: its tokenizer.
        seed: seed of the batch order.
        steps: optimizer steps.

    Returns:
        ``first_loss`` and ``final_loss`` (mean token cross-entropy of the first and last batch), ``seconds``.

    Raises:
        ConfigError: ``steps`` < 1.
    """
    if steps < 1:
        raise ConfigError(f"lm warm-up steps must be >= 1, got {steps}")
    from transformers import get_linear_schedule_with_warmup

    from avlm.models.captioner import encode_captions

    corpus = encode_captions(tokenizer, warmup_corpus(), max_length=_MAX_LENGTH)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(lm.parameters(), lr=WARMUP_LEARNING_RATE, weight_decay=0.0)
    scheduler = get_linear_schedule_with_warmup(optimizer, min(20, steps // 10), steps)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    start = time.perf_counter()
    losses = []
    try:
        lm.eval()  # no dropout: the result must not depend on the global RNG
        for _ in range(steps):
            rows = torch.randint(len(corpus["input_ids"]), (WARMUP_BATCH_SIZE,), generator=generator)
            mask = corpus["attention_mask"][rows]
            length = int(mask.sum(1).max())
            loss = lm(
                input_ids=corpus["input_ids"][rows, :length],
                attention_mask=mask[:, :length],
                labels=corpus["labels"][rows, :length],
                use_cache=False,
            ).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            losses.append(float(loss.detach()))
    finally:
        torch.set_num_threads(threads)
    seconds = time.perf_counter() - start
    logger.info("lm warm-up: %d steps in %.1f s, loss %.3f -> %.3f", steps, seconds, losses[0], losses[-1])
    return {"first_loss": losses[0], "final_loss": losses[-1], "seconds": seconds}


def _warm_up_into(folder: Path, lm: nn.Module, tokenizer: Any, *, seed: int, steps: int) -> dict:
    summary = warm_up_lm(lm, tokenizer, seed=seed, steps=steps)
    torch.save(lm.state_dict(), folder / _WEIGHTS_FILE)
    return {"version": WARMUP_VERSION, "init_seed": seed, "steps": steps, **summary}
