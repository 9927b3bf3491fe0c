"""Score any file of predicted captions with avlm's caption metrics: ``avlm-score`` (or ``python -m
avlm.metrics.score_file``).

Run it::

    avlm-score predictions.json                            # avlm's predictions.json (one split, or {split: [...]})
    avlm-score val_predictions.json --split val --per-item scores.csv
    avlm-score captions.csv --candidate-col caption_predicted --reference-cols "caption_*" --id-col file_name
    avlm-score captions.csv --reference-cols ref_a,ref_b,ref_c --normalize --no-spice
    avlm-score --candidates results.json --references captions_val.json      # coco-caption style
    avlm-score predictions.json --mlflow --experiment avlm-score             # also log a new MLflow run

Accepted files:

- avlm's ``predictions.json`` (the caption recipe's ``predictions/<split>_predictions.json`` artifact, or the
  per-item JSON this tool writes): a list of ``{"id", "prediction", "references", ...}``, or ``{split: [...]}``.
- coco-caption style candidates: a list of ``{"image_id", "caption"}``, with ``--references`` naming the
  references (a list of ``{"image_id", "caption"}``, several per image, or a COCO annotation file's dict with an
  ``"annotations"`` list).
- a CSV with a header: one row per item, the candidate in ``--candidate-col``, the references in
  ``--reference-cols`` (names separated by commas, each an exact column or a glob such as ``caption_*``; empty
  cells are skipped, so items may have different numbers of references), the item id in ``--id-col``.

With ``--references`` the file's own references, if any, are replaced by those of the references file (matched by
id as text, so the CSV id ``"42"`` finds image 42). Scoring is :class:`~avlm.metrics.captioning.CaptionScorer`'s:
the PTB tokenizer and coco-caption's scorers, so coco-caption figures are reproduced exactly; ``--normalize``
first applies :func:`~avlm.metrics.captioning.normalize_caption` to both sides, as the caption recipe does.
Problems with a file are :class:`~avlm.errors.DataError` s naming the file and the line (CSV) or the item
(JSON, e.g. ``["val"][3]``); the command then prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import fnmatch
import json
import logging
import sys
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

from avlm.data.audio_captions import read_csv_rows
from avlm.errors import AvlmError, DataError
from avlm.metrics.captioning import (
    CAPTION_METRIC_NAMES,
    CaptionScorer,
    CaptionScores,
    caption_metrics_for_logging,
    normalize_caption,
)

logger = logging.getLogger(__name__)

PROG = "avlm-score"
DEFAULT_EXPERIMENT = "avlm-score"
_GLOB_CHARACTERS = frozenset("*?[")
_SHOWN = 10  # ids named in one message


@dataclasses.dataclass(frozen=True)
class ScoringItem:
    """One predicted caption and the references it is scored against.

    Attributes:
        id: The item's id as the file gives it (a JSON string or number; CSV ids are text, or the row's line).
        prediction: The predicted caption.
        references: One or more reference captions.
    """

    id: Hashable
    prediction: str
    references: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class CsvColumns:
    """Which columns of a predictions CSV hold what.

    Attributes:
        candidate: Column of the predicted caption.
        references: Reference columns, separated by commas; each an exact column name or a glob (``caption_*``),
            expanded in header order.
        id: Column of the item id; empty = the ``id`` column when the header has one, else the row's line number.
    """

    candidate: str = "prediction"
    references: str = "reference*"
    id: str = ""


@dataclasses.dataclass(frozen=True)
class ScoredFile:
    """The scores of one predictions file.

    Attributes:
        path: The predictions file.
        items: Split name -> the items scored, in file order; the name is ``""`` when the file holds one set.
        scores: Split name -> corpus and per-item scores of those items.
    """

    path: Path
    items: dict[str, list[ScoringItem]]
    scores: dict[str, CaptionScores]

    def metrics(self) -> dict[str, float]:
        """Corpus scores as flat names: ``BLEU_4``, ``CIDEr_D``, ... for one set; ``<split>/BLEU_4`` for several."""
        prefixes = {split: f"{split}/" if len(self.scores) > 1 else "" for split in self.scores}
        return {
            name: value
            for split, scores in self.scores.items()
            for name, value in caption_metrics_for_logging(scores, prefix=prefixes[split]).items()
        }

    def per_item_rows(self) -> list[dict[str, Any]]:
        """One row per item: split (when there are several), id, prediction, references and a score per metric."""
        rows = []
        for split, items in self.items.items():
            per_item = self.scores[split].per_item
            for item in items:
                row: dict[str, Any] = {"split": split} if len(self.items) > 1 else {}
                row.update(id=item.id, prediction=item.prediction, references=list(item.references))
                row["scores"] = {metric: values[item.id] for metric, values in per_item.items()}
                rows.append(row)
        return rows

    def per_item_json(self) -> list[dict[str, Any]] | dict[str, list[dict[str, Any]]]:
        """The per-item rows in avlm's predictions.json shape (``{split: [...]}`` for several splits): this tool
        reads it back."""
        rows = self.per_item_rows()
        if len(self.items) == 1:
            return rows
        by_split: dict[str, list[dict[str, Any]]] = {split: [] for split in self.items}
        for row in rows:
            by_split[row.pop("split")].append(row)
        return by_split


# -- reading -------------------------------------------------------------------------------------------------------
def read_scoring_items(
    path: str | Path,
    *,
    references: str | Path | None = None,
    columns: CsvColumns = CsvColumns(),
    split: str = "",
) -> dict[str, list[ScoringItem]]:
    """Read the items of a predictions file (see the module docstring for the formats).

    Args:
        path: A ``.json`` (avlm's predictions.json or coco-style candidates) or ``.csv`` file.
        references: A coco-style references JSON; when given, it supplies every item's references.
        columns: The columns of a CSV (ignored for JSON).
        split: Read only this split of a ``{split: [...]}`` file; empty = every split.

    Returns:
        Split name -> items in file order; one entry named ``""`` unless the file is keyed by split.

    Raises:
        DataError: The file is missing or malformed (the message names it and the line or item), an id repeats
            within a split, an item has no reference, or ``split`` is not in the file.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix == ".csv":
        if split:
            raise DataError(f"{path}: a CSV holds one set of predictions; --split {split!r} applies to JSON files")
        sets = {"": _read_csv(path, columns, with_references=references is None)}
    elif suffix == ".json":
        sets = _read_json_predictions(path, split, with_references=references is None)
    else:
        raise DataError(f"predictions file {path}: expected a .json or .csv file, got {suffix or 'no suffix'!r}")
    if references is not None:
        by_id = _read_coco_references(Path(references))
        sets = {name: _attach_references(items, by_id, Path(references)) for name, items in sets.items()}
    return sets


def _read_json(path: Path, what: str) -> Any:
    if not path.is_file():
        raise DataError(f"{what} file {path} does not exist")
    try:
        return json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as err:
        raise DataError(f"{what} file {path} is not UTF-8 text: {err}") from None
    except json.JSONDecodeError as err:
        raise DataError(f"{path}, line {err.lineno} column {err.colno}: not valid JSON: {err.msg}") from None


def _read_json_predictions(path: Path, split: str, *, with_references: bool) -> dict[str, list[ScoringItem]]:
    data = _read_json(path, "predictions")
    if isinstance(data, dict):
        if not data or not all(isinstance(rows, list) for rows in data.values()):
            raise DataError(
                f"{path}: expected a list of predictions or {{split: [predictions]}}, got an object with keys "
                f"{list(data)[:_SHOWN]}"
            )
        if split and split not in data:
            raise DataError(f"{path}: no split {split!r}; the file has splits {list(data)}")
        return {
            name: _json_items(path, rows, f"[{json.dumps(name)}]", with_references)
            for name, rows in data.items()
            if not split or name == split
        }
    if split:
        raise DataError(f"{path}: --split {split!r} needs a file keyed by split; this one is a single list")
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of predictions or {{split: [predictions]}}, got {_kind(data)}")
    return {"": _json_items(path, data, "", with_references)}


def _json_items(path: Path, rows: list, where: str, with_references: bool) -> list[ScoringItem]:
    """Items of one list of rows: avlm rows ``{id, prediction, references}`` or coco ``{image_id, caption}``."""
    if not rows:
        raise DataError(f"{path}{', ' + where if where else ''}: no predictions")
    items, seen = [], {}
    for index, row in enumerate(rows):
        at = f"{path}, item {where}[{index}]"
        if not isinstance(row, dict):
            raise DataError(f"{at}: expected an object, got {_kind(row)}")
        if "prediction" in row:
            item_id, prediction = _json_field(row, "id", at), _json_field(row, "prediction", at)
            refs = _json_references(row, at) if with_references else ()
        elif "caption" in row and "image_id" in row:
            item_id, prediction = _json_field(row, "image_id", at), _json_field(row, "caption", at)
            if with_references:
                raise DataError(f"{at}: a coco-style candidate (image_id, caption) has no references; add --references")
            refs = ()
        else:
            raise DataError(
                f"{at}: expected keys id, prediction, references (avlm) or image_id, caption (coco-caption); "
                f"got {sorted(row)}"
            )
        _check_id_key(item_id, at, seen, f"item {where}[{index}]")
        items.append(ScoringItem(item_id, prediction, refs))
    return items


def _json_field(row: dict, key: str, at: str) -> Any:
    if key not in row:
        raise DataError(f"{at}: no {key!r}")
    value = row[key]
    if key in ("id", "image_id"):
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise DataError(f"{at}: {key!r} must be a string or an integer, got {_kind(value)}")
    elif not isinstance(value, str):
        raise DataError(f"{at}: {key!r} must be a caption string, got {_kind(value)}")
    return value


def _json_references(row: dict, at: str) -> tuple[str, ...]:
    if "references" not in row:
        raise DataError(f"{at}: no 'references' (give --references FILE when the predictions carry none)")
    refs = row["references"]
    if not isinstance(refs, list) or not all(isinstance(r, str) for r in refs):
        raise DataError(f"{at}: 'references' must be a list of caption strings, got {_kind(refs)}")
    kept = tuple(r for r in refs if r.strip())
    if not kept:
        raise DataError(f"{at}: no reference caption (the 'references' list is empty or blank)")
    return kept


def _read_csv(path: Path, columns: CsvColumns, *, with_references: bool) -> list[ScoringItem]:
    header_info: dict[str, Any] = {}

    def check_header(header: list[str]) -> None:
        named = {"--candidate-col": columns.candidate, **({"--id-col": columns.id} if columns.id else {})}
        for option, column in named.items():
            if column not in header:
                raise DataError(f"{path}: no column {column!r} ({option}); the columns are {header}")
        header_info["references"] = _reference_columns(path, header, columns.references) if with_references else []

    header, rows = read_csv_rows(path, "a predictions CSV with a header row", check_header)
    id_column = columns.id or ("id" if "id" in header else "")
    position = {name: index for index, name in enumerate(header)}
    reference_columns = header_info["references"]
    items, seen = [], {}
    for line, fields in rows:
        at = f"{path}, line {line}"
        item_id: Hashable = fields[position[id_column]] if id_column else line
        if id_column and not item_id:
            raise DataError(f"{at}: empty id in column {id_column!r}")
        refs = tuple(fields[position[c]] for c in reference_columns if fields[position[c]])
        if with_references and not refs:
            raise DataError(f"{at}: no reference caption in columns {reference_columns}")
        _check_id_key(item_id, at, seen, f"line {line}")
        items.append(ScoringItem(item_id, fields[position[columns.candidate]], refs))
    return items


def _reference_columns(path: Path, header: list[str], spec: str) -> list[str]:
    """The header's reference columns named by ``spec`` (exact names and globs, comma-separated), in order."""
    chosen: list[str] = []
    for entry in (e.strip() for e in spec.split(",")):
        if not entry:
            continue
        if _GLOB_CHARACTERS & set(entry):
            matched = [name for name in header if fnmatch.fnmatchcase(name, entry)]
            if not matched:
                raise DataError(f"{path}: no column matches {entry!r} (--reference-cols); the columns are {header}")
        elif entry in header:
            matched = [entry]
        else:
            hint = (
                f"; for the columns starting with it, write {entry + '*'!r}"
                if any(name.startswith(entry) for name in header)
                else ""
            )
            raise DataError(f"{path}: no column {entry!r} (--reference-cols); the columns are {header}{hint}")
        chosen += [name for name in matched if name not in chosen]
    if not chosen:
        raise DataError(f"{path}: --reference-cols names no column; the columns are {header}")
    return chosen


def _read_coco_references(path: Path) -> dict[str, list[str]]:
    """Id (as text) -> reference captions of a coco-style references file, in file order."""
    data = _read_json(path, "references")
    where = ""
    if isinstance(data, dict) and isinstance(data.get("annotations"), list):
        data, where = data["annotations"], '["annotations"]'
    if not isinstance(data, list) or not data:
        raise DataError(
            f"{path}: expected a non-empty list of {{image_id, caption}} (or a dict with an 'annotations' list), "
            f"got {_kind(data)}"
        )
    by_id: dict[str, list[str]] = {}
    for index, row in enumerate(data):
        at = f"{path}, item {where}[{index}]"
        if not isinstance(row, dict):
            raise DataError(f"{at}: expected an object with image_id and caption, got {_kind(row)}")
        image_id, caption = _json_field(row, "image_id", at), _json_field(row, "caption", at)
        if caption.strip():
            by_id.setdefault(str(image_id), []).append(caption)
    return by_id


def _attach_references(items: list[ScoringItem], by_id: Mapping[str, list[str]], path: Path) -> list[ScoringItem]:
    if any(item.references for item in items):
        logger.warning("the predictions' own references are replaced by those of %s", path)
    missing = [item.id for item in items if str(item.id) not in by_id]
    if missing:
        raise DataError(f"{path} has no reference caption for {len(missing)} predicted item(s): {_named(missing)}")
    unused = len(by_id) - len({str(item.id) for item in items})
    if unused:
        logger.info("%s: %d image(s) with references have no prediction; they are not scored", path, unused)
    return [dataclasses.replace(item, references=tuple(by_id[str(item.id)])) for item in items]


def _check_id_key(item_id: Hashable, at: str, seen: dict[str, str], here: str) -> None:
    """Raise DataError when the id (compared as text) was already seen; remember where it was."""
    key = str(item_id)
    if key in seen:
        raise DataError(f"{at}: id {item_id!r} repeats {seen[key]}; each item must appear once")
    seen[key] = here


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", type(None): "null"}.get(type(value), repr(value))


def _named(ids: Sequence[Hashable]) -> str:
    shown = ", ".join(repr(i) for i in ids[:_SHOWN])
    return shown + (f" and {len(ids) - _SHOWN} more" if len(ids) > _SHOWN else "")


# -- scoring -------------------------------------------------------------------------------------------------------
def score_items(
    items: Mapping[str, Sequence[ScoringItem]],
    *,
    normalize: bool = False,
    spice: bool = True,
    scorer: CaptionScorer | None = None,
) -> dict[str, CaptionScores]:
    """Score each set of items with one :class:`CaptionScorer` (one METEOR JVM for all of them).

    Args:
        items: Split name -> items (from :func:`read_scoring_items`); ids unique within a split.
        normalize: Apply :func:`normalize_caption` to predictions and references first.
        spice: Compute SPICE and SPIDEr (left out, with a logged reason, when SPICE cannot run here).
        scorer: A scorer to use and leave open; None = a fresh one, closed at the end.

    Returns:
        Split name -> corpus and per-item scores, keyed by item id.

    Raises:
        AvlmError: no Java runtime, or METEOR's Java process failed.
    """
    # A caller's scorer stays open: its METEOR JVM (about 15 s to start) serves the caller's next files too.
    with CaptionScorer() if scorer is None else contextlib.nullcontext(scorer) as active:
        return {
            split: active.score(
                {item.id: _text(item.prediction, normalize) for item in split_items},
                {item.id: [_text(ref, normalize) for ref in item.references] for item in split_items},
                spice=spice,
            )
            for split, split_items in items.items()
        }


def score_file(
    path: str | Path,
    *,
    references: str | Path | None = None,
    columns: CsvColumns = CsvColumns(),
    split: str = "",
    normalize: bool = False,
    spice: bool = True,
    scorer: CaptionScorer | None = None,
) -> ScoredFile:
    """Read a predictions file and score it: :func:`read_scoring_items`, then :func:`score_items`.

    With ``normalize``, the returned items hold the normalised texts that were scored.

    Raises:
        DataError: see :func:`read_scoring_items`.
        AvlmError: see :func:`score_items`.
    """
    items = read_scoring_items(path, references=references, columns=columns, split=split)
    if normalize:
        items = {
            name: [
                dataclasses.replace(
                    item,
                    prediction=normalize_caption(item.prediction),
                    references=tuple(normalize_caption(r) for r in item.references),
                )
                for item in split_items
            ]
            for name, split_items in items.items()
        }
    return ScoredFile(Path(path), items, score_items(items, spice=spice, scorer=scorer))


def _text(caption: str, normalize: bool) -> str:
    return normalize_caption(caption) if normalize else caption


# -- output --------------------------------------------------------------------------------------------------------
def write_per_item(scored: ScoredFile, out: str | Path) -> Path:
    """Write the per-item scores: ``.json`` in avlm's predictions.json shape, ``.csv`` with one column per metric
    (references as a JSON list). Returns the path written.

    Raises:
        DataError: ``out`` is neither ``.json`` nor ``.csv``, or cannot be written.
    """
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix not in (".json", ".csv"):
        raise DataError(f"--per-item {out}: expected a .json or .csv file name, got {suffix or 'no suffix'!r}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if suffix == ".json":
            out.write_text(json.dumps(scored.per_item_json(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
            return out
        rows = scored.per_item_rows()
        metrics = [m for m in CAPTION_METRIC_NAMES if rows and m in rows[0]["scores"]]
        with open(out, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f)
            head = [c for c in ("split", "id", "prediction", "references") if c in rows[0]]
            writer.writerow([*head, *metrics])
            for row in rows:
                cells = [json.dumps(row[c], ensure_ascii=False) if c == "references" else row[c] for c in head]
                writer.writerow([*cells, *(repr(row["scores"][m]) for m in metrics)])
    except OSError as err:
        raise DataError(f"cannot write the per-item scores to {out}: {err}") from None
    return out


def metric_table(scored: ScoredFile, digits: int = 4) -> str:
    """The corpus scores as a Markdown table: a row per metric, a column per split; a note when SPICE is absent."""
    from avlm.report.tables import Table, number_cell, render_markdown, text_cell

    splits = list(scored.scores)
    counts = ", ".join(f"{split + ': ' if split else ''}{len(scored.items[split])} items" for split in splits)
    table = Table(
        name="scores",
        title=f"Caption scores of {scored.path} ({counts})",
        columns=["metric", *(split or "score" for split in splits)],
        rows=[
            [text_cell(metric), *(number_cell(scored.scores[split].corpus.get(metric), digits) for split in splits)]
            for metric in CAPTION_METRIC_NAMES
            if any(metric in scored.scores[split].corpus for split in splits)
        ],
    )
    for reason in dict.fromkeys(
        s.spice_unavailable_reason for s in scored.scores.values() if s.spice_unavailable_reason
    ):
        table.note(f"SPICE and SPIDEr absent: {reason}")
    return render_markdown(table)


def log_to_mlflow(
    scored: ScoredFile,
    *,
    experiment: str = DEFAULT_EXPERIMENT,
    tracking_uri: str = "",
    params: Mapping[str, Any] | None = None,
    per_item_file: Path | None = None,
) -> str:
    """Log the scores as a new MLflow run and return its id (under ``mlflow run``, the run it created).

    The run holds the corpus scores as metrics named as in :meth:`ScoredFile.metrics` (step 0), ``params``, the
    tag ``scored_file`` (the file's absolute path) with avlm's provenance tags, and the per-item scores as the
    artifact ``scores/per_item.json`` (plus ``per_item_file`` under ``scores/`` when given).

    Args:
        scored: The scores to log.
        experiment: The MLflow experiment (created when missing).
        tracking_uri: Empty = ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working directory.
        params: Run parameters (the scoring options).
        per_item_file: A per-item file already written (e.g. the ``--per-item`` CSV) to log as well.
    """
    from avlm.tracking import TrackingConfig, provenance_tags, tracked_run

    cfg = TrackingConfig(experiment=experiment, tracking_uri=tracking_uri, system_metrics=False)
    run_name = f"score-{scored.path.stem}"
    with tracked_run(cfg, recipe="score", run_name=run_name, is_main_process=True) as run_logger:
        run_logger.set_tags({"scored_file": str(scored.path.resolve()), **provenance_tags()})
        counts = {f"n_items{'/' + split if split else ''}": len(items) for split, items in scored.items.items()}
        run_logger.log_params({**(params or {}), **counts})
        run_logger.log_metrics(scored.metrics(), step=0)
        run_logger.log_dict(scored.per_item_json(), "scores/per_item.json")
        if per_item_file is not None:
            run_logger.log_artifact(per_item_file, "scores")
        return run_logger.run_id


# -- command line --------------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    """The ``avlm-score`` argument parser."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Score a file of predicted captions (BLEU-1..4, METEOR, ROUGE-L, CIDEr-D, SPICE, SPIDEr).",
        allow_abbrev=False,
    )
    parser.add_argument("file", nargs="?", help="predictions: avlm predictions.json, coco-style candidates, or CSV")
    parser.add_argument("--candidates", metavar="FILE", help="coco-style candidates JSON (instead of FILE)")
    parser.add_argument("--references", metavar="FILE", help="coco-style references JSON: list of {image_id, caption}")
    defaults = CsvColumns()
    parser.add_argument("--candidate-col", default=defaults.candidate, help="CSV: column of the predicted caption")
    parser.add_argument(
        "--reference-cols",
        default=defaults.references,
        help="CSV: reference columns, comma-separated names or globs (default: %(default)s)",
    )
    parser.add_argument(
        "--id-col", default=defaults.id, help="CSV: column of the item id (default: 'id' if present, else the line)"
    )
    parser.add_argument("--split", default="", help="score only this split of a {split: [...]} JSON file")
    parser.add_argument("--normalize", action="store_true", help="apply normalize_caption to both sides first")
    parser.add_argument(
        "--spice", action=argparse.BooleanOptionalAction, default=True, help="compute SPICE and SPIDEr if possible"
    )
    parser.add_argument("--per-item", metavar="OUT", help="write per-item scores to OUT.csv or OUT.json")
    parser.add_argument("--mlflow", action="store_true", help="log the scores to a new MLflow run")
    parser.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment (default: %(default)s)")
    parser.add_argument(
        "--tracking-uri",
        default="",
        help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else sqlite:///mlflow.db)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``avlm-score``: read, score, print the metric table, write/log what was asked; return the exit status.

    Exit status: 0 done; 2 a bad option or an error the user can fix (a malformed file, no Java), with one line on
    stderr.
    """
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exit_:  # --help (0) or a bad option (2): a status, not an exception, for callers
        return int(exit_.code or 0)
    if (args.file is None) == (args.candidates is None):
        return _fail("give the predictions file either as FILE or as --candidates FILE (one of them)")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    path = Path(args.file or args.candidates)
    columns = CsvColumns(candidate=args.candidate_col, references=args.reference_cols, id=args.id_col)
    try:
        scored = score_file(
            path,
            references=args.references,
            columns=columns,
            split=args.split,
            normalize=args.normalize,
            spice=args.spice,
        )
        per_item = write_per_item(scored, args.per_item) if args.per_item else None
        print(metric_table(scored), end="")  # noqa: T201
        if per_item is not None:
            print(f"Per-item scores: {per_item}")  # noqa: T201
        if args.mlflow:
            params = {
                "file": str(path),
                "references": args.references or "",
                "normalize": args.normalize,
                "spice": args.spice,
                "split": args.split,
                **(
                    {f"csv.{k}": v for k, v in dataclasses.asdict(columns).items()}
                    if path.suffix.lower() == ".csv"
                    else {}
                ),
            }
            run_id = log_to_mlflow(
                scored,
                experiment=args.experiment,
                tracking_uri=args.tracking_uri,
                params=params,
                per_item_file=per_item,
            )
            from avlm.cli import browse_line
            from avlm.tracking import resolve_tracking_uri

            print(f"MLflow run {run_id} in experiment {args.experiment!r}")  # noqa: T201
            print(browse_line(resolve_tracking_uri(args.tracking_uri)))  # noqa: T201
    except AvlmError as err:
        return _fail(f"error: {err}")
    return 0


def _fail(message: str) -> int:
    print(f"{PROG}: {message}", file=sys.stderr)  # noqa: T201
    return 2


if __name__ == "__main__":
    sys.exit(main())
