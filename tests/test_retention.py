"""Retention probe: items and their loader, the demo set, lm-tiny-warm, scoring with and without fusion, verdicts."""

import json

import pytest
import torch

import avlm.models.lm_warmup as lm_warmup
from avlm.config import config_from_dict
from avlm.data.retention_demo import demo_retention_set
from avlm.errors import ConfigError, DataError
from avlm.models import (
    CaptionModelConfig,
    build_caption_tokenizer,
    build_captioner,
    build_causal_lm,
    load_caption_tokenizer,
)
from avlm.models.fusion import AdditiveAdapter
from avlm.models.lm_warmup import build_warm_lm, warm_lm_folder_name, warmup_corpus
from avlm.retention import (
    RetentionConfig,
    RetentionItem,
    load_retention_items,
    load_retention_set,
    retention_verdict,
    score_retention,
    silent_source,
)

# Tiny trainable parts; fusion after layers 1 and 3 of the 4-layer tiny GPT-2 (the default).
TINY = dict(audio_tokens=4, projector_width=32, projector_heads=4, adapter_dim=32, adapter_heads=4, lora_dropout=0.0)


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer():
    # The demo grammar's whole vocabulary, as a captioner trained on the caption demo would have it.
    return build_caption_tokenizer(warmup_corpus())


@pytest.fixture(scope="module")
def items():
    return demo_retention_set()


def captioner(tokenizer, lm="lm-tiny", fusion="additive", **overrides):
    torch.manual_seed(0)
    return build_captioner(CaptionModelConfig(lm=lm, fusion=fusion, **{**TINY, **overrides}), tokenizer)


@pytest.fixture(scope="module")
def warm_captioner(tokenizer):
    # The one full warm-up of the session (about 10 s); later builds read the cache.
    return captioner(tokenizer, lm="lm-tiny-warm")


def set_alphas(model, value):
    adapters = [block for block in model.fusion.blocks.values() if isinstance(block, AdditiveAdapter)]
    assert len(adapters) == 2
    with torch.no_grad():
        for adapter in adapters:
            adapter.alpha.fill_(value)


# -- items -----------------------------------------------------------------------------------------------------
def write_jsonl(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_load_retention_set_reads_items_in_order(tmp_path):
    path = write_jsonl(
        tmp_path / "set.jsonl",
        [
            {"id": "a", "question": "there are three", "choices": ["soft", "softly"], "answer": 0, "note": "x"},
            "",
            {"id": 7, "question": "a deep tone plays", "choices": ["loud", "loudly", "long"], "answer": 1},
        ],
    )
    assert load_retention_set(path) == [
        RetentionItem(id="a", question="there are three", choices=("soft", "softly"), answer=0),
        RetentionItem(id="7", question="a deep tone plays", choices=("loud", "loudly", "long"), answer=1),
    ]


GOOD = {"id": "a", "question": "q", "choices": ["x", "y"], "answer": 0}


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("{not json", r"set.jsonl:2: not valid JSON"),
        (json.dumps(["a"]), r"set.jsonl:2: expected a JSON object"),
        (
            json.dumps({"id": "b", "question": "q", "choices": ["x", "y"]}),
            r"set.jsonl:2: missing key\(s\) \['answer'\]",
        ),
        (json.dumps({**GOOD, "id": "b", "answer": 2}), r"set.jsonl:2: .*answer 2 is not an index into its 2"),
        (json.dumps({**GOOD, "id": "b", "answer": True}), r"set.jsonl:2: .*answer True"),
        (json.dumps({**GOOD, "id": "b", "choices": ["x", "X!"]}), r"set.jsonl:2: .*two or more distinct"),
        (json.dumps({**GOOD, "id": "b", "choices": ["x"]}), r"set.jsonl:2: .*two or more distinct"),
        (json.dumps({**GOOD, "id": "b", "choices": "xy"}), r"set.jsonl:2: 'choices' must be a list of strings"),
        (json.dumps({**GOOD, "id": "b", "question": " ?"}), r"set.jsonl:2: .*empty question"),
        (json.dumps(GOOD), r"set.jsonl:2: id 'a' already used on line 1"),
    ],
)
def test_load_retention_set_errors_name_file_and_line(tmp_path, line, message):
    path = write_jsonl(tmp_path / "set.jsonl", [GOOD, line])
    with pytest.raises(DataError, match=message):
        load_retention_set(path)


def test_load_retention_set_rejects_missing_and_empty_files(tmp_path):
    with pytest.raises(DataError, match="cannot read retention set .*nothing.jsonl"):
        load_retention_set(tmp_path / "nothing.jsonl")
    with pytest.raises(DataError, match="empty.jsonl' holds no items"):
        load_retention_set(write_jsonl(tmp_path / "empty.jsonl", [""]))


