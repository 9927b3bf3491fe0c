"""Retention probe: does attaching the fusion change what the frozen LM knew?

Each item is a question and a few choices of which one is right. A choice's score is the LM's summed
log-likelihood of the choice's tokens after ``<bos> question`` (no eos after the choice: a choice continues the
question, it need not end the sentence); the highest-scoring choice is the prediction. Because the score is a sum
over tokens, choices of unequal token counts are not compared on equal terms: write items whose choices have
about the same length (the built-in ones are one word each). Question and choices are normalised with
:func:`~avlm.metrics.normalize_caption` and tokenised by the captioner's tokenizer, like its training text.

The same items are scored twice: ``with_fusion=False`` is the LM alone (the fusion hooks idle, no prefix, LoRA
disabled for data_only); ``with_fusion=True`` has the fusion attached and active, given the source tokens of a
silent clip (:func:`silent_source`: zeros into the frozen encoder, then the projector), i.e. "no audio given".
The difference in accuracy, in percentage points, is the retention delta; :func:`retention_verdict` turns it into
PASS / FAIL against a tolerated drop. partial_unfreeze trains the top LM layers, so its "LM alone" is the trained
LM, not the original: measure its reference on the freshly built captioner instead.

Items come from a JSONL file (:func:`load_retention_set`), one ``{"id", "question", "choices": [...], "answer":
<index>}`` object per line, or from the built-in set on the caption demo's grammar
(:func:`avlm.data.retention_demo.demo_retention_set`, ``items: demo``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from avlm.errors import ConfigError, DataError
from avlm.metrics.captioning import normalize_caption

if TYPE_CHECKING:
    from avlm.models.captioner import FusionCaptioner

logger = logging.getLogger(__name__)

# Length of the silent clip given to an audio encoder (Whisper's extractor pads it to its 30 s window anyway).
SILENT_SECONDS = 1.0
DEMO_ITEMS = "demo"
VERDICT_PASS, VERDICT_FAIL = "PASS", "FAIL"
_REQUIRED_KEYS = ("id", "question", "choices", "answer")


@dataclass(frozen=True)
class RetentionItem:
    """One multiple-choice question.

    Attributes:
        id: unique within its set.
        question: the text the choices continue.
        choices: two or more distinct candidate continuations.
        answer: index of the right choice.

    Raises:
        DataError: an empty question, fewer than two distinct choices, an empty choice, or an answer out of range
            (all judged after normalisation).
    """

    id: str
    question: str
    choices: tuple[str, ...]
    answer: int

    def __post_init__(self) -> None:
        if not normalize_caption(self.question):
            raise DataError(f"retention item '{self.id}': empty question")
        choices = [normalize_caption(choice) for choice in self.choices]
        if len(choices) < 2 or not all(choices) or len(set(choices)) != len(choices):
            raise DataError(
                f"retention item '{self.id}': choices {list(self.choices)} must be two or more distinct, non-empty "
                "texts (after normalisation)"
            )
        if isinstance(self.answer, bool) or not isinstance(self.answer, int) or not 0 <= self.answer < len(choices):
            raise DataError(
                f"retention item '{self.id}': answer {self.answer!r} is not an index into its {len(choices)} choices"
            )


def load_retention_set(path: str | Path) -> list[RetentionItem]:
    """Read retention items from a JSONL file: one ``{"id", "question", "choices", "answer"}`` object per line.

    Blank lines are skipped; other keys are ignored; integer ids become strings.

    Args:
        path: the JSONL file.

    Returns:
        The items in file order.

    Raises:
        DataError: a missing or empty file, or a line that is not such an object (the message names the file and
            the line), or an id used twice.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise DataError(f"cannot read retention set '{path}': {exc.strerror or exc}") from exc
    items: list[RetentionItem] = []
    first_line: dict[str, int] = {}
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{where}: not valid JSON ({exc.msg})") from exc
        item = _item_from_record(record, where)
        if item.id in first_line:
            raise DataError(f"{where}: id '{item.id}' already used on line {first_line[item.id]}")
        first_line[item.id] = number
        items.append(item)
    if not items:
        raise DataError(f"retention set '{path}' holds no items")
    return items


def _item_from_record(record: Any, where: str) -> RetentionItem:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object with keys {list(_REQUIRED_KEYS)}")
    missing = [key for key in _REQUIRED_KEYS if key not in record]
    if missing:
        raise DataError(f"{where}: missing key(s) {missing}")
    item_id, question, choices = record["id"], record["question"], record["choices"]
    if isinstance(item_id, bool) or not isinstance(item_id, str | int):
        raise DataError(f"{where}: 'id' must be a string or an integer, got {item_id!r}")
    if not isinstance(question, str):
        raise DataError(f"{where}: 'question' must be a string, got {question!r}")
    if not isinstance(choices, list) or not all(isinstance(choice, str) for choice in choices):
        raise DataError(f"{where}: 'choices' must be a list of strings, got {choices!r}")
    try:
        return RetentionItem(id=str(item_id), question=question, choices=tuple(choices), answer=record["answer"])
    except DataError as exc:
        raise DataError(f"{where}: {exc}") from exc


