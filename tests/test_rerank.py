"""Reranking N-best lists: consensus is CIDEr-D against the other candidates, the pick maximises the combined score,
the captioner's contrastive similarity ranks a clip's own caption first; N-best oracle, rerank and diversity metrics
equal the scores of one caption per clip."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from avlm.config import config_from_dict
from avlm.errors import ConfigError, DataError
from avlm.metrics import CaptionScorer, SpiceConfig, captioning, normalize_caption
from avlm.metrics.cider import CiderD, coco_cider_d
from avlm.metrics.diversity import self_bleu
from avlm.models import CaptionModelConfig, build_caption_tokenizer, build_captioner, encode_captions
from avlm.rerank import (
    ORACLE,
    RERANKED,
    TOP_BEAM,
    RerankConfig,
    consensus_scores,
    contrastive_similarity,
    nbest_metrics,
    rerank,
)

# Document frequencies for the consensus, as from a training split.
DF_REFERENCES = [
    ["a dog barks", "a dog is barking loudly"],
    ["rain falls on a roof", "heavy rain on a tin roof"],
    ["a cat meows", "a cat is meowing twice"],
    ["a car engine starts", "an engine revs"],
]
NBEST = {
    0: ["A dog barks.", "a dog barks loudly", "a cat meows"],
    1: ["rain falls", "rain falls on a tin roof", "rain falls on a roof"],
    2: ["an engine", "a car engine starts", "a dog barks"],
}
REFERENCES = {
    0: ["a dog is barking", "a dog barks loudly outside", "dog barking"],
    1: ["heavy rain falls on a roof", "rain on a tin roof"],
    2: ["a car engine starts and revs", "an engine starts"],
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def cider():
    return CiderD(DF_REFERENCES)


@pytest.fixture(scope="module")
def scorer():
    """One METEOR JVM for the module; closed at the end."""
    with CaptionScorer(spice=False) as caption_scorer:
        yield caption_scorer


def pycocoevalcap_consensus(candidates):
    """Each candidate's CIDEr-D against the others, by pycocoevalcap's CiderScorer with the same df."""
    texts = [normalize_caption(text) for text in candidates]
    others = [texts[:k] + texts[k + 1 :] for k in range(len(texts))]
    return coco_cider_d(texts, others, document_frequency_references=DF_REFERENCES)


# -- config ------------------------------------------------------------------------------------------------------
def test_rerank_config_is_validated_naming_its_keys():
    config = config_from_dict(RerankConfig, {"enabled": True, "similarity": "clap", "clap": "clap-tiny"})
    assert (config.similarity_weight, config.consensus_weight) == (1.0, 1.0)
    assert RerankConfig(similarity="clap").clap == ""  # only an enabled reranker needs its CLAP model
    for values, key in [
        ({"similarity": "bleu"}, "decoding.rerank.similarity"),
        ({"similarity_weight": -1.0}, "decoding.rerank.similarity_weight"),
        ({"consensus_weight": float("nan")}, "decoding.rerank.consensus_weight"),
        ({"clap": "laion/clap"}, "decoding.rerank.clap"),
        ({"enabled": True, "similarity": "clap"}, "decoding.rerank.clap"),
        ({"enabled": True, "similarity_weight": 0.0, "consensus_weight": 0.0}, "decoding.rerank.similarity_weight"),
    ]:
        with pytest.raises(ConfigError, match=f"config key[s]? '{key}'"):
            RerankConfig(**values)


# -- consensus and the pick ----------------------------------------------------------------------------------------
def test_consensus_is_cider_d_against_the_other_candidates(cider):
    for candidates in NBEST.values():
        np.testing.assert_allclose(
            consensus_scores(candidates, cider), pycocoevalcap_consensus(candidates), atol=1e-9, rtol=0
        )
    # texts are normalised first; a list of one has nobody to agree with
    np.testing.assert_array_equal(
        consensus_scores(["A dog barks!", "a dog, barks"], cider), consensus_scores(["a dog barks"] * 2, cider)
    )
    np.testing.assert_array_equal(consensus_scores(["a dog barks"], cider), [0.0])


def test_rerank_picks_the_highest_combined_score(cider):
    similarity = {0: np.array([0.1, 0.2, 0.9]), 1: np.array([0.9, 0.0, 0.1]), 2: np.array([0.0, 0.5, -0.5])}
    consensus = {item: pycocoevalcap_consensus(texts) for item, texts in NBEST.items()}
    # The odd one out (the cat, the dog) agrees with nobody; the two dogs (engines) tie, the better beam wins.
    assert [int(np.argmax(consensus[item])) for item in NBEST] == [0, 2, 0]
    assert consensus[0][2] == consensus[2][2] == 0 and consensus[0][0] == consensus[0][1]
    for weights in [(0.0, 1.0), (1.0, 0.0), (2.0, 0.5), (10.0, 1.0)]:
        picked, combined = rerank(
            NBEST, similarity=similarity, cider=cider, similarity_weight=weights[0], consensus_weight=weights[1]
        )
        for item, texts in NBEST.items():
            expected = weights[0] * similarity[item] + weights[1] * consensus[item]
            np.testing.assert_allclose(combined[item], expected, atol=1e-9, rtol=0)
            assert picked[item] == texts[int(np.argmax(expected))]
    # The similarity outweighs the consensus at weight 10: the cat for clip 0, the first rain for clip 1.
    assert picked == {0: "a cat meows", 1: "rain falls", 2: "a car engine starts"}


def test_rerank_ties_keep_the_better_beam_and_inputs_are_checked(cider):
    tied = {0: ["a dog barks", "a dog barks"], 1: ["rain"]}
    picked, combined = rerank(tied, similarity=None, cider=cider, similarity_weight=1.0, consensus_weight=1.0)
    assert picked == {0: "a dog barks", 1: "rain"} and combined[1].tolist() == [0.0]
    picked, _ = rerank(NBEST, similarity=None, cider=None, similarity_weight=0.0, consensus_weight=0.0)
    assert picked == {item: texts[0] for item, texts in NBEST.items()}
    with pytest.raises(DataError, match="clip 0 has 3 candidates but 2 similarities"):
        rerank(NBEST, similarity={0: np.zeros(2)}, cider=cider, similarity_weight=1.0, consensus_weight=0.0)
    with pytest.raises(DataError, match="no similarities for clip 1"):
        rerank(NBEST, similarity={0: np.zeros(3)}, cider=cider, similarity_weight=1.0, consensus_weight=0.0)
    with pytest.raises(DataError, match="at least one candidate; none for clips \\[7\\]"):
        rerank({7: []}, similarity=None, cider=cider, similarity_weight=0.0, consensus_weight=1.0)
    with pytest.raises(ConfigError, match="needs a CiderD"):
        rerank(NBEST, similarity=None, cider=None, similarity_weight=0.0, consensus_weight=1.0)


# -- the captioner's contrastive similarity -----------------------------------------------------------------------
CAPTIONS = ["a dog barks twice", "rain falls on a tin roof", "a car engine starts", "birds sing in the morning"]


def test_contrastive_similarity_ranks_each_clips_own_caption_first_after_contrastive_training():
    tokenizer = build_caption_tokenizer(CAPTIONS)
    torch.manual_seed(0)
    config = CaptionModelConfig(
        audio_tokens=4, projector_width=32, projector_heads=4, adapter_dim=32, adapter_heads=4, contrastive_weight=1
    )
    captioner = build_captioner(config, tokenizer)
    features = captioner.encode_source(torch.randn(4, 8_000, generator=torch.Generator().manual_seed(0)))
    batch = encode_captions(tokenizer, CAPTIONS, max_length=12)

    tokens = captioner.source_tokens(source_features=features)
    similarity = captioner.text_source_similarity(tokens, batch["input_ids"], batch["attention_mask"])
    assert similarity.shape == (4, 4) and similarity.abs().max() <= 1 + 1e-6
    # contrastive_loss is the symmetric InfoNCE over exactly these similarities
    logits, targets = similarity / config.temperature, torch.arange(4)
    expected = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    torch.testing.assert_close(
        captioner.contrastive_loss(tokens, batch["input_ids"], batch["attention_mask"]), expected, rtol=0, atol=0
    )

    optimizer = torch.optim.AdamW([p for p in captioner.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(40):
        loss = captioner.contrastive_loss(
            captioner.source_tokens(source_features=features), batch["input_ids"], batch["attention_mask"]
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    # Each clip's N-best list: all four captions, its own one at a different rank each time.
    nbest = {clip: CAPTIONS[clip + 1 :] + CAPTIONS[: clip + 1] for clip in range(4)}
    tokens = captioner.source_tokens(source_features=features)
    values = contrastive_similarity(captioner, tokens, list(nbest.values()), max_length=12)
    reference = captioner.text_source_similarity(tokens, batch["input_ids"], batch["attention_mask"]).detach()
    for clip, texts in nbest.items():
        expected = [reference[clip, CAPTIONS.index(text)].item() for text in texts]
        np.testing.assert_allclose(values[clip], expected, atol=1e-6, rtol=0)
    picked, _ = rerank(
        nbest, similarity=dict(enumerate(values)), cider=None, similarity_weight=1.0, consensus_weight=0.0
    )
    assert picked == dict(enumerate(CAPTIONS))
    with pytest.raises(DataError, match="4 clips' source tokens but 3 candidate lists"):
        contrastive_similarity(captioner, tokens, list(nbest.values())[:3], max_length=12)


# -- N-best metrics --------------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_nbest_metrics_equal_the_scores_of_one_caption_per_clip(scorer):
    reranked = {0: NBEST[0][1], 1: NBEST[1][1], 2: NBEST[2][1]}
    report = nbest_metrics(NBEST, REFERENCES, scorer, reranked)
    by_rank = [scorer.score({item: texts[k] for item, texts in NBEST.items()}, REFERENCES) for k in range(3)]

    # Candidate k's CIDEr-D (and ROUGE-L) is the one a corpus of each clip's k-th candidate gives.
    for metric in ("CIDEr_D", "ROUGE_L"):
        for item in NBEST:
            for k in range(3):
                assert report.per_candidate[metric][(item, k)] == pytest.approx(
                    by_rank[k].per_item[metric][item], abs=1e-9
                )
    rows = {row["decoding"]: row for row in report.table()}
    assert list(rows) == [TOP_BEAM, RERANKED, ORACLE]
    # The top beam's row is rank 0's corpus, the reranked row rank 1's (every pick above is a second beam).
    for name, value in by_rank[0].corpus.items():
        assert rows[TOP_BEAM][name] == pytest.approx(value, abs=1e-12)
        assert rows[RERANKED][name] == pytest.approx(by_rank[1].corpus[name], abs=1e-12)
        assert report.metrics[f"rerank/{name}"] == rows[RERANKED][name]
    # The oracle: per clip the best of the three, averaged; never below the top beam, clip by clip.
    for metric in ("CIDEr_D", "ROUGE_L"):
        best = [max(by_rank[k].per_item[metric][item] for k in range(3)) for item in NBEST]
        assert rows[ORACLE][metric] == pytest.approx(np.mean(best), abs=1e-9)
        assert all(b >= by_rank[0].per_item[metric][item] for b, item in zip(best, NBEST, strict=True))
    assert report.metrics["CIDEr_D_max"] == rows[ORACLE]["CIDEr_D"] > rows[TOP_BEAM]["CIDEr_D"]
    assert rows[ORACLE]["BLEU_4"] is None and rows[ORACLE]["METEOR"] is None
    expected_self_bleu = np.mean([self_bleu([normalize_caption(t) for t in texts]) for texts in NBEST.values()])
    assert report.metrics["self_BLEU_4"] == pytest.approx(expected_self_bleu, abs=1e-12)
    assert "SPIDEr_max" not in report.metrics and "SPICE" not in rows[TOP_BEAM]
    assert report.spice_unavailable_reason == "SPICE was not requested (spice=False)"

    markdown = report.markdown(digits=3)
    assert markdown.startswith("### Decoding vs reranking\n")
    assert f"| {TOP_BEAM} | {rows[TOP_BEAM]['BLEU_1']:.3f} |" in markdown
    assert f"| {ORACLE} | n/a |" in markdown and "SPICE" not in markdown


@pytest.mark.slow
def test_spider_max_takes_each_clips_best_candidate_and_identical_lists_have_self_bleu_one(scorer, monkeypatch):
    # SPICE stand-in: F = words / 10 of the tokenised candidate (SPICE per clip depends on nothing else).
    def fake_spice(gts, res, config):
        return [len(res[position][0].split()) / 10 for position in sorted(gts)]

    monkeypatch.setattr(captioning, "_run_spice", fake_spice)
    monkeypatch.setattr(scorer, "spice", SpiceConfig())
    same = {item: [texts[1]] * 3 for item, texts in NBEST.items()}
    report = nbest_metrics(same, REFERENCES, scorer)
    top = scorer.score({item: texts[0] for item, texts in same.items()}, REFERENCES)
    rows = {row["decoding"]: row for row in report.table()}
    assert list(rows) == [TOP_BEAM, ORACLE] and not any(name.startswith("rerank/") for name in report.metrics)
    for name in ("CIDEr_D", "SPICE", "SPIDEr"):
        assert rows[TOP_BEAM][name] == pytest.approx(top.corpus[name], abs=1e-9)
        assert rows[ORACLE][name] == pytest.approx(top.corpus[name], abs=1e-9)
    assert report.metrics["SPIDEr_max"] == rows[ORACLE]["SPIDEr"]
    assert report.metrics["self_BLEU_4"] == pytest.approx(1.0, abs=1e-6)

    report = nbest_metrics(NBEST, REFERENCES, scorer)
    cider_d = report.per_candidate["CIDEr_D"]
    expected = np.mean(
        [
            max((cider_d[(item, k)] + len(normalize_caption(texts[k]).split()) / 10) / 2 for k in range(3))
            for item, texts in NBEST.items()
        ]
    )
    assert report.metrics["SPIDEr_max"] == pytest.approx(expected, abs=1e-12)
    assert report.metrics["SPIDEr_max"] > {row["decoding"]: row for row in report.table()}[TOP_BEAM]["SPIDEr"]


def test_nbest_metrics_check_their_inputs_before_scoring():
    never = object()  # no scorer call is reached
    with pytest.raises(DataError, match="without a prediction: 3"):
        nbest_metrics(NBEST, {**REFERENCES, 3: ["a tone"]}, never)
    with pytest.raises(DataError, match="at least one candidate; none for clips \\[0\\]"):
        nbest_metrics({**NBEST, 0: []}, REFERENCES, never)
    with pytest.raises(DataError, match="not candidates of their clip: clips \\[2\\]"):
        nbest_metrics(NBEST, REFERENCES, never, {0: NBEST[0][0], 1: NBEST[1][0], 2: "a tone"})
    with pytest.raises(DataError, match="exactly the clips"):
        nbest_metrics(NBEST, REFERENCES, never, {0: NBEST[0][0]})
