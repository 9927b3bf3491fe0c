"""CIDEr-D without Java and without per-caption Python dictionaries: the SCST reward, vectorised with numpy.

:class:`CiderD` computes what pycocoevalcap's ``CiderScorer.compute_cider`` computes (coco-caption's "CIDEr", which
is CIDEr-D): for a candidate ``c`` and the references ``r_1 .. r_R`` of its item,

    CIDEr-D(c) = 10 / (n R) * sum_j exp(-(l_c - l_j)^2 / (2 sigma^2)) * sum_k <min(g_k(c), g_k(r_j)), g_k(r_j)>
                                                                            / (|g_k(c)| |g_k(r_j)|)

where ``g_k(s)`` is the tf-idf vector of the k-grams of ``s`` (term count times ``log(D) - log(max(1, df))``, ``D``
the number of document-frequency reference sets and ``df`` the number of those sets holding the k-gram at least
once), ``min`` clips the candidate's weights elementwise and ``l`` is pycocoevalcap's "length": the number of
bigrams of the caption (``max(words - 1, 0)``, or 0 when ``n`` is 1; coco-caption counts bigrams there, not words,
and CIDEr-D as published is its behaviour).

The document frequencies, the references' tf-idf vectors and their norms are computed once, in the constructor,
from whitespace-tokenised text: callers pass :func:`avlm.metrics.normalize_caption`'d (or PTB-tokenised) text. A
call to :meth:`CiderD.score` only tokenises the candidates, maps their n-grams to the integer ids of the
constructor's n-gram vocabulary (a k-gram's id is looked up from its (k-1)-gram prefix id and last word id with
``np.searchsorted``, so the mapping is exact, without hashing) and joins them to the references of their items
through one sorted key array per order. N-grams no reference holds get fresh ids within the call: they match
nothing but count in the candidate's norm, with the idf of an unseen n-gram (``log(D)``), as in pycocoevalcap.

:func:`coco_cider_d` runs pycocoevalcap's own ``CiderScorer`` with document frequencies from separate references;
``tests/metrics/test_cider.py`` checks that both agree to 1e-9 and ``bench/cider_reward.py`` times them.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from pycocoevalcap.cider.cider_scorer import CiderScorer, cook_refs, cook_test

from avlm.errors import ConfigError, DataError


@dataclass(frozen=True)
class _Grams:
    """The k-grams of some texts, one entry per distinct (text, k-gram), sorted by text then id.

    Attributes:
        text: Index of the text of each entry.
        gram: Id of the k-gram: below the vocabulary's size when it is known, above it when fresh in this call.
        count: How often the k-gram occurs in the text (float64, as pycocoevalcap multiplies it with the idf).
        n_ids: Known plus fresh ids of this order in this call (a stride that keeps (item, id) keys unique).
    """

    text: np.ndarray
    gram: np.ndarray
    count: np.ndarray
    n_ids: int


@dataclass(frozen=True)
class _Encoded:
    """Texts as n-gram counts of each order, their lengths, and the vocabulary entries new in this call."""

    grams: list[_Grams]
    n_words: np.ndarray
    fresh_words: np.ndarray
    fresh_keys: list[np.ndarray]


class _NgramVocabulary:
    """Exact integer ids of n-grams: a word's id, then a k-gram's id from its (k-1)-gram prefix id and last word id.

    Order 1 ids are word ids. The k-grams (k >= 2) of the vocabulary are stored as sorted int64 keys
    ``prefix_id * n_words + word_id``; a k-gram's id is the position of its key.
    """

    def __init__(self, n: int):
        self.n = n
        self.word_index: dict[str, int] = {}
        self.keys: list[np.ndarray] = [np.zeros(0, np.int64) for _ in range(n)]  # keys[0] is unused

    def size(self, order: int) -> int:
        """Number of known n-grams of ``order`` (1-based)."""
        return len(self.word_index) if order == 1 else len(self.keys[order - 1])

    @classmethod
    def from_texts(cls, texts: Sequence[str], n: int) -> tuple[_NgramVocabulary, _Encoded]:
        """The vocabulary of every n-gram of ``texts``, and the texts encoded with it."""
        vocabulary = cls(n)
        encoded = vocabulary.encode(texts)
        # With nothing known, the fresh ids of this call are the positions of the sorted fresh words and keys.
        vocabulary.word_index = {word: i for i, word in enumerate(encoded.fresh_words.tolist())}
        vocabulary.keys = [np.zeros(0, np.int64), *encoded.fresh_keys[1:]]
        return vocabulary, encoded

    def encode(self, texts: Sequence[str]) -> _Encoded:
        """Count the 1..n-grams of whitespace-tokenised ``texts``; unknown n-grams get fresh ids, consistent within
        the call (the same unknown n-gram in two texts gets the same id)."""
        tokenised = [text.split() for text in texts]
        lengths = np.fromiter(map(len, tokenised), np.int64, len(tokenised))
        words = [word for text_words in tokenised for word in text_words]
        known_words = len(self.word_index)
        ids = np.fromiter(map(self.word_index.get, words, itertools.repeat(-1)), np.int64, len(words))
        unknown = np.flatnonzero(ids < 0)
        fresh_words = np.zeros(0, dtype=str)
        if unknown.size:
            fresh_words, inverse = np.unique(np.array([words[p] for p in unknown]), return_inverse=True)
            ids[unknown] = known_words + inverse
        call_words = known_words + len(fresh_words)

        text_of = np.repeat(np.arange(len(texts)), lengths)
        # Words from each position to the end of its text, the position included: a k-gram starts where it is >= k.
        remaining = np.repeat(lengths.cumsum(), lengths) - np.arange(len(words))
        grams = [self._count(text_of, ids, call_words)]
        fresh_keys = [np.zeros(0, np.int64)]
        starts, prefix_ids, prefix_known = np.arange(len(words)), ids, known_words
        for order in range(2, self.n + 1):
            keep = remaining[starts] >= order
            starts, prefix_ids = starts[keep], prefix_ids[keep]
            last = ids[starts + order - 1]
            gram_ids, fresh, n_ids = self._lookup(order, prefix_ids, prefix_known, last, known_words, call_words)
            grams.append(self._count(text_of[starts], gram_ids, n_ids))
            fresh_keys.append(fresh)
            prefix_ids, prefix_known = gram_ids, self.size(order)
        return _Encoded(grams, lengths, fresh_words, fresh_keys)

    def _lookup(
        self,
        order: int,
        prefix_ids: np.ndarray,
        prefix_known: int,
        last: np.ndarray,
        known_words: int,
        call_words: int,
    ) -> tuple[np.ndarray, np.ndarray, int]:
        """Ids of k-grams given by prefix id and last word id; returns (ids, sorted fresh keys, known + fresh)."""
        table = self.keys[order - 1]
        gram_ids = np.full(len(last), -1, np.int64)
        candidates = np.flatnonzero((prefix_ids < prefix_known) & (last < known_words))
        if table.size and candidates.size:
            keys = prefix_ids[candidates] * known_words + last[candidates]
            where = np.minimum(np.searchsorted(table, keys), table.size - 1)
            found = table[where] == keys
            gram_ids[candidates[found]] = where[found]
        unknown = np.flatnonzero(gram_ids < 0)
        fresh = np.zeros(0, np.int64)
        if unknown.size:
            # last < call_words, so each (prefix, last) pair has its own key.
            fresh, inverse = np.unique(prefix_ids[unknown] * call_words + last[unknown], return_inverse=True)
            gram_ids[unknown] = table.size + inverse
        return gram_ids, fresh, table.size + fresh.size

    @staticmethod
    def _count(text_of: np.ndarray, gram_ids: np.ndarray, n_ids: int) -> _Grams:
        n_ids = max(n_ids, 1)
        distinct, counts = np.unique(text_of * n_ids + gram_ids, return_counts=True)
        return _Grams(distinct // n_ids, distinct % n_ids, counts.astype(np.float64), n_ids)


@dataclass(frozen=True)
class _ReferenceTable:
    """References grouped by item, ready for the join with candidates' n-grams.

    Attributes:
        keys: Per order, the distinct ``item * stride + gram id`` of the (reference, n-gram) entries, sorted.
        first: Per order, the index of each key's first entry in ``slot`` and ``weight``.
        runs: Per order, the number of entries (references of the item holding the n-gram) of each key.
        slot: Per order and entry, sorted by key: the reference's position within its item.
        weight: Per order and entry, sorted by key: the reference's tf-idf weight of the n-gram.
        stride: Per order, the id stride of ``keys``; candidate n-grams with ids at or above it match nothing.
        norms: (references, n) norms of the references' tf-idf vectors per order.
        lengths: (references,) pycocoevalcap lengths (bigram counts) of the references.
        start: (items,) index of each item's first reference.
        count: (items,) number of references of each item.
    """

    keys: list[np.ndarray]
    first: list[np.ndarray]
    runs: list[np.ndarray]
    slot: list[np.ndarray]
    weight: list[np.ndarray]
    stride: list[int]
    norms: np.ndarray
    lengths: np.ndarray
    start: np.ndarray
    count: np.ndarray


class CiderD:
    """CIDEr-D (n=4, sigma=6, clipped counts, gaussian length penalty, x10) of candidates against per-item references,
    with document frequencies computed ONCE from ``document_frequency_references`` (default: ``references``).

    Scores equal pycocoevalcap's ``CiderScorer`` with the same document frequencies (see :func:`coco_cider_d`); when
    the document-frequency references are the scored references, they equal ``Cider().compute_score``. All text is
    whitespace-tokenised as given: pass normalised captions. Typical use, the SCST reward::

        cider = CiderD(train_references)                       # once: df, reference vectors and norms
        rewards = cider.score(sampled_captions, clip_indices)  # per batch

    Args:
        references: Per item, its reference captions (at least one each); :meth:`score` refers to items by index.
        document_frequency_references: Per document (e.g. per training clip), its reference captions; each n-gram
            counts once per document. None = ``references``.
        n: Largest n-gram order.
        sigma: Standard deviation of the gaussian length penalty.

    Attributes:
        n: Largest n-gram order.
        sigma: Standard deviation of the gaussian length penalty.
        n_items: Number of items of ``references``.
        n_documents: Number of document-frequency sets ``D``.
        ref_len: ``log(D)``, pycocoevalcap's ``ref_len``: the idf of an n-gram no document holds.

    Raises:
        ConfigError: ``n`` < 1 or ``sigma`` <= 0.
        DataError: no items, an item without references, or a caption that is not a string.
    """

    def __init__(
        self,
        references: Sequence[Sequence[str]],
        *,
        document_frequency_references: Sequence[Sequence[str]] | None = None,
        n: int = 4,
        sigma: float = 6.0,
    ) -> None:
        if n < 1:
            raise ConfigError(f"CIDEr-D n-gram order n must be >= 1, got {n}")
        if not sigma > 0:
            raise ConfigError(f"CIDEr-D sigma must be > 0, got {sigma}")
        self.n, self.sigma = int(n), float(sigma)
        references = _reference_lists(references, "references")
        df_references = (
            references
            if document_frequency_references is None
            else _reference_lists(document_frequency_references, "document_frequency_references")
        )
        scored_texts = [text for refs in references for text in refs]
        df_texts = [] if df_references is references else [text for refs in df_references for text in refs]
        self._vocabulary, encoded = _NgramVocabulary.from_texts(scored_texts + df_texts, self.n)

        # Document frequency: in how many document sets each n-gram occurs (once per set).
        df_offset = 0 if df_references is references else len(scored_texts)
        document_of = np.repeat(np.arange(len(df_references)), [len(refs) for refs in df_references])
        self.n_documents = len(df_references)
        self.ref_len = float(np.log(float(self.n_documents)))
        self._idf: list[np.ndarray] = []
        for grams in encoded.grams:
            in_df = grams.text >= df_offset
            document = document_of[grams.text[in_df] - df_offset]
            pairs = np.unique(document * grams.n_ids + grams.gram[in_df])
            frequency = np.bincount(pairs % grams.n_ids, minlength=grams.n_ids).astype(np.float64)
            # One more entry: the idf of an n-gram no document holds, for fresh ids (see _weights).
            self._idf.append(np.append(self.ref_len - np.log(np.maximum(1.0, frequency)), self.ref_len))

        scored_count = np.array([len(refs) for refs in references], np.int64)
        self.n_items = len(references)
        self._table = self._reference_table(encoded, len(scored_texts), scored_count)

    def score(self, candidates: Sequence[str], items: Sequence[int]) -> np.ndarray:
        """CIDEr-D of each candidate against the references of its item.

        Args:
            candidates: Whitespace-tokenised captions.
            items: For each candidate, the index of its item in the constructor's ``references``.

        Returns:
            (len(candidates),) float64 scores.

        Raises:
            DataError: lengths differ, an item index is out of range, or a candidate is not a string.
        """
        candidates = _captions(candidates, "candidates")
        items = np.asarray(items, dtype=np.int64).reshape(-1)
        if len(items) != len(candidates):
            raise DataError(f"got {len(candidates)} candidates but {len(items)} item indices")
        out_of_range = np.flatnonzero((items < 0) | (items >= self.n_items))
        if out_of_range.size:
            raise DataError(
                f"item indices must be in [0, {self.n_items}); got {items[out_of_range[:5]].tolist()} "
                f"at candidates {out_of_range[:5].tolist()}"
            )
        encoded = self._vocabulary.encode(candidates)
        return self._score(encoded, len(candidates), items, self._table)

    def score_against(self, candidates: Sequence[str], references: Sequence[Sequence[str]]) -> np.ndarray:
        """CIDEr-D of each candidate against its own given references, with this object's document frequencies.

        For rerank consensus: each candidate against the other candidates of its item.

        Args:
            candidates: Whitespace-tokenised captions.
            references: For each candidate, its references (at least one each).

        Returns:
            (len(candidates),) float64 scores.

        Raises:
            DataError: lengths differ, a candidate has no reference, or a caption is not a string.
        """
        candidates = _captions(candidates, "candidates")
        if not candidates and not len(references):
            return np.zeros(0)
        references = _reference_lists(references, "references")
        if len(references) != len(candidates):
            raise DataError(f"got {len(candidates)} candidates but {len(references)} reference lists")
        reference_texts = [text for refs in references for text in refs]
        encoded = self._vocabulary.encode(candidates + reference_texts)
        count = np.array([len(refs) for refs in references], np.int64)
        table = self._reference_table(encoded, len(reference_texts), count, first_text=len(candidates))
        return self._score(encoded, len(candidates), np.arange(len(candidates)), table)

    def _weights(self, grams: _Grams, order: int) -> np.ndarray:
        """tf-idf weights of the entries of ``grams``; fresh ids take the unseen n-gram's idf."""
        idf = self._idf[order - 1]
        return grams.count * idf[np.minimum(grams.gram, idf.size - 1)]

    def _lengths(self, n_words: np.ndarray) -> np.ndarray:
        # pycocoevalcap adds up the counts of the bigrams (index n == 1), not of the words.
        return np.maximum(n_words - 1, 0) if self.n >= 2 else np.zeros_like(n_words)

    def _reference_table(
        self, encoded: _Encoded, n_texts: int, count: np.ndarray, first_text: int = 0
    ) -> _ReferenceTable:
        """Table of texts ``first_text .. first_text + n_texts`` of ``encoded``, ``count[i]`` of them for item i."""
        start = np.concatenate([[0], count.cumsum()[:-1]]).astype(np.int64)
        item_of = np.repeat(np.arange(len(count)), count)
        slot_of = np.arange(n_texts) - np.repeat(start, count)
        norms = np.zeros((n_texts, self.n))
        keys, firsts, runs, slots, weights, strides = [], [], [], [], [], []
        for order, grams in enumerate(encoded.grams, start=1):
            mine = (grams.text >= first_text) & (grams.text < first_text + n_texts)
            text = grams.text[mine] - first_text
            weight = self._weights(grams, order)[mine]
            norms[:, order - 1] = np.sqrt(np.bincount(text, weight**2, minlength=n_texts))
            key = item_of[text] * grams.n_ids + grams.gram[mine]
            order_by_key = np.argsort(key, kind="stable")
            distinct, first, run = np.unique(key[order_by_key], return_index=True, return_counts=True)
            keys.append(distinct)
            firsts.append(first)
            runs.append(run)
            slots.append(slot_of[text[order_by_key]])
            weights.append(weight[order_by_key])
            strides.append(grams.n_ids)
        lengths = self._lengths(encoded.n_words[first_text : first_text + n_texts])
        return _ReferenceTable(keys, firsts, runs, slots, weights, strides, norms, lengths, start, count)

    def _score(self, encoded: _Encoded, n_candidates: int, items: np.ndarray, table: _ReferenceTable) -> np.ndarray:
        """Scores of texts ``0 .. n_candidates`` of ``encoded``, candidate i against the references of item items[i]."""
        most_refs = int(table.count.max()) if table.count.size else 1
        n_slots = n_candidates * most_refs
        # (candidate, reference slot): the reference's index, and whether the item has that many references.
        slot = np.arange(most_refs)
        valid = slot < table.count[items][:, None]
        reference = np.where(valid, table.start[items][:, None] + slot, 0)
        similarity = np.zeros((n_candidates, most_refs))
        for order, grams in enumerate(encoded.grams, start=1):
            mine = grams.text < n_candidates
            text, gram = grams.text[mine], grams.gram[mine]
            weight = self._weights(grams, order)[mine]
            norm = np.sqrt(np.bincount(text, weight**2, minlength=n_candidates))
            table_keys = table.keys[order - 1]
            if not table_keys.size:
                continue
            # Join: the entries of the item's references that hold the same n-gram.
            matchable = gram < table.stride[order - 1]
            text, weight = text[matchable], weight[matchable]
            key = items[text] * table.stride[order - 1] + gram[matchable]
            where = np.minimum(np.searchsorted(table_keys, key), table_keys.size - 1)
            matches = np.where(table_keys[where] == key, table.runs[order - 1][where], 0)
            entry = np.repeat(np.arange(key.size), matches)
            # Entry j of the e-th candidate n-gram's run sits at first[e] + j.
            offset = np.repeat(table.first[order - 1][where] - np.concatenate([[0], matches.cumsum()[:-1]]), matches)
            at = offset + np.arange(entry.size)
            ref_weight = table.weight[order - 1][at]
            clipped = np.minimum(weight[entry], ref_weight) * ref_weight
            # (bincount of no entries is int64 even with weights.)
            dot = np.bincount(text[entry] * most_refs + table.slot[order - 1][at], clipped, minlength=n_slots)
            dot = dot.astype(np.float64, copy=False).reshape(n_candidates, most_refs)
            denominator = norm[:, None] * table.norms[reference, order - 1]
            # pycocoevalcap divides only when both norms are non-zero; the dot product is then 0 anyway.
            similarity += np.divide(dot, denominator, out=dot.copy(), where=denominator != 0)
        delta = (self._lengths(encoded.n_words[:n_candidates])[:, None] - table.lengths[reference]).astype(np.float64)
        penalty = np.e ** (-(delta**2) / (2 * self.sigma**2))
        total = np.where(valid, similarity * penalty, 0.0).sum(axis=1)
        return total / self.n / table.count[items] * 10.0


