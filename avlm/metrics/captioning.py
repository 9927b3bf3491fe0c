"""Caption metrics of the coco-caption toolkit (pycocoevalcap): BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, SPICE, SPIDEr.

Scoring follows coco-caption's ``COCOEvalCap.evaluate`` exactly: references and predictions go through
pycocoevalcap's PTB tokenizer (which lowercases and drops punctuation tokens), then through its scorers, so the
coco-caption demo is reproduced to 1e-9 (``tests/metrics/test_captioning.py``). Any further normalisation is the
caller's: apply :func:`normalize_caption` to references and predictions alike before scoring.

Metric names (the keys of :attr:`CaptionScores.corpus` and :attr:`CaptionScores.per_item`)::

    BLEU_1 .. BLEU_4   coco-caption's Bleu_1 .. Bleu_4 (closest reference length)
    METEOR             METEOR 1.5, English, normalised
    ROUGE_L            ROUGE-L F-measure, beta = 1.2
    CIDEr_D            coco-caption's "CIDEr", which is CIDEr-D (clipped counts, length penalty, sigma 6)
    SPICE              SPICE 1.0 F-score over all tuples          (absent when SPICE cannot run)
    SPIDEr             mean over items of (CIDEr-D + SPICE) / 2    (absent when SPICE is)

Per-item scores exist for every metric. The corpus score is the mean of the per-item scores only for
:data:`ITEM_AVERAGED_METRICS`; BLEU pools n-gram counts and lengths over the corpus and METEOR pools its matching
statistics, so their per-item values are sentence-level scores that do not average to the corpus score. CIDEr-D's
per-item values use document frequencies from all references being scored, so they depend on the whole set.

SPICE needs Stanford CoreNLP 3.6.0 (``stanford-corenlp-3.6.0.jar`` and ``stanford-corenlp-3.6.0-models.jar``,
from :data:`CORENLP_ZIP_URL`), which pycocoevalcap downloads on first use without a timeout. Here the jars are
looked up in one folder: ``SpiceConfig.corenlp_dir``, else ``$AVLM_CORENLP_DIR``, else pycocoevalcap's
``spice/lib`` (where its own downloader puts them). The download (about 400 MB) is opt-in
(``SpiceConfig(download=True)``) and has a socket timeout: a validation pass should not silently start a large
download, nor wait on a network that drops packets. SPICE runs as ``java -cp <spice jar>:<CoreNLP jars>
edu.anu.spice.SpiceScorer`` rather than ``java -jar`` so the jars can live outside site-packages, and without
``-cache``, whose LMDB cache crashes on Java >= 16. When SPICE cannot run, SPICE and SPIDEr are left out of the
scores, :attr:`CaptionScores.spice_unavailable_reason` says why, and one warning per distinct reason is logged.

Java processes: the PTB tokenizer and SPICE run once per call and end; METEOR's JVM (about 15 s to load its
paraphrase table) is kept by a :class:`CaptionScorer` across calls and ended by :meth:`CaptionScorer.close`.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import logging
import math
import os
import re
import shutil
import subprocess
import tempfile
import threading
import unicodedata
import urllib.request
import zipfile
from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pycocoevalcap.spice
from pycocoevalcap.bleu.bleu import Bleu
from pycocoevalcap.cider.cider import Cider
from pycocoevalcap.meteor.meteor import Meteor
from pycocoevalcap.rouge.rouge import Rouge
from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

from avlm.errors import AvlmError, ConfigError, DataError

logger = logging.getLogger(__name__)

BLEU_NAMES: tuple[str, ...] = ("BLEU_1", "BLEU_2", "BLEU_3", "BLEU_4")
CAPTION_METRIC_NAMES: tuple[str, ...] = (*BLEU_NAMES, "METEOR", "ROUGE_L", "CIDEr_D", "SPICE", "SPIDEr")
# Our name -> the name coco-caption (pycocoevalcap's COCOEvalCap) prints and stores.
COCO_CAPTION_NAMES: dict[str, str] = {
    **{name: f"Bleu_{name[-1]}" for name in BLEU_NAMES},
    "METEOR": "METEOR",
    "ROUGE_L": "ROUGE_L",
    "CIDEr_D": "CIDEr",
    "SPICE": "SPICE",
}
# Metrics whose corpus score is exactly the mean of their per-item scores (bootstrap by resampling items is valid).
ITEM_AVERAGED_METRICS: tuple[str, ...] = ("ROUGE_L", "CIDEr_D", "SPICE", "SPIDEr")

CORENLP_DIR_ENV = "AVLM_CORENLP_DIR"
CORENLP_JARS: tuple[str, ...] = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")
CORENLP_ZIP_URL = "https://nlp.stanford.edu/software/stanford-corenlp-full-2015-12-09.zip"
_CORENLP_ZIP_FOLDER = "stanford-corenlp-full-2015-12-09"
_SPICE_DIR = Path(pycocoevalcap.spice.__file__).resolve().parent
_SPICE_JAR = "spice-1.0.jar"
_SPICE_MAIN_CLASS = "edu.anu.spice.SpiceScorer"

# Apostrophes join ("dog's" -> "dogs"); every other punctuation mark or ASCII symbol separates ("high-pitched").
_APOSTROPHES = re.compile(r"['\u2018\u2019\u02bc`]")
_ASCII_PUNCTUATION = frozenset('!"#$%&()*+,-./:;<=>?@[\\]^_{|}~')

# Reasons already warned about in this process: each is said once, not at every validation pass.
_spice_reasons_warned: set[str] = set()


def normalize_caption(text: str) -> str:
    """Lowercase a caption, strip its punctuation and collapse its whitespace.

    This is the normalisation the captioning recipe applies identically to references and predictions before
    :func:`score_captions`; the scorer itself only applies the PTB tokenizer, as coco-caption does. Apostrophes
    are deleted so possessives and contractions stay one word; every other punctuation mark (Unicode category
    P*, e.g. ``, . ; - — “ …``) and ASCII symbol (``$ + < = > ^ | ~``) becomes a space, so hyphenated words split.

    Examples: ``"A man's voice, then a high-pitched beep!"`` -> ``"a mans voice then a high pitched beep"``;
    ``"  Birds\\tchirp \\n"`` -> ``"birds chirp"``.

    Args:
        text: A caption as written.

    Returns:
        The normalised caption: lowercase words separated by single spaces, no leading or trailing space.
    """
    text = _APOSTROPHES.sub("", text.lower())
    spaced = "".join(" " if ch in _ASCII_PUNCTUATION or unicodedata.category(ch).startswith("P") else ch for ch in text)
    return " ".join(spaced.split())


@dataclass(frozen=True)
class SpiceConfig:
    """Where SPICE finds Stanford CoreNLP 3.6.0 and how its JVM runs.

    Attributes:
        corenlp_dir: Folder holding ``stanford-corenlp-3.6.0.jar`` and ``stanford-corenlp-3.6.0-models.jar``;
            empty = ``$AVLM_CORENLP_DIR``, else pycocoevalcap's ``spice/lib``.
        download: Fetch :data:`CORENLP_ZIP_URL` (about 400 MB) and unpack the two jars into that folder when they
            are missing. Off by default so that scoring never starts a large download unasked.
        download_timeout_s: Socket timeout of the download (connecting and each read), so a dead network fails
            instead of hanging.
        java: Java executable for SPICE (any Java >= 8; SPICE runs without its cache, which breaks on Java >= 16).
        max_heap: JVM maximum heap for SPICE (``-Xmx``); pycocoevalcap uses 8G.
        threads: SPICE parser threads; 0 = SPICE's default (all processors).
        timeout_s: Give up on SPICE after this many seconds and report it unavailable; 0 = no limit.
    """

    corenlp_dir: str = ""
    download: bool = False
    download_timeout_s: float = 30.0
    java: str = "java"
    max_heap: str = "8G"
    threads: int = 0
    timeout_s: float = 0.0

    def __post_init__(self):
        if self.download_timeout_s <= 0:
            raise ConfigError(f"spice.download_timeout_s must be > 0, got {self.download_timeout_s}")
        if self.threads < 0:
            raise ConfigError(f"spice.threads must be >= 0 (0 = all processors), got {self.threads}")
        if self.timeout_s < 0:
            raise ConfigError(f"spice.timeout_s must be >= 0 (0 = no limit), got {self.timeout_s}")
        if not re.fullmatch(r"\d+[kKmMgG]?", self.max_heap):
            raise ConfigError(f"spice.max_heap must be a JVM size such as 8G or 4096m, got {self.max_heap!r}")

    def resolved_corenlp_dir(self) -> Path:
        """The folder searched for (and downloaded into) the CoreNLP jars: see :attr:`corenlp_dir`."""
        return Path(self.corenlp_dir or os.environ.get(CORENLP_DIR_ENV) or _SPICE_DIR / "lib").expanduser()


@dataclass(frozen=True)
class CaptionScores:
    """Corpus and per-item caption scores; see the module docstring for the metric names.

    Attributes:
        corpus: Metric name -> corpus score, in :data:`CAPTION_METRIC_NAMES` order; SPICE and SPIDEr are absent
            when SPICE did not run.
        per_item: Metric name -> {item id: score} for the same metrics, items in the predictions' order.
        spice_unavailable_reason: Why SPICE and SPIDEr are absent (what is missing and how to provide it);
            None when they are present.
    """

    corpus: dict[str, float]
    per_item: dict[str, dict[Hashable, float]]
    spice_unavailable_reason: str | None = None

    @property
    def spice(self) -> float | None:
        """Corpus SPICE, or None when it could not be computed."""
        return self.corpus.get("SPICE")

    @property
    def spider(self) -> float | None:
        """Corpus SPIDEr, or None when SPICE could not be computed."""
        return self.corpus.get("SPIDEr")


class CaptionScorer:
    """Scores predicted captions against references; keeps METEOR's JVM between calls until :meth:`close`.

    Use it as a context manager, or call :meth:`close`, so the METEOR process does not outlive the evaluation::

        with CaptionScorer(spice=False) as scorer:      # e.g. one scorer for a whole training run
            for epoch in ...:
                scores = scorer.score(predictions, references)

    Args:
        spice: Default SPICE setting for :meth:`score`: a :class:`SpiceConfig`, True for the default config, or
            False to skip SPICE (and SPIDEr).
    """

    def __init__(self, *, spice: SpiceConfig | bool = True):
        self.spice = spice
        self._meteor: _ClosableMeteor | None = None
        self._meteor_lock = threading.Lock()

    def __enter__(self) -> CaptionScorer:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        """End METEOR's Java process; a later :meth:`score` starts a new one."""
        with self._meteor_lock:
            if self._meteor is not None:
                self._meteor.close()
                self._meteor = None

    def score(
        self,
        predictions: Mapping[Hashable, str],
        references: Mapping[Hashable, Sequence[str]],
        *,
        spice: SpiceConfig | bool | None = None,
    ) -> CaptionScores:
        """Score one caption per item against that item's references.

        Args:
            predictions: Item id -> predicted caption.
            references: Item id -> one or more reference captions; the same ids as ``predictions``.
            spice: Overrides the scorer's SPICE setting for this call (None = keep it).

        Returns:
            Corpus and per-item scores of every metric that could run.

        Raises:
            DataError: ids differ between predictions and references, an item has no reference, or a caption is
                not a string (the message names the ids).
            AvlmError: no Java runtime on PATH, or METEOR's Java process failed.
        """
        item_ids = check_caption_items(predictions, references)
        if shutil.which("java") is None:
            raise AvlmError(
                "no 'java' on PATH: pycocoevalcap's PTB tokenizer and METEOR need a Java runtime "
                "(e.g. apt-get install default-jre-headless)"
            )
        # Scorers see items by position: hashable ids of any type, and JSON-safe keys for SPICE.
        gts, res = ptb_tokenize([list(references[i]) for i in item_ids], [predictions[i] for i in item_ids])

        per_item: dict[str, list[float]] = {}
        corpus: dict[str, float] = {}
        bleu, bleu_items = Bleu(4).compute_score(gts, res, verbose=0)
        for name, value, values in zip(BLEU_NAMES, bleu, bleu_items, strict=True):
            corpus[name], per_item[name] = value, values
        corpus["METEOR"], per_item["METEOR"] = self._meteor_scores(gts, res)
        corpus["ROUGE_L"], per_item["ROUGE_L"] = Rouge().compute_score(gts, res)
        corpus["CIDEr_D"], per_item["CIDEr_D"] = Cider().compute_score(gts, res)

        spice_config = _as_spice_config(self.spice if spice is None else spice)
        spice_items, reason = None, "SPICE was not requested (spice=False)"
        if spice_config is not None:
            try:
                spice_items = _run_spice(gts, res, spice_config)
                reason = None
            except _SpiceUnavailable as unavailable:
                reason = str(unavailable)
                _warn_spice_unavailable_once(reason)
        if spice_items is not None:
            per_item["SPICE"] = spice_items
            per_item["SPIDEr"] = [(c + s) / 2 for c, s in zip(per_item["CIDEr_D"], spice_items, strict=True)]
            # pycocoevalcap's SPICE corpus score is the plain mean (an undefined item F makes it NaN).
            corpus["SPICE"] = float(np.mean(spice_items))
            corpus["SPIDEr"] = float(np.mean(per_item["SPIDEr"]))

        return CaptionScores(
            corpus={name: float(value) for name, value in corpus.items()},
            per_item={
                name: {item_id: float(v) for item_id, v in zip(item_ids, values, strict=True)}
                for name, values in per_item.items()
            },
            spice_unavailable_reason=reason,
        )

    def _meteor_scores(self, gts: dict[int, list[str]], res: dict[int, list[str]]) -> tuple[float, list[float]]:
        with self._meteor_lock:
            if self._meteor is None:
                self._meteor = _ClosableMeteor()
            try:
                return self._meteor.compute_score(gts, res)
            except Exception as err:
                # The JVM died or answered garbage: drop it (its lock may still be held) and start afresh next call.
                stderr = self._meteor.close()
                self._meteor = None
                raise AvlmError(f"METEOR's Java process failed ({err!r}); its stderr ends with: {stderr}") from err