def test_demo_set_is_mirrored_in_vocabulary_and_deterministic(tokenizer, items):
    assert len(items) == 120 and len({item.id for item in items}) == 120
    assert demo_retention_set() == items
    assert {item.id.split("-")[0] for item in items} == {"number", "slot", "form"}
    # Mirrored pairs: same two words, the other one right, so a context-blind preference scores exactly 50%.
    for first, second in zip(items[::2], items[1::2], strict=True):
        assert set(first.choices) == set(second.choices)
        assert first.choices[first.answer] != second.choices[second.answer]
    assert sum(item.answer for item in items) == 61  # the right choice's position is random
    unknown = tokenizer.unk_token_id
    for item in items:
        for choice in item.choices:
            assert unknown not in tokenizer(f"{item.question} {choice}")["input_ids"]
    assert load_retention_items("demo") == items


def test_retention_config_validates_and_parses():
    assert config_from_dict(RetentionConfig, {"enabled": True, "max_drop_pt": 1}) == RetentionConfig(True, "demo", 1.0)
    with pytest.raises(ConfigError, match="config key 'retention.max_drop_pt' must be >= 0"):
        RetentionConfig(max_drop_pt=-0.1)
    with pytest.raises(ConfigError, match="config key 'retention.items' is empty"):
        RetentionConfig(items="")


def test_retention_verdict():
    assert retention_verdict(0.9, 0.9, 0.5) == (0.0, "PASS")
    delta, verdict = retention_verdict(0.995, 1.0, 0.5)  # exactly the tolerated drop
    assert delta == pytest.approx(-0.5) and verdict == "PASS"
    assert retention_verdict(0.99, 1.0, 0.5) == (pytest.approx(-1.0), "FAIL")
    assert retention_verdict(1.0, 0.5, 0.0) == (50.0, "PASS")
    with pytest.raises(ValueError, match="accuracy must be in"):
        retention_verdict(1.5, 0.5, 0.5)


# -- lm-tiny-warm ----------------------------------------------------------------------------------------------
def test_warm_up_is_deterministic_and_cached(tokenizer, tmp_path, monkeypatch):
    first = build_warm_lm(tokenizer, init_seed=3, steps=5, cache_dir=tmp_path / "a")
    second = build_warm_lm(tokenizer, init_seed=3, steps=5, cache_dir=tmp_path / "b")  # trained again
    cold = build_causal_lm("lm-tiny", tokenizer, init_seed=3)
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, second.state_dict()[name]), name
    assert not torch.equal(first.transformer.wte.weight, cold.transformer.wte.weight)

    def no_training(*args, **kwargs):
        raise AssertionError("the cached warm-up should have been read, not trained again")

    monkeypatch.setattr(lm_warmup, "warm_up_lm", no_training)
    cached = build_warm_lm(tokenizer, init_seed=3, steps=5, cache_dir=tmp_path / "a")
    for name, tensor in first.state_dict().items():
        assert torch.equal(tensor, cached.state_dict()[name]), name
    # The key: vocabulary, seed and steps.
    names = {
        warm_lm_folder_name(tokenizer, init_seed=3, steps=5),
        warm_lm_folder_name(tokenizer, init_seed=4, steps=5),
        warm_lm_folder_name(tokenizer, init_seed=3, steps=6),
        warm_lm_folder_name(build_caption_tokenizer(["a dog barks"]), init_seed=3, steps=5),
    }
    assert len(names) == 4


def test_lm_tiny_warm_spec(tokenizer, warm_captioner):
    assert (
        load_caption_tokenizer("lm-tiny-warm", ["a beep"]).get_vocab()
        == build_caption_tokenizer(["a beep"]).get_vocab()
    )
    with pytest.raises(ConfigError, match="lm 'lm-tiny-warm' builds its vocabulary from captions"):
        load_caption_tokenizer("lm-tiny-warm")
    # Rebuilding a checkpoint's LM gives the same frozen weights.
    rebuilt = build_causal_lm("lm-tiny-warm", tokenizer, init_seed=0)
    for name, tensor in rebuilt.state_dict().items():
        assert torch.equal(tensor, warm_captioner.lm.state_dict()[name]), name
    assert warm_captioner.parameter_counts()["trainable/lm"] == 0


# -- scoring ---------------------------------------------------------------------------------------------------
def test_random_lm_is_at_chance_and_warm_lm_far_above(tokenizer, items, warm_captioner):
    cold = score_retention(captioner(tokenizer), items, with_fusion=False)
    warm = score_retention(warm_captioner, items, with_fusion=False)
    assert cold.accuracy == pytest.approx(52 / 120)  # chance is 0.5
    assert warm.accuracy == 1.0
    # Every right choice wins by over 2 nats (a factor of e² in probability).
    margins = [abs(row["log_likelihoods"][0] - row["log_likelihoods"][1]) for row in warm.per_item]
    assert min(margins) > 2.0
    row = warm.per_item[0]
    assert set(row) == {"id", "predicted", "answer", "correct", "log_likelihoods"}
    assert row["id"] == "number-000" and len(row["log_likelihoods"]) == 2 and row["correct"]