def load_retention_items(items: str) -> list[RetentionItem]:
    """The items a :class:`RetentionConfig` names: ``demo`` (the built-in set) or a JSONL path."""
    if items == DEMO_ITEMS:
        from avlm.data.retention_demo import demo_retention_set

        return demo_retention_set()
    return load_retention_set(items)


@dataclass(frozen=True)
class RetentionConfig:
    """The ``retention`` section of a captioning recipe.

    Attributes:
        enabled: run the probe after training.
        items: ``demo`` (the built-in set on the caption demo's grammar) or the path of a JSONL retention set.
        max_drop_pt: the largest tolerated fall of accuracy with fusion vs the LM alone, in percentage points.
    """

    enabled: bool = False
    items: str = DEMO_ITEMS
    max_drop_pt: float = 0.5

    def __post_init__(self) -> None:
        if not self.items:
            raise ConfigError(f"config key 'retention.items' is empty: use '{DEMO_ITEMS}' or a JSONL path")
        if not self.max_drop_pt >= 0:
            raise ConfigError(f"config key 'retention.max_drop_pt' must be >= 0, got {self.max_drop_pt}")


@dataclass
class RetentionResult:
    """What :func:`score_retention` returns.

    Attributes:
        accuracy: fraction of items whose highest-scoring choice is the answer.
        per_item: one dict per item: ``id``, ``predicted`` and ``answer`` (choice indices), ``correct``,
            ``log_likelihoods`` (one float per choice).
    """

    accuracy: float
    per_item: list[dict]


def silent_source(model: FusionCaptioner, *, seconds: float = SILENT_SECONDS) -> torch.Tensor:
    """A silent clip for the captioner's encoder: (1, S) zeros at its sampling rate, or (1, T, 3, H, W) zero frames.

    Args:
        model: the captioner.
        seconds: clip length for an audio encoder.

    Returns:
        The input, on the captioner's device.
    """
    device = model.projector.queries.device
    encoder = model.encoder
    if model.modality == "video":
        return torch.zeros(1, encoder.num_frames, 3, encoder.image_size, encoder.image_size, device=device)
    return torch.zeros(1, max(1, round(seconds * encoder.sampling_rate)), device=device)


def retention_verdict(accuracy: float, reference_accuracy: float, max_drop_pt: float) -> tuple[float, str]:
    """Compare the accuracy with fusion to the LM alone's.

    Args:
        accuracy: with fusion, in [0, 1].
        reference_accuracy: the LM alone, in [0, 1].
        max_drop_pt: the largest tolerated drop, in percentage points.

    Returns:
        ``(delta_pt, verdict)``: ``100 · (accuracy - reference_accuracy)`` and ``PASS`` when the drop is at most
        ``max_drop_pt`` (up to 1e-9, so that e.g. a drop of exactly 0.5 pt passes at 0.5), else ``FAIL``.

    Raises:
        ValueError: an accuracy outside [0, 1] or a negative ``max_drop_pt``.
    """
    for name, value in (("accuracy", accuracy), ("reference_accuracy", reference_accuracy)):
        if not 0 <= value <= 1:
            raise ValueError(f"{name} must be in [0, 1], got {value}")
    if not max_drop_pt >= 0:
        raise ValueError(f"max_drop_pt must be >= 0, got {max_drop_pt}")
    delta_pt = 100.0 * (accuracy - reference_accuracy)
    return delta_pt, VERDICT_PASS if delta_pt >= -max_drop_pt - 1e-9 else VERDICT_FAIL