def score_captions(
    predictions: Mapping[Hashable, str],
    references: Mapping[Hashable, Sequence[str]],
    *,
    spice: SpiceConfig | bool = True,
) -> CaptionScores:
    """Score captions once with a fresh :class:`CaptionScorer` and end its METEOR process.

    Every call pays METEOR's JVM start (about 15 s); hold a :class:`CaptionScorer` to score repeatedly.

    Args:
        predictions: Item id -> predicted caption.
        references: Item id -> one or more reference captions; the same ids as ``predictions``.
        spice: A :class:`SpiceConfig`, True for the default config, or False to skip SPICE and SPIDEr.

    Returns:
        Corpus and per-item scores (see :class:`CaptionScores`).

    Raises:
        DataError: ids differ, an item has no reference, or a caption is not a string.
        AvlmError: no Java runtime, or METEOR's Java process failed.
    """
    with CaptionScorer(spice=spice) as scorer:
        return scorer.score(predictions, references)


def spice_unavailable_reason(spice: SpiceConfig | bool = True) -> str | None:
    """Why SPICE cannot run with this setting (no Java, no CoreNLP jars, not requested), or None when it can start.

    A recipe asks before training so that it can declare its monitored metric (SPIDEr, or CIDEr-D without SPICE)
    up front; with ``download=True`` this fetches the jars.
    """
    config = _as_spice_config(spice)
    if config is None:
        return "SPICE was not requested (spice=False)"
    if shutil.which(config.java) is None:
        return f"Java executable {config.java!r} not found; install a Java runtime or set SpiceConfig.java"
    try:
        _corenlp_jars(config)
    except _SpiceUnavailable as unavailable:
        return str(unavailable)
    return None