def test_score_is_summed_choice_log_likelihood_after_bos_question(tokenizer):
    model = captioner(tokenizer)
    item = RetentionItem(id="x", question="There are THREE, soft", choices=("beeps", "noise bursts"), answer=1)
    result = score_retention(model, [item], with_fusion=False)
    for choice, score in zip(item.choices, result.per_item[0]["log_likelihoods"], strict=True):
        ids = [tokenizer.bos_token_id, *tokenizer(f"there are three soft {choice}")["input_ids"]]
        log_probs = model.lm(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
        n = len(choice.split())
        expected = sum(float(log_probs[t - 1, ids[t]]) for t in range(len(ids) - n, len(ids)))
        assert score == pytest.approx(expected, abs=1e-5)
    # Batching changes nothing.
    several = [item, RetentionItem(id="y", question="a deep", choices=("tone", "tones", "beep"), answer=0)]
    one_by_one = score_retention(model, several, with_fusion=False, batch_size=1)
    batched = score_retention(model, several, with_fusion=False, batch_size=32)
    for a, b in zip(one_by_one.per_item, batched.per_item, strict=True):
        assert a["log_likelihoods"] == pytest.approx(b["log_likelihoods"], abs=1e-5)


def test_alpha_zero_gives_exactly_zero_delta(tokenizer, items, warm_captioner):
    model = warm_captioner
    set_alphas(model, 0.0)
    alone = score_retention(model, items, with_fusion=False)
    fused = score_retention(model, items, with_fusion=True)
    assert [row["log_likelihoods"] for row in fused.per_item] == [row["log_likelihoods"] for row in alone.per_item]
    assert retention_verdict(fused.accuracy, alone.accuracy, 0.0) == (0.0, "PASS")
    # Not vacuous: with alpha != 0 the silent source does reach the LM.
    set_alphas(model, 0.05)
    nudged = score_retention(model, items, with_fusion=True)
    assert nudged.per_item[0]["log_likelihoods"] != alone.per_item[0]["log_likelihoods"]


def test_tolerance_check_fails_on_a_forced_drop(items, warm_captioner):
    model = warm_captioner
    set_alphas(model, 0.0)
    reference = score_retention(model, items, with_fusion=False).accuracy
    set_alphas(model, 200.0)  # the adapters' random update swamps the LM's hidden states
    dropped = score_retention(model, items, with_fusion=True)
    set_alphas(model, 0.05)
    delta, verdict = retention_verdict(dropped.accuracy, reference, 0.5)
    assert verdict == "FAIL" and delta < -10
    assert model.training is False


def test_data_only_uses_the_lm_without_lora_and_the_silent_prefix(tokenizer, items):
    additive = captioner(tokenizer)
    data_only = captioner(tokenizer, fusion="data_only")
    with torch.no_grad():  # LoRA B starts at 0: make the adapters matter
        for name, parameter in data_only.lm.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.5)
    alone = score_retention(data_only, items[:8], with_fusion=False)
    reference = score_retention(additive, items[:8], with_fusion=False)  # the same lm-tiny (init_seed 0)
    for a, b in zip(alone.per_item, reference.per_item, strict=True):
        assert a["log_likelihoods"] == pytest.approx(b["log_likelihoods"], abs=1e-5)
    fused = score_retention(data_only, items[:8], with_fusion=True)
    assert fused.per_item[0]["log_likelihoods"] != pytest.approx(alone.per_item[0]["log_likelihoods"], abs=1e-3)


def test_silent_source_for_audio_and_video(tokenizer):
    audio = captioner(tokenizer)
    assert silent_source(audio).shape == (1, 16_000) and not silent_source(audio).any()
    video = captioner(tokenizer, encoder="timm-tiny", num_frames=2)
    frames = silent_source(video)
    assert frames.shape == (1, 2, 3, video.encoder.image_size, video.encoder.image_size) and not frames.any()
    item = RetentionItem(id="x", question="a deep", choices=("tone", "tones"), answer=0)
    assert len(score_retention(video, [item], with_fusion=True).per_item[0]["log_likelihoods"]) == 2


def test_score_retention_rejects_empty_input(tokenizer):
    with pytest.raises(DataError, match="no retention items"):
        score_retention(captioner(tokenizer), [], with_fusion=False)


def test_words_outside_the_vocabulary_are_warned(tokenizer, caplog):
    item = RetentionItem(id="x", question="a deep", choices=("tone", "trombone"), answer=0)
    score_retention(captioner(tokenizer), [item], with_fusion=False)
    assert "1 of 2 retention sequences hold unknown tokens" in caplog.text
