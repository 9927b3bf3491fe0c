"""Caption metrics: the coco-caption demo reproduced exactly, per-item scores, SPICE present or honestly absent."""

import json
import logging
import stat
import sys
import zipfile
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from avlm.errors import AvlmError, ConfigError, DataError
from avlm.metrics import (
    BLEU_NAMES,
    COCO_CAPTION_NAMES,
    ITEM_AVERAGED_METRICS,
    CaptionScorer,
    SpiceConfig,
    caption_metrics_for_logging,
    captioning,
    normalize_caption,
    spice_unavailable_reason,
)

# <repo root>/../shared: beside this checkout here, and beside CI's clone too.
ORACLE_DIR = Path(__file__).resolve().parents[2].parent / "shared" / "oracles" / "coco_caption_demo"
TOLERANCE = 1e-9

SMALL_PREDICTIONS = {
    "clip_a": "A dog barks twice.",
    "clip_b": "Rain falls on a metal roof",
    "clip_c": "a car passes by",
}
SMALL_REFERENCES = {
    "clip_a": ["A dog is barking.", "a dog barks loudly", "Dog barking outside"],
    "clip_b": ["Heavy rain falls on a tin roof", "rain falling onto a roof"],
    "clip_c": ["A car drives past", "a vehicle passes by on a road", "traffic noise"],
}


@pytest.fixture(scope="module")
def scorer():
    """One METEOR JVM for the module (its start costs about 15 s); closed at the end."""
    with CaptionScorer() as caption_scorer:
        yield caption_scorer


@pytest.fixture(scope="module")
def oracle():
    """(predictions, references, expected full-precision scores) of the coco-caption demo."""
    assert ORACLE_DIR.is_dir(), f"oracle folder {ORACLE_DIR} is missing (shared/ must sit beside the repo)"
    candidates = json.loads((ORACLE_DIR / "candidates.json").read_text())
    predictions = {c["image_id"]: c["caption"] for c in candidates}
    references = defaultdict(list)
    for ref in json.loads((ORACLE_DIR / "references.json").read_text()):
        references[ref["image_id"]].append(ref["caption"])
    expected = json.loads((ORACLE_DIR / "expected.json").read_text())
    return predictions, dict(references), expected


@pytest.fixture(scope="module")
def oracle_scores(scorer, oracle):
    """The demo scored once per module with the default SPICE setting of this machine."""
    predictions, references, _ = oracle
    return scorer.score(predictions, references)


@pytest.fixture
def fresh_spice_warnings(monkeypatch):
    """Forget which SPICE reasons were already warned about in this process."""
    monkeypatch.setattr(captioning, "_spice_reasons_warned", set())


@pytest.fixture
def no_corenlp(tmp_path, monkeypatch):
    """No CoreNLP jars anywhere SPICE looks: an empty $AVLM_CORENLP_DIR."""
    folder = tmp_path / "empty_corenlp"
    folder.mkdir()
    monkeypatch.setenv(captioning.CORENLP_DIR_ENV, str(folder))
    return folder


def fake_corenlp_dir(tmp_path):
    """A folder with the two jar names SPICE looks for; their (empty) contents only matter to a real JVM."""
    folder = tmp_path / "corenlp"
    folder.mkdir()
    for name in captioning.CORENLP_JARS:
        (folder / name).write_bytes(b"")
    return folder


def fake_spice_java(tmp_path):
    """A stand-in for ``java`` running SPICE: records its argv, answers F = (words in the prediction) / 10.

    Results come back in reverse order so that matching them to items by id, not position, is exercised.
    """
    script = tmp_path / "fake_java"
    script.write_text(
        f"#!{sys.executable}\n"
        "import json, sys\n"
        "from pathlib import Path\n"
        "args = sys.argv[1:]\n"
        "(Path(__file__).parent / 'argv.json').write_text(json.dumps(args))\n"
        "items = json.loads(Path(args[args.index('edu.anu.spice.SpiceScorer') + 1]).read_text())\n"
        "out = [{'image_id': it['image_id'], 'scores': {'All': {'f': len(it['test'].split()) / 10, 'pr': 0.0}}}\n"
        "       for it in reversed(items)]\n"
        "Path(args[args.index('-out') + 1]).write_text(json.dumps(out))\n"
    )
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return script


def spice_warnings(caplog):
    return [r for r in caplog.records if r.name == captioning.__name__ and r.levelno == logging.WARNING]


def test_coco_caption_demo_is_reproduced_exactly(oracle, oracle_scores):
    _, _, expected = oracle
    full_precision = expected["full_precision"]
    for name in (*BLEU_NAMES, "METEOR", "ROUGE_L", "CIDEr_D"):
        assert oracle_scores.corpus[name] == pytest.approx(full_precision[COCO_CAPTION_NAMES[name]], abs=TOLERANCE)
    if oracle_scores.spice_unavailable_reason is None:
        # Only the 3-decimal value printed by the original demo is known for SPICE.
        printed = expected["printed_in_the_original_demo"]["SPICE"]
        assert oracle_scores.spice == pytest.approx(printed, abs=5e-4)
        assert oracle_scores.spider == pytest.approx((oracle_scores.corpus["CIDEr_D"] + oracle_scores.spice) / 2)
    else:
        assert "SPICE" not in oracle_scores.corpus and "SPIDEr" not in oracle_scores.corpus
        assert oracle_scores.spice is None and oracle_scores.spider is None
        assert "CoreNLP" in oracle_scores.spice_unavailable_reason or "SPICE" in oracle_scores.spice_unavailable_reason


def test_per_item_scores_cover_every_item_and_average_only_where_documented(oracle, oracle_scores):
    predictions, _, _ = oracle
    assert set(oracle_scores.per_item) == set(oracle_scores.corpus)
    for name, items in oracle_scores.per_item.items():
        assert list(items) == list(predictions), name
        assert all(isinstance(v, float) for v in items.values()), name
    for name in set(ITEM_AVERAGED_METRICS) & set(oracle_scores.corpus):
        assert np.mean(list(oracle_scores.per_item[name].values())) == pytest.approx(
            oracle_scores.corpus[name], abs=1e-12
        )
    # BLEU and METEOR pool statistics over the corpus: their sentence-level scores average to something else
    # (on this demo BLEU_4 0.102 vs 0.191, METEOR 0.200 vs 0.195).
    for name in (*BLEU_NAMES, "METEOR"):
        assert name not in ITEM_AVERAGED_METRICS
        assert abs(np.mean(list(oracle_scores.per_item[name].values())) - oracle_scores.corpus[name]) > 1e-3, name


def test_logging_names_are_prefixed_corpus_scores(oracle_scores):
    logged = caption_metrics_for_logging(oracle_scores, prefix="val/")
    assert logged == {f"val/{name}": value for name, value in oracle_scores.corpus.items()}
    assert {"val/BLEU_4", "val/METEOR", "val/ROUGE_L", "val/CIDEr_D"} <= set(logged)
    assert all(type(v) is float for v in logged.values())
    if oracle_scores.spice_unavailable_reason is not None:
        assert "val/SPICE" not in logged and "val/SPIDEr" not in logged


def test_without_corenlp_spice_is_absent_with_a_reason_warned_once(scorer, no_corenlp, fresh_spice_warnings, caplog):
    caplog.set_level(logging.WARNING, logger=captioning.__name__)
    first = scorer.score(SMALL_PREDICTIONS, SMALL_REFERENCES)
    second = scorer.score(SMALL_PREDICTIONS, SMALL_REFERENCES)
    for scores in (first, second):
        assert "SPICE" not in scores.corpus and "SPIDEr" not in scores.corpus
        assert "SPICE" not in scores.per_item and "SPIDEr" not in scores.per_item
        assert scores.spice is None and scores.spider is None
        assert "val/SPICE" not in caption_metrics_for_logging(scores)
        assert scores.corpus["CIDEr_D"] > 0
    reason = first.spice_unavailable_reason
    assert reason == second.spice_unavailable_reason
    # The reason says what is missing, where it was looked for and how to provide it.
    assert str(no_corenlp) in reason and "stanford-corenlp-3.6.0-models.jar" in reason
    assert "AVLM_CORENLP_DIR" in reason and "download=True" in reason
    warnings = spice_warnings(caplog)
    assert len(warnings) == 1 and reason in warnings[0].getMessage()


def test_spice_off_is_absent_without_a_warning(scorer, fresh_spice_warnings, caplog):
    caplog.set_level(logging.WARNING, logger=captioning.__name__)
    scores = scorer.score(SMALL_PREDICTIONS, SMALL_REFERENCES, spice=False)
    assert scores.spice is None and "spice=False" in scores.spice_unavailable_reason
    assert not spice_warnings(caplog)


def test_a_failing_spice_jvm_is_reported_not_scored(scorer, tmp_path, fresh_spice_warnings, caplog):
    # Empty files named like the CoreNLP jars: the real JVM starts SPICE, which cannot load CoreNLP's classes.
    config = SpiceConfig(corenlp_dir=str(fake_corenlp_dir(tmp_path)), max_heap="256m")
    scores = scorer.score(SMALL_PREDICTIONS, SMALL_REFERENCES, spice=config)
    assert scores.spice is None
    assert "exited with status 1" in scores.spice_unavailable_reason
    assert "NoClassDefFoundError" in scores.spice_unavailable_reason
    assert len(spice_warnings(caplog)) == 1


def test_spider_is_the_item_mean_of_cider_d_and_spice(scorer, tmp_path, fresh_spice_warnings):
    config = SpiceConfig(corenlp_dir=str(fake_corenlp_dir(tmp_path)), java=str(fake_spice_java(tmp_path)))
    scores = scorer.score(SMALL_PREDICTIONS, SMALL_REFERENCES, spice=config)
    assert scores.spice_unavailable_reason is None
    # The fake answers words / 10 of the PTB-tokenised prediction (lowercased, final "." dropped).
    assert scores.per_item["SPICE"] == {"clip_a": 0.4, "clip_b": 0.6, "clip_c": 0.4}
    for item_id in SMALL_PREDICTIONS:
        expected = (scores.per_item["CIDEr_D"][item_id] + scores.per_item["SPICE"][item_id]) / 2
        assert scores.per_item["SPIDEr"][item_id] == pytest.approx(expected, abs=1e-15)
    assert scores.spice == pytest.approx(1.4 / 3, abs=1e-15)
    assert scores.spider == pytest.approx((scores.corpus["CIDEr_D"] + scores.spice) / 2, abs=1e-12)
    assert list(scores.corpus)[-2:] == ["SPICE", "SPIDEr"]
    assert {"val/SPICE", "val/SPIDEr"} <= set(caption_metrics_for_logging(scores))

    argv = json.loads((tmp_path / "argv.json").read_text())
    assert "-cache" not in argv  # SPICE's LMDB cache crashes on Java >= 16
    assert {"-subset", "-silent", "-out"} <= set(argv)
    classpath = argv[argv.index("-cp") + 1]
    assert all(name in classpath for name in (*captioning.CORENLP_JARS, "spice-1.0.jar"))


def test_opt_in_download_unpacks_the_two_jars(tmp_path, monkeypatch):
    archive = tmp_path / "corenlp.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for name in captioning.CORENLP_JARS:
            zipped.writestr(f"stanford-corenlp-full-2015-12-09/{name}", f"contents of {name}")
        zipped.writestr("stanford-corenlp-full-2015-12-09/README.txt", "not needed")
    monkeypatch.setattr(captioning, "CORENLP_ZIP_URL", archive.as_uri())
    target = tmp_path / "downloaded"
    jars = captioning._corenlp_jars(SpiceConfig(corenlp_dir=str(target), download=True))
    assert [jar.read_text() for jar in jars] == [f"contents of {name}" for name in captioning.CORENLP_JARS]
    assert sorted(p.name for p in target.iterdir()) == sorted(captioning.CORENLP_JARS)


def test_a_failed_download_is_a_reason_not_a_hang(tmp_path, monkeypatch):
    monkeypatch.setattr(captioning, "CORENLP_ZIP_URL", (tmp_path / "no_such.zip").as_uri())
    target = tmp_path / "downloaded"
    with pytest.raises(captioning._SpiceUnavailable, match="downloading Stanford CoreNLP 3.6.0 .* failed"):
        captioning._corenlp_jars(SpiceConfig(corenlp_dir=str(target), download=True))
    assert list(target.iterdir()) == []


def test_mismatched_ids_are_an_error_naming_them():
    with pytest.raises(DataError, match=r"without references: 'clip_x'.*without a prediction: 'clip_c'"):
        CaptionScorer().score(
            {"clip_a": "a dog", "clip_b": "rain", "clip_x": "wind"},
            {"clip_a": ["a dog"], "clip_b": ["rain"], "clip_c": ["a car"]},
        )


@pytest.mark.parametrize(
    ("references", "message"),
    [
        ({"a": [], "b": ["rain"]}, r"at least one reference.*'a'"),
        ({"a": "a dog barks", "b": ["rain"]}, r"sequence of caption strings.*'a'"),
        ({"a": ["a dog"], "b": [None]}, r"sequence of caption strings.*'b'"),
    ],
)
def test_items_without_usable_references_are_an_error_naming_them(references, message):
    with pytest.raises(DataError, match=message):
        CaptionScorer().score({"a": "a dog", "b": "rain"}, references)


def test_missing_java_is_an_error_saying_so(monkeypatch):
    monkeypatch.setenv("PATH", "")
    with pytest.raises(AvlmError, match="no 'java' on PATH"):
        CaptionScorer().score({"a": "a dog"}, {"a": ["a dog"]})


@pytest.mark.parametrize(
    ("caption", "normalized"),
    [
        ("A dog barks, then a car passes.", "a dog barks then a car passes"),
        ("  Birds   chirp\tloudly!\n", "birds chirp loudly"),
        ("A man's voice; a HIGH-pitched whistle", "a mans voice a high pitched whistle"),
        ("Rain \u201cfalls\u201d \u2014 softly\u2026 (outside)", "rain falls softly outside"),
        ("...", ""),
        ("", ""),
    ],
)
def test_normalize_caption(caption, normalized):
    assert normalize_caption(caption) == normalized
    assert normalize_caption(normalized) == normalized


def test_spice_config_is_validated_and_finds_corenlp_in_order(monkeypatch, tmp_path):
    with pytest.raises(ConfigError, match="threads"):
        SpiceConfig(threads=-1)
    with pytest.raises(ConfigError, match="max_heap"):
        SpiceConfig(max_heap="lots")
    monkeypatch.delenv(captioning.CORENLP_DIR_ENV, raising=False)
    assert SpiceConfig().resolved_corenlp_dir() == Path(captioning.pycocoevalcap.spice.__file__).parent / "lib"
    monkeypatch.setenv(captioning.CORENLP_DIR_ENV, str(tmp_path))
    assert SpiceConfig().resolved_corenlp_dir() == tmp_path
    assert SpiceConfig(corenlp_dir="~/corenlp").resolved_corenlp_dir() == Path.home() / "corenlp"


def test_spice_preflight_names_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("AVLM_CORENLP_DIR", str(tmp_path))
    reason = spice_unavailable_reason(SpiceConfig())
    assert reason is not None and str(tmp_path) in reason and "AVLM_CORENLP_DIR" in reason
    assert spice_unavailable_reason(False) == "SPICE was not requested (spice=False)"
    assert "not found" in spice_unavailable_reason(SpiceConfig(java="no-such-java"))
    for name in ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar"):
        (tmp_path / name).write_bytes(b"")
    assert spice_unavailable_reason(SpiceConfig()) is None  # jars and java present: SPICE can start
