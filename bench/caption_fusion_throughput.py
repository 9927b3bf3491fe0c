"""Training throughput of additive fusion vs Flamingo-style cross-attention at matched trainable parameters.

Run it::

    python bench/caption_fusion_throughput.py                 # demo-sized tiny models, 7 rounds, ~1 minute
    python bench/caption_fusion_throughput.py --adapter-dim 256 --projector-width 768 --rounds 5

Both systems are built by ``avlm.models.build_captioner`` from the same config but ``model.fusion``: the tiny
frozen GPT-2 (``lm-tiny``) and the same projector, fusion at the same layers. They train from the same random
"cached encoder tokens" (what the recipe trains from when the encoder is frozen) and the same caption batches:
forward, loss, backward, AdamW step. Rounds alternate the order, after one warm-up round that is not counted;
the ratio is taken within each round (median) and between the fastest rounds (min-based).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from avlm.models import CaptionModelConfig, FusionCaptioner, build_caption_tokenizer, build_captioner, encode_captions

SYSTEMS = ("additive", "cross_attention")
WORDS = "a high low pitched tone chirp rising falling noise burst repeated three times once short long loud".split()


def make_batches(tokenizer, steps: int, batch_size: int, tokens: int, dim: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(steps):
        captions = [
            " ".join(WORDS[i] for i in torch.randint(len(WORDS), (12,), generator=generator)) for _ in range(batch_size)
        ]
        batch = encode_captions(tokenizer, captions, max_length=16)
        batch["source_features"] = torch.randn(batch_size, tokens, dim, generator=generator)
        batches.append(batch)
    return batches


def train_seconds(model: FusionCaptioner, batches: list[dict[str, torch.Tensor]]) -> float:
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    start = time.perf_counter()
    for batch in batches:
        out = model(
            None,
            batch["input_ids"],
            batch["attention_mask"],
            batch["labels"],
            source_features=batch["source_features"],
        )
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per timed training")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--adapter-dim", type=int, default=64)
    parser.add_argument("--projector-width", type=int, default=128)
    args = parser.parse_args()

    tokenizer = build_caption_tokenizer(WORDS)
    models = {}
    for fusion in SYSTEMS:
        torch.manual_seed(0)
        cfg = CaptionModelConfig(
            fusion=fusion,
            fusion_layers=[1, 3],
            audio_tokens=8,
            projector_width=args.projector_width,
            projector_heads=4,
            adapter_dim=args.adapter_dim,
            adapter_heads=4,
        )
        models[fusion] = build_captioner(cfg, tokenizer)
    counts = {fusion: model.parameter_counts()["trainable"] for fusion, model in models.items()}
    encoder_dim = models["additive"].encoder.feature_dim
    batches = make_batches(tokenizer, args.steps, args.batch_size, tokens=99, dim=encoder_dim)  # 2 s of audio-tiny

    print(
        f"torch {torch.__version__} ({torch.get_num_threads()} threads); lm-tiny, fusion at layers [1, 3], "
        f"adapter_dim {args.adapter_dim}; trainable parameters: "
        + ", ".join(f"{fusion} {counts[fusion]:,}" for fusion in SYSTEMS)
        + f" (ratio {counts['cross_attention'] / counts['additive']:.4f}); {args.steps} steps of batch "
        f"{args.batch_size} per training; {args.rounds} rounds + 1 warm-up"
    )
    seconds: dict[str, list[float]] = {fusion: [] for fusion in SYSTEMS}
    for round_index in range(args.rounds + 1):
        order = SYSTEMS if round_index % 2 == 0 else SYSTEMS[::-1]
        measured = {fusion: train_seconds(models[fusion], batches) for fusion in order}
        if round_index == 0:
            continue
        for fusion in SYSTEMS:
            seconds[fusion].append(measured[fusion])
        samples = args.steps * args.batch_size
        print(
            f"round {round_index}: "
            + "  ".join(f"{fusion} {samples / measured[fusion]:.0f} samples/s" for fusion in SYSTEMS)
            + f"  additive/cross_attention throughput {measured['cross_attention'] / measured['additive']:.3f}"
        )
    per_round = [c / a for a, c in zip(seconds["additive"], seconds["cross_attention"], strict=True)]
    print(
        f"\nadditive / cross_attention training throughput: median {statistics.median(per_round):.3f}, "
        f"min-based {min(seconds['cross_attention']) / min(seconds['additive']):.3f} (> 1: additive is faster)"
    )


if __name__ == "__main__":
    main()