def spice_item_scores(
    candidates: Sequence[str], references: Sequence[Sequence[str]], spice: SpiceConfig | bool = True
) -> list[float]:
    """SPICE F-score of each candidate against its references, for text the caller has already tokenised
    (lowercase, space-separated, as :func:`normalize_caption` leaves it): no PTB tokenizer run, e.g. for an
    SCST reward.

    Raises:
        AvlmError: SPICE cannot run (the reason, as :func:`spice_unavailable_reason` gives it).
    """
    config = _as_spice_config(spice)
    if config is None:
        raise AvlmError("SPICE was not requested (spice=False)")
    gts = {i: list(refs) for i, refs in enumerate(references)}
    res = {i: [candidate] for i, candidate in enumerate(candidates)}
    try:
        return _run_spice(gts, res, config)
    except _SpiceUnavailable as unavailable:
        raise AvlmError(f"SPICE cannot run: {unavailable}") from None


def caption_metrics_for_logging(scores: CaptionScores, prefix: str = "val/") -> dict[str, float]:
    """Corpus scores as flat metric names for the run logger, e.g. ``val/BLEU_4``, ``val/CIDEr_D``, ``val/SPIDEr``.

    Args:
        scores: Result of :func:`score_captions` or :meth:`CaptionScorer.score`.
        prefix: Namespace put before each metric name.

    Returns:
        Prefixed name -> float for every metric present; SPICE and SPIDEr are left out when absent.
    """
    return {f"{prefix}{name}": float(value) for name, value in scores.corpus.items()}