@torch.no_grad()
def score_retention(
    model: FusionCaptioner, items: Sequence[RetentionItem], *, with_fusion: bool, batch_size: int = 32
) -> RetentionResult:
    """Score every choice of every item by the LM's summed log-likelihood of its tokens after the question.

    Args:
        model: the captioner (run in eval mode here; its mode is restored).
        items: the retention set.
        with_fusion: False: the frozen LM alone (no fusion hooks, no prefix, no LoRA); True: the fusion attached
            and active, with the source tokens of a silent clip (:func:`silent_source` → frozen encoder →
            projector), i.e. "no audio given"; for data_only those tokens are the prefix, with LoRA on.
        batch_size: (question, choice) sequences per LM forward.

    Returns:
        Accuracy and per-item scores.

    Raises:
        DataError: no items, a choice that tokenises to nothing, or a sequence longer than the LM's positions.
    """
    if not items:
        raise DataError("no retention items to score")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sequences = _encode_choices(model, items)
    was_training = model.training
    model.eval()
    try:
        source_tokens = model.source_tokens(silent_source(model)) if with_fusion else None
        scores: list[float] = []
        for start in range(0, len(sequences), batch_size):
            scores.extend(_choice_log_likelihoods(model, sequences[start : start + batch_size], source_tokens))
    finally:
        model.train(was_training)
    per_item, position = [], 0
    for item in items:
        log_likelihoods = scores[position : position + len(item.choices)]
        position += len(item.choices)
        predicted = max(range(len(log_likelihoods)), key=log_likelihoods.__getitem__)
        per_item.append(
            {
                "id": item.id,
                "predicted": predicted,
                "answer": item.answer,
                "correct": predicted == item.answer,
                "log_likelihoods": log_likelihoods,
            }
        )
    accuracy = sum(row["correct"] for row in per_item) / len(per_item)
    return RetentionResult(accuracy=accuracy, per_item=per_item)


def _encode_choices(model: FusionCaptioner, items: Sequence[RetentionItem]) -> list[tuple[list[int], int]]:
    """(``<bos> question choice`` ids, index of the choice's first token) per (item, choice), items in order."""
    from avlm.models.captioner import start_token_id

    tokenizer = model.tokenizer
    start = start_token_id(tokenizer)
    longest = getattr(model.lm.config, "n_positions", None) or getattr(model.lm.config, "max_position_embeddings", None)
    prefix = model.config.audio_tokens if model.fusion is None else 0
    sequences, with_unknown = [], 0
    for item in items:
        question = normalize_caption(item.question)
        context = tokenizer(question, add_special_tokens=False)["input_ids"]
        for choice in item.choices:
            # Tokenise question and choice together and take the choice's tokens as what follows the question's:
            # BPE tokenizers encode a word differently after a space than alone.
            whole = tokenizer(f"{question} {normalize_caption(choice)}", add_special_tokens=False)["input_ids"]
            if whole[: len(context)] == context:
                choice_ids = whole[len(context) :]
            else:  # a merge across the boundary: fall back to encoding the choice on its own
                choice_ids = tokenizer(" " + normalize_caption(choice), add_special_tokens=False)["input_ids"]
            if not choice_ids:
                raise DataError(f"retention item '{item.id}': choice {choice!r} tokenises to nothing")
            ids = [start, *context, *choice_ids]
            if longest is not None and len(ids) + prefix > longest:
                raise DataError(f"retention item '{item.id}': {len(ids) + prefix} positions exceed the LM's {longest}")
            with_unknown += tokenizer.unk_token_id is not None and tokenizer.unk_token_id in ids[1:]
            sequences.append((ids, 1 + len(context)))
    if with_unknown:
        logger.warning(
            "%d of %d retention sequences hold unknown tokens: the items use words outside the LM's vocabulary",
            with_unknown,
            len(sequences),
        )
    return sequences


def _choice_log_likelihoods(
    model: FusionCaptioner, sequences: Sequence[tuple[list[int], int]], source_tokens: torch.Tensor | None
) -> list[float]:
    device = model.projector.queries.device
    length = max(len(ids) for ids, _ in sequences)
    input_ids = torch.full((len(sequences), length), model.tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), length), dtype=torch.long)
    scored = torch.zeros((len(sequences), length), dtype=torch.bool)  # positions holding choice tokens
    for row, (ids, choice_start) in enumerate(sequences):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        attention_mask[row, : len(ids)] = 1
        scored[row, choice_start : len(ids)] = True
    input_ids, attention_mask, scored = input_ids.to(device), attention_mask.to(device), scored.to(device)
    logits = _lm_logits(model, input_ids, attention_mask, source_tokens)
    # Position t predicts token t + 1.
    log_probs = logits[:, :-1].float().log_softmax(-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return torch.where(scored[:, 1:], log_probs, 0.0).sum(1).tolist()


def _lm_logits(
    model: FusionCaptioner, input_ids: torch.Tensor, attention_mask: torch.Tensor, source_tokens: torch.Tensor | None
) -> torch.Tensor:
    if source_tokens is None:
        if model.fusion is None:  # data_only: the LM without its LoRA is the frozen LM
            with model.lm.disable_adapter():
                return model.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
        # No source set: the fusion hooks return the layer outputs untouched.
        return model.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
    tokens = source_tokens.expand(input_ids.shape[0], -1, -1)
    if model.fusion is None:
        return model._prefix_logits(tokens, input_ids, attention_mask)
    with model.fusion.source(tokens):
        return model.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits
