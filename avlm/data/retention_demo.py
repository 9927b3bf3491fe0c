"""The built-in retention set: two-choice cloze questions on the caption demo's grammar.

Each question is the start of a sentence the templates of :mod:`avlm.data.caption_demo` can write, and its two
choices are words of the demo vocabulary of which only one can come next there. Three families, each in mirrored
pairs that share one pair of words with the answer swapped, so an LM that prefers one word whatever the context
scores exactly 50% and only a context-aware LM scores above chance:

- number: "a loud short high ___" takes the singular noun ("beep"), "there are three loud ___" the plural
  ("beeps");
- slot: "there is a single quiet tone that is brief and ___" takes a pitch word ("deep"), "there is a single ___"
  a loudness word ("faint");
- form: "a high beep plays ___" takes an adverb ("softly"), "there are three ___" an adjective ("soft").

The text is normalised (lowercase, no punctuation) like the captioner's training text. Synonyms are drawn with
their own seed, apart from the text that warms up ``lm-tiny-warm`` (:mod:`avlm.models.lm_warmup`); the warm-up
learns the grammar from captions and never sees these questions. The words come from the demo vocabulary: on a
captioner whose tokenizer was built from other captions, many of them would be unknown tokens.
"""

from __future__ import annotations

import numpy as np

from avlm.data.caption_demo import DURATION_WORDS, LOUDNESS_ADVERBS, LOUDNESS_WORDS, NOUNS, PITCH_WORDS, _pick
from avlm.retention import RetentionItem

RETENTION_DEMO_SEED = 1
RETENTION_DEMO_PAIRS = 20
# One-word choices only: the log-likelihood of a choice is a sum over its tokens, so choices of equal length are
# compared fairly.
_PITCH = tuple(word for words in PITCH_WORDS.values() for word in words if " " not in word)
_LOUDNESS = tuple(word for words in LOUDNESS_WORDS.values() for word in words)
_DURATION = tuple(word for words in DURATION_WORDS.values() for word in words)
# (adverb, adjective) of the same loudness: "softly" / "soft".
_FORMS = tuple(
    (adverb, adverb.removesuffix("ly"))
    for adverbs in LOUDNESS_ADVERBS.values()
    for adverb in adverbs
    if adverb.removesuffix("ly") in _LOUDNESS
)
_NOUN_PAIRS = tuple(pair for pairs in NOUNS.values() for pair in pairs)


def demo_retention_set(*, seed: int = RETENTION_DEMO_SEED, pairs: int = RETENTION_DEMO_PAIRS) -> list[RetentionItem]:
    """The built-in retention items: ``pairs`` mirrored pairs of each family (120 items by default).

    Args:
        seed: seed of the synonym draws and of the order of the choices.
        pairs: mirrored item pairs per family.

    Returns:
        Items with ids ``<family>-<index>`` (e.g. ``number-007``), two choices each, the answer's position random.
    """
    rng = np.random.default_rng([seed, 21])
    items: list[RetentionItem] = []

    def add(family: str, question: str, right: str, wrong: str) -> None:
        choices = (right, wrong) if rng.random() < 0.5 else (wrong, right)
        item_id = f"{family}-{sum(item.id.startswith(family) for item in items):03d}"
        items.append(RetentionItem(id=item_id, question=question, choices=choices, answer=choices.index(right)))

    for _ in range(pairs):
        singular, plural = _NOUN_PAIRS[rng.integers(len(_NOUN_PAIRS))]
        loud, duration, pitch = _pick(rng, _LOUDNESS), _pick(rng, _DURATION), _pick(rng, _PITCH)
        add("number", f"a {loud} {duration} {pitch}", singular, plural)
        add("number", f"there are three {_pick(rng, _LOUDNESS)}", plural, singular)
    for _ in range(pairs):
        pitch, loud = _pick(rng, _PITCH), _pick(rng, _LOUDNESS)
        noun = _NOUN_PAIRS[rng.integers(len(_NOUN_PAIRS))][0]
        other_loud, duration = _pick(rng, _LOUDNESS), _pick(rng, _DURATION)
        add("slot", f"there is a single {other_loud} {noun} that is {duration} and", pitch, loud)
        add("slot", "there is a single", loud, pitch)
    for _ in range(pairs):
        adverb, adjective = _FORMS[rng.integers(len(_FORMS))]
        noun = _NOUN_PAIRS[rng.integers(len(_NOUN_PAIRS))][0]
        add("form", f"a {_pick(rng, _PITCH)} {noun} plays", adverb, adjective)
        add("form", "there are three", adjective, adverb)
    return items