class _SpiceUnavailable(Exception):
    """SPICE cannot run here; the message says what is missing and how to provide it."""


class _ClosableMeteor(Meteor):
    """pycocoevalcap's Meteor with a close() that cannot deadlock.

    ``Meteor.__del__`` takes the scorer's lock before killing the JVM, but ``compute_score`` leaves that lock held
    when it raises, so garbage collection would then block forever. The owner serialises calls itself.
    """

    def close(self) -> str:
        """Kill the JVM, reap it and close its pipes; return the last 500 characters of its stderr."""
        process = getattr(self, "meteor_p", None)
        if process is None:
            return ""
        if process.poll() is None:
            process.kill()
        process.wait()
        stderr = b""
        with contextlib.suppress(OSError, ValueError):
            stderr = process.stderr.read()
        for stream in (process.stdin, process.stdout, process.stderr):
            with contextlib.suppress(OSError):  # a pending write to a dead JVM fails on flush
                stream.close()
        return stderr.decode(errors="replace").strip()[-500:]

    def __del__(self):
        self.close()


def check_caption_items(predictions: Mapping[Hashable, str], references: Mapping[Hashable, Sequence[str]]) -> list:
    """Return the item ids in prediction order, or raise DataError naming the ids that do not fit."""
    if not predictions:
        raise DataError("no predictions to score")
    missing_references = [i for i in predictions if i not in references]
    missing_predictions = [i for i in references if i not in predictions]
    if missing_references or missing_predictions:
        parts = []
        if missing_references:
            parts.append(f"without references: {_name_ids(missing_references)}")
        if missing_predictions:
            parts.append(f"without a prediction: {_name_ids(missing_predictions)}")
        raise DataError(f"predictions and references must have the same item ids; ids {'; '.join(parts)}")
    not_text = [i for i, caption in predictions.items() if not isinstance(caption, str)]
    if not_text:
        raise DataError(f"each prediction must be one caption string; not a string for ids {_name_ids(not_text)}")
    # A bare string would be read as one reference per character.
    bad_references = [
        i
        for i, captions in references.items()
        if isinstance(captions, (str, bytes))
        or not isinstance(captions, Iterable)
        or not all(isinstance(c, str) for c in captions)
    ]
    if bad_references:
        raise DataError(
            f"references must be a sequence of caption strings per item; not so for ids {_name_ids(bad_references)}"
        )
    empty = [i for i, captions in references.items() if not list(captions)]
    if empty:
        raise DataError(f"each item needs at least one reference caption; none for ids {_name_ids(empty)}")
    return list(predictions)