def coco_cider_d(
    candidates: Sequence[str],
    references: Sequence[Sequence[str]],
    *,
    document_frequency_references: Sequence[Sequence[str]] | None = None,
    n: int = 4,
    sigma: float = 6.0,
) -> np.ndarray:
    """pycocoevalcap's ``CiderScorer`` itself, with document frequencies from other references: the slow reference.

    ``CiderScorer.compute_cider`` is run with ``document_frequency`` from ``document_frequency_references`` (each
    n-gram counted once per set, by ``compute_doc_freq``) and ``ref_len`` the log of their number of sets. Without
    ``document_frequency_references`` this is ``Cider().compute_score``'s per-item scores.

    Args:
        candidates: Whitespace-tokenised captions.
        references: For each candidate, its references.
        document_frequency_references: The document sets; None = ``references``.
        n: Largest n-gram order.
        sigma: Standard deviation of the gaussian length penalty.

    Returns:
        (len(candidates),) float64 scores.
    """
    df_references = references if document_frequency_references is None else document_frequency_references
    # CiderScorer's own cook_append always counts 1..4-grams; cook with n so that n other than 4 works too.
    documents = CiderScorer(n=n, sigma=sigma)
    documents.crefs = [cook_refs(list(refs), n) for refs in df_references]
    documents.compute_doc_freq()
    scorer = CiderScorer(n=n, sigma=sigma)
    for candidate, refs in zip(candidates, references, strict=True):
        scorer.crefs.append(cook_refs(list(refs), n))
        scorer.ctest.append(cook_test(candidate, n))
    scorer.document_frequency = documents.document_frequency
    # compute_cider sets ref_len = log(len(self.crefs)) and then iterates crefs: give len() the df set count.
    scorer.crefs = _ListOfLength(scorer.crefs, len(df_references))
    return np.array(scorer.compute_cider(), dtype=np.float64)


class _ListOfLength(list):
    """A list whose ``len()`` is a given number; iteration still sees its real elements."""

    def __init__(self, items, length: int):
        super().__init__(items)
        self._length = length

    def __len__(self) -> int:
        return self._length


def _captions(captions: Sequence[str], name: str) -> list[str]:
    if isinstance(captions, str):
        raise DataError(f"{name} must be a sequence of caption strings, got one string")
    captions = list(captions)
    not_text = [i for i, caption in enumerate(captions) if not isinstance(caption, str)]
    if not_text:
        raise DataError(f"{name} must be caption strings; not a string at positions {not_text[:10]}")
    return captions


def _reference_lists(references: Sequence[Sequence[str]], name: str) -> list[list[str]]:
    if isinstance(references, str) or not len(references):
        raise DataError(f"{name} must be a non-empty sequence of reference lists (one per item)")
    lists = []
    for i, refs in enumerate(references):
        # A bare string would be read as one reference per character.
        if isinstance(refs, str):
            raise DataError(f"{name}[{i}] must be a sequence of caption strings, got one string")
        lists.append(_captions(refs, f"{name}[{i}]"))
        if not lists[-1]:
            raise DataError(f"{name}[{i}] has no reference caption; each item needs at least one")
    return lists
