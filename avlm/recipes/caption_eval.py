"""The caption recipe's evaluation of the model it trains: every epoch, and once more on its best checkpoint.

Every epoch (:class:`CaptionEvaluator` as the loop's ``evaluate``): val XE per token, the val clips captioned with
beam search (and reranked, with ``decoding.rerank``) and scored with pycocoevalcap, and each fusion layer's gate
magnitude. At the end (:meth:`CaptionEvaluator.final`): val and test captioned and scored again as ``final/<split>_*``,
with their predictions.json rows and decoding-vs-reranking tables, logged by :func:`log_final_evaluation`.
Evaluating a registered version afterwards is another recipe, :mod:`avlm.recipes.evaluate_caption`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from avlm.decoding import DecodedSplit, SplitScores, decode_split, prediction_rows, score_decoded
from avlm.metrics import CaptionScorer
from avlm.models import caption_token_losses, label_token_counts
from avlm.rerank import NBestReport, Reranker
from avlm.tracking import plots

if TYPE_CHECKING:
    from avlm.recipes.caption import CaptionConfig, SourceClips


@dataclasses.dataclass
class FinalEvaluation:
    """The best checkpoint's val and test scores (``final/<split>_*``), predictions.json rows and N-best reports;
    empty on the processes that do not score."""

    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    predictions: dict[str, list[dict[str, Any]]] = dataclasses.field(default_factory=dict)
    nbest: dict[str, NBestReport] = dataclasses.field(default_factory=dict)


class CaptionEvaluator:
    """Captions and scores the recipe's splits. Every process decodes its share of the clips; only the main process
    scores (pycocoevalcap's METEOR and SPICE run Java), and :meth:`close` stops its scorer.

    Args:
        cfg: the run's config (decoding, caption length, SPICE settings).
        accelerator: the run's accelerator.
        splits: the records of each split, by split name.
        clips: the splits' encoder inputs (the raw clips CLAP reranking reads).
        source_inputs: batch -> ``source`` / ``source_features`` keyword arguments of the captioner.
        teacher_forced: (model, batch) -> the captioner's teacher-forced output.
        eval_loader: (split, pairs) -> that split's prepared loader, (clip, caption) pairs or one item per clip.
        val_pairs: the val (clip, caption) pairs, for val XE.
        val_clips: the val clips, for the captions.
    """

    def __init__(
        self,
        cfg: CaptionConfig,
        accelerator: Any,
        *,
        splits: dict[str, list],
        clips: SourceClips,
        source_inputs: Callable[[dict[str, Any]], dict[str, Any]],
        teacher_forced: Callable[[torch.nn.Module, dict[str, Any]], Any],
        eval_loader: Callable[[str, bool], Any],
        val_pairs: Any,
        val_clips: Any,
    ):
        self.cfg, self.accelerator, self.splits, self.clips = cfg, accelerator, splits, clips
        self.source_inputs, self.teacher_forced, self.eval_loader = source_inputs, teacher_forced, eval_loader
        self.val_pairs, self.val_clips = val_pairs, val_clips
        self.scorer = CaptionScorer(spice=cfg.metrics.spice_config()) if accelerator.is_main_process else None
        self.reranker = None
        if cfg.decoding.rerank.enabled:
            self.reranker = Reranker(
                cfg.decoding.rerank, [r.captions for r in splits["train"]], device=accelerator.device
            )

    def caption_split(self, model: torch.nn.Module, split: str, loader: Any) -> DecodedSplit:
        def waveforms(positions: list[int]) -> list[Any]:
            return [self.clips.datasets[split][i][self.clips.input_key].numpy() for i in positions]

        return decode_split(
            self.accelerator.unwrap_model(model),
            loader,
            self.cfg.decoding,
            self.source_inputs,
            accelerator=self.accelerator,
            reranker=self.reranker,
            max_caption_tokens=self.cfg.data.max_caption_tokens,
            waveforms=waveforms if self.clips.input_key == "waveform" else None,
            sample_rate=self.clips.preprocessing.get("sample_rate", 0),
        )

    def score_split(self, split: str, decoded: DecodedSplit) -> SplitScores | None:
        return score_decoded(decoded, self.splits[split], self.scorer) if self.scorer is not None else None

    @torch.no_grad()
    def val_xe(self, model: torch.nn.Module) -> float:
        total, count = 0.0, 0
        for batch in self.val_pairs:
            out = self.teacher_forced(model, batch)
            # per caption, so that the split's token mean is the same on any number of processes
            sums, tokens = self.accelerator.gather_for_metrics(
                (caption_token_losses(out.logits, batch["labels"]), label_token_counts(batch["labels"]))
            )
            total, count = total + float(sums.sum()), count + int(tokens.sum())
        return total / max(count, 1)

    def __call__(self, model: torch.nn.Module) -> dict[str, float]:
        """One epoch's ``val/*`` metrics and gate magnitudes, the same on every process."""
        scores = self.score_split("val", self.caption_split(model, "val", self.val_clips))
        metrics = scores.metrics("val/") if scores is not None else {}
        if self.accelerator.num_processes > 1:  # every rank needs the monitored value for early stopping
            from accelerate.utils import broadcast_object_list

            metrics = broadcast_object_list([metrics])[0]
        metrics["val/xe_loss"] = self.val_xe(model)
        gates = self.accelerator.unwrap_model(model).fusion_gate_magnitudes()
        metrics.update({f"fusion_gate/layer_{layer}": value for layer, value in gates.items()})
        return metrics

    def final(self, model: torch.nn.Module) -> FinalEvaluation:
        """Caption and score val and test (those the data have) with ``model``, the best checkpoint."""
        final = FinalEvaluation()
        for split in [s for s in ("val", "test") if s in self.splits]:
            loader = self.val_clips if split == "val" else self.eval_loader(split, False)
            decoded = self.caption_split(model, split, loader)
            scores = self.score_split(split, decoded)
            if scores is not None:
                final.metrics.update(scores.metrics(f"final/{split}_"))
                final.predictions[split] = prediction_rows(self.splits[split], decoded, scores)
                if scores.nbest is not None:
                    final.nbest[split] = scores.nbest
        return final

    def close(self) -> None:
        if self.scorer is not None:
            self.scorer.close()


def log_final_evaluation(
    run_logger: Any, final: FinalEvaluation, history: list[dict[str, float]], fusion_layers: Sequence[int]
) -> None:
    """Log the final predictions, the decoding-vs-reranking tables and the training curves."""
    for split, rows in final.predictions.items():
        run_logger.log_dict(rows, f"predictions/{split}_predictions.json")
    for split, report in final.nbest.items():  # the study's T3: decoding vs reranking
        markdown = report.markdown(title=f"Decoding vs reranking ({split})")
        run_logger.log_text(markdown, f"tables/decoding_{split}.md")
        run_logger.log_dict(report.table(), f"tables/decoding_{split}.json")
    run_logger.log_figure(
        plots.training_curves(
            history,
            {
                "loss": ["train/loss", "train/xe_loss", "train/contrastive_loss", "val/xe_loss"],
                "val caption metrics": ["val/BLEU_4", "val/METEOR", "val/ROUGE_L", "val/CIDEr_D", "val/SPIDEr"],
            },
        ),
        "plots/training_curves.png",
    )
    gate_keys = [f"fusion_gate/layer_{layer}" for layer in fusion_layers if f"fusion_gate/layer_{layer}" in history[-1]]
    if gate_keys:
        run_logger.log_figure(
            plots.training_curves(history, {"gate magnitude per fusion layer": gate_keys}),
            "plots/fusion_gate_magnitudes.png",
        )