def _name_ids(ids: Sequence[Hashable], shown: int = 10) -> str:
    named = ", ".join(repr(i) for i in ids[:shown])
    return named + (f" and {len(ids) - shown} more" if len(ids) > shown else "")


def ptb_tokenize(
    references: Sequence[Sequence[str]], predictions: Sequence[str]
) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """PTB-tokenise references and predictions in one JVM run; return (gts, res) keyed by item position."""
    captions: dict[tuple[str, int], list[dict[str, str]]] = {}
    for position, (refs, prediction) in enumerate(zip(references, predictions, strict=True)):
        # The tokenizer reads one caption per line; a line break inside a caption would shift every later one.
        captions[("ref", position)] = [{"caption": " ".join(ref.splitlines())} for ref in refs]
        captions[("pred", position)] = [{"caption": " ".join(prediction.splitlines())}]
    tokenized = PTBTokenizer().tokenize(captions)
    if any(len(tokenized.get(key, ())) != len(value) for key, value in captions.items()):
        raise DataError("the PTB tokenizer returned a different number of captions than it was given")
    gts = {position: tokenized[("ref", position)] for position in range(len(predictions))}
    res = {position: tokenized[("pred", position)] for position in range(len(predictions))}
    return gts, res


def _as_spice_config(spice: SpiceConfig | bool) -> SpiceConfig | None:
    if isinstance(spice, SpiceConfig):
        return spice
    if isinstance(spice, bool):
        return SpiceConfig() if spice else None
    raise ConfigError(f"spice must be a SpiceConfig or a bool, got {spice!r}")


def _warn_spice_unavailable_once(reason: str) -> None:
    if reason in _spice_reasons_warned:
        return
    _spice_reasons_warned.add(reason)
    logger.warning("SPICE and SPIDEr are left out of the caption scores: %s", reason)


def _run_spice(gts: dict[int, list[str]], res: dict[int, list[str]], config: SpiceConfig) -> list[float]:
    """Per-item SPICE F-scores (items by position), or raise _SpiceUnavailable saying why SPICE cannot run."""
    java = shutil.which(config.java)
    if java is None:
        raise _SpiceUnavailable(
            f"Java executable {config.java!r} not found; install a Java runtime or set SpiceConfig.java"
        )
    corenlp_jars = _corenlp_jars(config)
    with tempfile.TemporaryDirectory(prefix="avlm_spice_") as tmp:
        in_path, out_path = Path(tmp) / "input.json", Path(tmp) / "output.json"
        # The input pycocoevalcap's Spice writes: tokenised prediction and references per item.
        items = [{"image_id": position, "test": res[position][0], "refs": gts[position]} for position in sorted(gts)]
        in_path.write_text(json.dumps(items))
        classpath = os.pathsep.join([str(_SPICE_DIR / _SPICE_JAR), *map(str, corenlp_jars)])
        command = [java, f"-Xmx{config.max_heap}", "-cp", classpath, _SPICE_MAIN_CLASS, str(in_path)]
        command += ["-out", str(out_path), "-subset", "-silent"]
        if config.threads:
            command += ["-threads", str(config.threads)]
        try:
            # spice-1.0.jar's manifest finds its other jars relative to itself; cwd=tmp keeps site-packages clean.
            done = subprocess.run(command, cwd=tmp, capture_output=True, text=True, timeout=config.timeout_s or None)
        except subprocess.TimeoutExpired:
            raise _SpiceUnavailable(
                f"SPICE did not finish within {config.timeout_s:g} s; raise SpiceConfig.timeout_s (0 = no limit)"
            ) from None
        except OSError as err:
            raise _SpiceUnavailable(f"could not start SPICE with {java}: {err}") from None
        if done.returncode != 0:
            raise _SpiceUnavailable(
                f"SPICE ({_SPICE_MAIN_CLASS} with {', '.join(map(str, corenlp_jars))}) exited with status "
                f"{done.returncode}: {_java_error_line(done.stderr or done.stdout)}"
            )
        try:
            results = json.loads(out_path.read_text())
            f_by_position = {item["image_id"]: _as_float(item["scores"]["All"]["f"]) for item in results}
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise _SpiceUnavailable(f"SPICE wrote no readable scores to {out_path.name}: {err!r}") from None
    missing = [position for position in gts if position not in f_by_position]
    if missing:
        raise _SpiceUnavailable(f"SPICE returned no score for {len(missing)} of {len(gts)} items")
    return [f_by_position[position] for position in sorted(gts)]


