"""avlm-score: any predictions file (avlm JSON, coco-caption JSON, CSV) scored, per-item files, an MLflow run."""

import contextlib
import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from avlm.errors import DataError
from avlm.metrics import COCO_CAPTION_NAMES, CaptionScorer, CaptionScores, normalize_caption
from avlm.metrics import score_file as score_file_module
from avlm.metrics.score_file import (
    CsvColumns,
    ScoredFile,
    ScoringItem,
    main,
    metric_table,
    read_scoring_items,
    score_file,
    write_per_item,
)

TOLERANCE = 1e-9
# coco-caption's names (expected.json's) -> ours; SPICE needs CoreNLP, which the demo's expected figures lack.
ORACLE_METRICS = {coco: ours for ours, coco in COCO_CAPTION_NAMES.items() if ours != "SPICE"}
SMALL_ROWS = [
    {"id": "clip_a", "prediction": "A dog barks twice.", "references": ["A dog is barking.", "a dog barks loudly"]},
    {"id": "clip_b", "prediction": "Rain falls on a metal roof", "references": ["Heavy rain falls on a tin roof"]},
    {"id": "clip_c", "prediction": "a car passes by", "references": ["A car drives past", "traffic noise", ""]},
]


def write_csv(path: Path, rows: list[list[str]]) -> Path:
    with open(path, "w", encoding="utf-8", newline="") as f:
        csv.writer(f).writerows(rows)
    return path


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data, indent=1))
    return path


@pytest.fixture(scope="module")
def scorer():
    """One METEOR JVM for the module (its start costs about 15 s); closed at the end."""
    with CaptionScorer(spice=False) as caption_scorer:
        yield caption_scorer


@pytest.fixture
def shared_scorer(scorer, monkeypatch):
    """main() scores with the module's scorer, left open, instead of starting a JVM per call."""
    monkeypatch.setattr(score_file_module, "CaptionScorer", lambda: contextlib.nullcontext(scorer))
    return scorer


@pytest.fixture(scope="module")
def oracle(coco_caption_demo):
    """(predictions, references, expected full-precision scores) of the coco-caption demo."""
    predictions, references, expected = coco_caption_demo
    return predictions, references, expected["full_precision"]


@pytest.fixture(scope="module")
def oracle_csv(oracle, tmp_path_factory) -> Path:
    """The demo as one CSV row per image: image_id, caption, ref_1..ref_6 (empty where an image has 5)."""
    predictions, references, _ = oracle
    width = max(len(refs) for refs in references.values())
    assert width == 6 and min(len(refs) for refs in references.values()) == 5
    rows = [["image_id", "caption", *(f"ref_{k}" for k in range(1, width + 1))]]
    rows += [
        [str(i), caption, *references[i], *[""] * (width - len(references[i]))] for i, caption in predictions.items()
    ]
    return write_csv(tmp_path_factory.mktemp("oracle_csv") / "demo.csv", rows)


def assert_reproduces_oracle(metrics: dict[str, float], expected: dict[str, float], prefix: str = "") -> None:
    for theirs, ours in ORACLE_METRICS.items():
        assert metrics[prefix + ours] == pytest.approx(expected[theirs], abs=TOLERANCE, rel=0), ours


def fake_scored(path: Path, splits: dict[str, list[ScoringItem]], spice_reason: str | None = None) -> ScoredFile:
    """A ScoredFile with made-up scores (no Java): BLEU_4 = 0.1 * position, CIDEr_D = position."""
    scores = {
        split: CaptionScores(
            corpus={"BLEU_4": 0.25, "CIDEr_D": 1.5},
            per_item={
                "BLEU_4": {item.id: 0.1 * k for k, item in enumerate(items)},
                "CIDEr_D": {item.id: float(k) for k, item in enumerate(items)},
            },
            spice_unavailable_reason=spice_reason,
        )
        for split, items in splits.items()
    }
    return ScoredFile(path, splits, scores)


# -------------------------------------------------------------------------------------------- reading CSV files


def test_csv_columns_by_glob_and_by_name_skip_empty_cells(tmp_path):
    path = write_csv(
        tmp_path / "p.csv",
        [
            ["file_name", "caption_predicted", "caption_1", "caption_2", "caption_3", "notes"],
            [" clip.wav", "a dog barks", "a dog", "", "dogs bark", "x"],
            ["b.wav", "rain, then thunder", "rain", "thunder", "storm", ""],
        ],
    )
    columns = CsvColumns(candidate="caption_predicted", references="caption_?", id="file_name")
    items = read_scoring_items(path, columns=columns)[""]
    # The id cell is stripped like every CSV field; the empty reference cell is skipped.
    assert items == [
        ScoringItem("clip.wav", "a dog barks", ("a dog", "dogs bark")),
        ScoringItem("b.wav", "rain, then thunder", ("rain", "thunder", "storm")),
    ]
    by_name = CsvColumns(candidate="caption_predicted", references="caption_3, caption_1", id="file_name")
    assert read_scoring_items(path, columns=by_name)[""][1].references == ("storm", "rain")


def test_csv_id_defaults_to_the_id_column_else_the_line(tmp_path):
    with_id = write_csv(tmp_path / "a.csv", [["id", "prediction", "reference"], ["7", "a", "b"], ["9", "c", "d"]])
    assert [i.id for i in read_scoring_items(with_id)[""]] == ["7", "9"]
    # A quoted caption spanning two lines: the next row starts on line 4.
    without = tmp_path / "b.csv"
    without.write_text('prediction,reference_1,reference_2\n"two\nlines",b,c\nd,e,\n')
    assert read_scoring_items(without)[""] == [
        ScoringItem(2, "two\nlines", ("b", "c")),
        ScoringItem(4, "d", ("e",)),
    ]


@pytest.mark.parametrize(
    ("content", "columns", "message"),
    [
        ("pred,reference\na,b\n", CsvColumns(), r"no column 'prediction' \(--candidate-col\); the columns are"),
        ("prediction,ref_1\na,b\n", CsvColumns(), r"no column matches 'reference\*' \(--reference-cols\)"),
        ("prediction,ref_1\na,b\n", CsvColumns(references="ref"), r"no column 'ref'.*write 'ref\*'"),
        ("prediction,reference\na,b\n", CsvColumns(id="key"), r"no column 'key' \(--id-col\)"),
        ("id,prediction,reference\n1,a,b\n2,c,\n", CsvColumns(), r"line 3: no reference caption in columns"),
        ("id,prediction,reference\n1,a,b\n1,c,d\n", CsvColumns(), r"line 3: id '1' repeats line 2"),
        ("id,prediction,reference\n,a,b\n", CsvColumns(id="id"), r"line 2: empty id in column 'id'"),
        ("id,prediction,reference\n1,a,b,c\n", CsvColumns(), r"line 2: row has 4 fields but the header has 3"),
    ],
    ids=["candidate", "glob", "prefix", "id", "no-reference", "repeated-id", "empty-id", "unquoted-comma"],
)
def test_bad_csv_names_file_and_column_or_line(tmp_path, content, columns, message):
    path = tmp_path / "bad.csv"
    path.write_text(content)
    with pytest.raises(DataError, match=message) as info:
        read_scoring_items(path, columns=columns)
    assert str(info.value).startswith(str(path))


# ------------------------------------------------------------------------------------------- reading JSON files


def test_avlm_predictions_json_as_a_list_or_by_split(tmp_path):
    listed = write_json(tmp_path / "val_predictions.json", [{**row, "scores": {"CIDEr_D": 0.5}} for row in SMALL_ROWS])
    items = read_scoring_items(listed)
    assert list(items) == [""]
    assert items[""][0] == ScoringItem("clip_a", "A dog barks twice.", ("A dog is barking.", "a dog barks loudly"))
    assert items[""][2].references == ("A car drives past", "traffic noise")  # the blank reference is dropped
    by_split = write_json(tmp_path / "predictions.json", {"val": SMALL_ROWS[:2], "test": SMALL_ROWS[2:]})
    assert {split: [i.id for i in its] for split, its in read_scoring_items(by_split).items()} == {
        "val": ["clip_a", "clip_b"],
        "test": ["clip_c"],
    }
    assert list(read_scoring_items(by_split, split="test")) == ["test"]
    with pytest.raises(DataError, match=r"no split 'train'; the file has splits \['val', 'test'\]"):
        read_scoring_items(by_split, split="train")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"val": [SMALL_ROWS[0], {**SMALL_ROWS[1], "prediction": 3}]}, r'item \["val"\]\[1\]: .prediction. must be a'),
        ([SMALL_ROWS[0], {"id": "x", "prediction": "a"}], r"item \[1\]: no 'references' \(give --references FILE"),
        ([{"id": "x", "prediction": "a", "references": "a b"}], r"item \[0\]: 'references' must be a list of caption"),
        ([{"id": "x", "prediction": "a", "references": [" "]}], r"item \[0\]: no reference caption"),
        ([SMALL_ROWS[0], SMALL_ROWS[0]], r"item \[1\]: id 'clip_a' repeats item \[0\]"),
        ([{"id": ["x"], "prediction": "a", "references": ["b"]}], r"item \[0\]: 'id' must be a string or an integer"),
        ([{"image_id": 1, "caption": "a"}], r"item \[0\]: a coco-style candidate .* add --references"),
        ([{"text": "a"}], r"item \[0\]: expected keys id, prediction, references \(avlm\) or image_id, caption"),
        ({"val": []}, r'\["val"\]: no predictions'),
        ("a caption", r"expected a list of predictions or \{split: \[predictions\]\}, got a string"),
    ],
    ids=["bad-prediction", "no-references", "string-references", "blank-references", "repeated-id", "bad-id",
         "coco-without-references", "unknown-keys", "empty-split", "not-a-list"],
)  # fmt: skip
def test_bad_json_names_file_and_item(tmp_path, data, message):
    path = write_json(tmp_path / "bad.json", data)
    with pytest.raises(DataError, match=message) as info:
        read_scoring_items(path)
    assert str(info.value).startswith(str(path))


def test_unreadable_files_are_named(tmp_path):
    broken = tmp_path / "broken.json"
    broken.write_text('[\n  {"id": 1,\n  "prediction": }\n]')
    with pytest.raises(DataError, match=rf"{broken}, line 3 column 17: not valid JSON"):
        read_scoring_items(broken)
    with pytest.raises(DataError, match=rf"predictions file {tmp_path / 'none.json'} does not exist"):
        read_scoring_items(tmp_path / "none.json")
    with pytest.raises(DataError, match=r"expected a \.json or \.csv file, got '\.txt'"):
        read_scoring_items(tmp_path / "p.txt")


def test_coco_references_are_matched_by_id_as_text(tmp_path):
    references = write_json(
        tmp_path / "refs.json",
        {"annotations": [{"image_id": 1, "caption": "a dog"}, {"image_id": 2, "caption": "rain"},
                         {"image_id": 1, "caption": "dog barking"}, {"image_id": 3, "caption": "unused"}]},
    )  # fmt: skip
    candidates = write_json(
        tmp_path / "cands.json", [{"image_id": 2, "caption": "rain falls"}, {"image_id": 1, "caption": "a dog"}]
    )
    assert read_scoring_items(candidates, references=references)[""] == [
        ScoringItem(2, "rain falls", ("rain",)),
        ScoringItem(1, "a dog", ("a dog", "dog barking")),
    ]
    # A CSV's ids are text: "1" finds image 1; the CSV needs no reference columns then.
    rows = write_csv(tmp_path / "p.csv", [["id", "prediction"], ["1", "dogs"]])
    assert read_scoring_items(rows, references=references)[""] == [ScoringItem("1", "dogs", ("a dog", "dog barking"))]
    unmatched = write_json(tmp_path / "more.json", [{"image_id": 5, "caption": "x"}, {"image_id": 6, "caption": "y"}])
    with pytest.raises(DataError, match=rf"{references} has no reference caption for 2 predicted item\(s\): 5, 6"):
        read_scoring_items(unmatched, references=references)
    bad = write_json(tmp_path / "bad_refs.json", [{"image_id": 1, "caption": None}])
    with pytest.raises(DataError, match=r"bad_refs\.json, item \[0\]: 'caption' must be a caption string"):
        read_scoring_items(candidates, references=bad)


# ----------------------------------------------------------------------------------------------------- outputs


def test_per_item_files_round_trip_and_hold_every_metric(tmp_path):
    items = {
        "val": [ScoringItem("a", "x y", ("x",)), ScoringItem("b", "z", ("z", "w"))],
        "test": [ScoringItem(3, "q", ("q",))],
    }
    scored = fake_scored(tmp_path / "p.json", items)
    assert scored.metrics() == {"val/BLEU_4": 0.25, "val/CIDEr_D": 1.5, "test/BLEU_4": 0.25, "test/CIDEr_D": 1.5}
    written = json.loads(write_per_item(scored, tmp_path / "out" / "per_item.json").read_text())
    assert written["val"][1] == {
        "id": "b",
        "prediction": "z",
        "references": ["z", "w"],
        "scores": {"BLEU_4": 0.1, "CIDEr_D": 1.0},
    }
    # The per-item JSON is a predictions file again.
    assert read_scoring_items(tmp_path / "out" / "per_item.json") == items
    with open(write_per_item(scored, tmp_path / "per_item.csv"), newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["split", "id", "prediction", "references", "BLEU_4", "CIDEr_D"]
    assert rows[2] == ["val", "b", "z", '["z", "w"]', "0.1", "1.0"]
    assert rows[3] == ["test", "3", "q", '["q"]', "0.0", "0.0"]
    with pytest.raises(DataError, match=r"--per-item .*out\.txt: expected a \.json or \.csv file name"):
        write_per_item(scored, tmp_path / "out.txt")
    single = fake_scored(tmp_path / "p.json", {"": items["val"]})
    assert single.metrics() == {"BLEU_4": 0.25, "CIDEr_D": 1.5}
    assert [row["id"] for row in json.loads(write_per_item(single, tmp_path / "one.json").read_text())] == ["a", "b"]


def test_metric_table_has_a_row_per_metric_and_says_why_spice_is_absent(tmp_path):
    scored = fake_scored(tmp_path / "p.json", {"": [ScoringItem("a", "x", ("x",))]}, spice_reason="no CoreNLP")
    assert metric_table(scored).splitlines() == [
        f"### Caption scores of {tmp_path / 'p.json'} (1 items)",
        "",
        "| metric | score |",
        "| --- | --- |",
        "| BLEU_4 | 0.2500 |",
        "| CIDEr_D | 1.5000 |",
        "",
        "[1] SPICE and SPIDEr absent: no CoreNLP  ",
    ]


# ------------------------------------------------------------------------------------------- the command itself


def test_main_refuses_bad_input_with_one_line_and_status_2(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("id,prediction,reference\n1,a,\n")
    assert main([str(bad)]) == 2
    err = capsys.readouterr().err
    assert err == f"avlm-score: error: {bad}, line 2: no reference caption in columns ['reference']\n"
    assert main([]) == 2
    assert "give the predictions file either as FILE or as --candidates FILE" in capsys.readouterr().err
    assert main(["--no-such-option"]) == 2
    assert main(["--help"]) == 0
    assert "--reference-cols" in capsys.readouterr().out


# ---------------------------------------------------------------------------------- scoring (Java: one scorer)


def test_oracle_csv_reproduces_coco_caption(oracle, oracle_csv, scorer):
    _, _, expected = oracle
    columns = CsvColumns(candidate="caption", references="ref_*", id="image_id")
    scored = score_file(oracle_csv, columns=columns, spice=False, scorer=scorer)
    assert len(scored.items[""]) == 1000
    assert sum(len(item.references) for item in scored.items[""]) == 5005
    assert_reproduces_oracle(scored.metrics(), expected)
    assert set(scored.metrics()) == set(ORACLE_METRICS.values())  # spice off: no SPICE, no SPIDEr


def test_main_logs_an_mlflow_run_and_writes_per_item_scores(
    oracle, oracle_csv, shared_scorer, mlflow_store, tmp_path, capsys
):
    from mlflow import MlflowClient

    _, _, expected = oracle
    per_item = tmp_path / "per_item.csv"
    argv = [str(oracle_csv), "--candidate-col", "caption", "--reference-cols", "ref_*", "--id-col", "image_id"]
    assert main([*argv, "--no-spice", "--per-item", str(per_item), "--mlflow"]) == 0
    out = capsys.readouterr().out
    assert "| CIDEr_D | 0.5998 |" in out and "| BLEU_4 | 0.1908 |" in out and "Browse it: mlflow ui" in out

    client = MlflowClient(mlflow_store)
    experiment = client.get_experiment_by_name("avlm-score")
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "score-demo"
    assert f"MLflow run {run.info.run_id} in experiment 'avlm-score'" in out
    assert_reproduces_oracle(run.data.metrics, expected)
    assert set(run.data.metrics) == set(ORACLE_METRICS.values())
    assert run.data.tags["scored_file"] == str(oracle_csv.resolve())
    assert "avlm.git_commit" in run.data.tags
    assert run.data.params["n_items"] == "1000" and run.data.params["csv.references"] == "ref_*"
    assert {a.path for a in client.list_artifacts(run.info.run_id, "scores")} == {
        "scores/per_item.json",
        "scores/per_item.csv",
    }
    logged = json.loads(
        Path(client.download_artifacts(run.info.run_id, "scores/per_item.json", str(tmp_path))).read_text()
    )
    by_id = {row["id"]: row for row in logged}
    with open(per_item, newline="") as f:
        csv_rows = {row["id"]: row for row in csv.DictReader(f)}
    assert len(by_id) == len(csv_rows) == 1000
    # Per-item values exactly as written: the JSON artifact and the CSV agree to the last digit.
    assert float(csv_rows["404464"]["CIDEr_D"]) == by_id["404464"]["scores"]["CIDEr_D"]
    assert sum(row["scores"]["CIDEr_D"] for row in logged) / 1000 == pytest.approx(expected["CIDEr"], abs=TOLERANCE)


def test_coco_candidates_and_references_give_the_same_scores(coco_caption_demo_dir, shared_scorer, capsys):
    assert (
        main(
            [
                "--candidates",
                str(coco_caption_demo_dir / "candidates.json"),
                "--references",
                str(coco_caption_demo_dir / "references.json"),
                "--no-spice",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "(1000 items)" in out
    assert [line for line in out.splitlines() if line.startswith("| METEOR")] == ["| METEOR | 0.1953 |"]


def test_splits_are_scored_apart_and_normalize_applies_to_both_sides(tmp_path, scorer):
    rows = [
        {
            "id": "a",
            "prediction": "A high-pitched beep; then a man's voice",
            "references": ["a high pitched beep then a mans voice"],
        },
        {"id": "b", "prediction": "Birds—chirping!", "references": ["birds chirping", "bird song"]},
    ]
    path = write_json(tmp_path / "predictions.json", {"val": rows, "test": [SMALL_ROWS[1], SMALL_ROWS[2]]})
    scored = score_file(path, normalize=True, spice=False, scorer=scorer)
    assert scored.items["val"][0].prediction == "a high pitched beep then a mans voice"
    assert scored.items["val"][1].references == ("birds chirping", "bird song")
    alone = scorer.score(
        {r["id"]: normalize_caption(r["prediction"]) for r in rows},
        {r["id"]: [normalize_caption(c) for c in r["references"]] for r in rows},
    )
    assert {k[len("val/") :]: v for k, v in scored.metrics().items() if k.startswith("val/")} == alone.corpus
    assert scored.metrics()["val/BLEU_4"] == pytest.approx(1.0)  # identical once normalised
    assert set(scored.metrics()) == {f"{split}/{m}" for split in ("val", "test") for m in alone.corpus}
    raw = score_file(path, split="val", spice=False, scorer=scorer)
    assert raw.metrics()["BLEU_4"] < 0.9  # the PTB tokenizer keeps "high-pitched" and "man 's" apart


@pytest.mark.slow
def test_module_runs_as_a_command(tmp_path):
    path = write_json(tmp_path / "val_predictions.json", SMALL_ROWS)
    done = subprocess.run(
        [sys.executable, "-m", "avlm.metrics.score_file", str(path), "--no-spice"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert f"### Caption scores of {path} (3 items)" in done.stdout
    assert [line.split(" | ")[0] for line in done.stdout.splitlines() if line.startswith("| ")][2:] == [
        "| BLEU_1", "| BLEU_2", "| BLEU_3", "| BLEU_4", "| METEOR", "| ROUGE_L", "| CIDEr_D"
    ]  # fmt: skip