def _corenlp_jars(config: SpiceConfig) -> list[Path]:
    """Paths of the two CoreNLP jars, downloading them if allowed; raise _SpiceUnavailable when they are missing."""
    folder = config.resolved_corenlp_dir()
    jars = [folder / name for name in CORENLP_JARS]
    missing = [jar.name for jar in jars if not jar.is_file()]
    if missing and config.download:
        _download_corenlp(folder, config.download_timeout_s)
        missing = [jar.name for jar in jars if not jar.is_file()]
    if missing:
        raise _SpiceUnavailable(
            f"Stanford CoreNLP 3.6.0 not found: {folder} has no {' or '.join(missing)}. Unpack "
            f"{CORENLP_JARS[0]} and {CORENLP_JARS[1]} from {CORENLP_ZIP_URL} into a folder and set "
            f"${CORENLP_DIR_ENV} (or SpiceConfig.corenlp_dir) to it, or use SpiceConfig(download=True) to fetch "
            "them (about 400 MB)"
        )
    return jars


def _download_corenlp(folder: Path, timeout_s: float) -> None:
    """Fetch the CoreNLP zip and unpack the two jars SPICE needs into ``folder``; raise _SpiceUnavailable on failure."""
    logger.info("Downloading %s (about 400 MB) for SPICE into %s", CORENLP_ZIP_URL, folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # Unpacked next to the target so that a failed or interrupted download leaves no half-written jar behind.
        with tempfile.TemporaryFile(dir=folder) as archive:
            with urllib.request.urlopen(CORENLP_ZIP_URL, timeout=timeout_s) as response:
                shutil.copyfileobj(response, archive)
            with zipfile.ZipFile(archive) as zipped:
                for name in CORENLP_JARS:
                    partial = folder / f"{name}.partial"
                    with zipped.open(f"{_CORENLP_ZIP_FOLDER}/{name}") as source, partial.open("wb") as target:
                        shutil.copyfileobj(source, target)
                    partial.replace(folder / name)
    except (OSError, http.client.HTTPException, zipfile.BadZipFile, KeyError) as err:
        raise _SpiceUnavailable(
            f"downloading Stanford CoreNLP 3.6.0 from {CORENLP_ZIP_URL} into {folder} failed ({err!r}); fetch it "
            f"elsewhere, unpack {CORENLP_JARS[0]} and {CORENLP_JARS[1]} into a folder and set ${CORENLP_DIR_ENV}"
        ) from None


def _java_error_line(output: str) -> str:
    """The line of a JVM's output that names its failure (the exception), else its last line."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in lines:
        if "Exception" in line or "Error" in line:
            return line[:300]
    return lines[-1][:300] if lines else "no output"


def _as_float(value) -> float:
    # SPICE writes an undefined F-score as null; pycocoevalcap reads it as NaN.
    try:
        return float(value)
    except (TypeError, ValueError):
        return math.nan
