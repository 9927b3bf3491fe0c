"""Fusion captioner: encoders, tokenizer, the five fusion modes, losses, decoding, checkpoints of the trainable part."""

import pytest
import torch
from transformers import PreTrainedTokenizerFast

from avlm.config import config_from_dict
from avlm.errors import ConfigError, ModelError
from avlm.models import (
    FUSION_MODES,
    AudioEncoder,
    CaptionModelConfig,
    VideoBackbone,
    build_audio_encoder,
    build_caption_tokenizer,
    build_captioner,
    build_causal_lm,
    build_source_encoder,
    caption_token_losses,
    count_parameters,
    encode_captions,
    find_decoder_layers,
    label_token_counts,
    load_caption_tokenizer,
    load_trainable_state_dict,
    parameter_groups,
    params_ratio,
    trainable_state_dict,
)

CAPTIONS = ["a dog barks twice", "rain falls on a tin roof", "a car engine starts", "birds sing in the morning"]
# Tiny trainable parts over the 32-wide tiny WavLM and the 64-wide, 4-layer tiny GPT-2.
TINY = dict(
    audio_tokens=4,
    projector_width=32,
    projector_heads=4,
    adapter_dim=32,
    adapter_heads=4,
    fusion_layers=[1, 3],
    unfreeze_top=2,
    lora_r=4,
    lora_alpha=8.0,
    lora_dropout=0.0,
)
# Trainable counts by hand (d = 64, a = 32, D_enc = 32, K = 4, projector width 32).
PROJECTOR = (
    (2 * 32) + (32 * 32 + 32) + 4 * 32 + (3 * 32 * 32 + 3 * 32 + 32 * 32 + 32) + (2 * 32 + 32 * 32 + 32 + 32 * 64 + 64)
)
CROSS_ATTENTION = 2 * 2 * 64 + 3 * (64 * 32 + 32) + (32 * 64 + 64)  # two LayerNorms, q/k/v, out
MLP = 2 * 64 + (64 * 32 + 32) + (32 * 64 + 64)  # LayerNorm, d -> a -> d
GPT2_BLOCK = 2 * 2 * 64 + (64 * 192 + 192) + (64 * 64 + 64) + (64 * 256 + 256) + (256 * 64 + 64)
EXPECTED_TRAINABLE = {
    "additive": PROJECTOR + 2 * (CROSS_ATTENTION + MLP + 1),
    "cross_attention": PROJECTOR + 2 * (CROSS_ATTENTION + MLP + 2),
    "concat": PROJECTOR + 2 * (2 * 2 * 64 + (128 * 64 + 64) + (64 * 64 + 64)),
    "partial_unfreeze": PROJECTOR + 2 * (CROSS_ATTENTION + MLP + 2) + 2 * GPT2_BLOCK,
    "data_only": PROJECTOR + 4 * (4 * 64 + 192 * 4),  # LoRA A (r x 64) and B (192 x r) on c_attn in 4 layers
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tokenizer():
    return build_caption_tokenizer(CAPTIONS)


@pytest.fixture(scope="module")
def batch(tokenizer):
    return encode_captions(tokenizer, CAPTIONS, max_length=12)


def waveforms(batch=4, seconds=0.5, seed=0):
    return torch.randn(batch, int(16_000 * seconds), generator=torch.Generator().manual_seed(seed))


def make_captioner(tokenizer, fusion="additive", seed=0, **overrides):
    torch.manual_seed(seed)
    return build_captioner(CaptionModelConfig(fusion=fusion, **{**TINY, **overrides}), tokenizer)


def trainable_names(module):
    return {name for name, p in module.named_parameters() if p.requires_grad}


def train(captioner, batch, features, steps=60, lr=3e-3):
    optimizer = torch.optim.AdamW([p for p in captioner.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    captioner.train()
    losses = []
    for _ in range(steps):
        out = captioner(None, batch["input_ids"], batch["attention_mask"], batch["labels"], source_features=features)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.xe_loss.item())
    captioner.eval()
    return losses


@pytest.fixture(scope="module")
def trained_additive(tokenizer, batch):
    captioner = make_captioner(tokenizer)
    features = captioner.encode_source(waveforms())
    train(captioner, batch, features, steps=80)
    return captioner, features


def bos_prompt(tokenizer, batch_size):
    return torch.full((batch_size, 1), tokenizer.bos_token_id)


# -- tokenizer and encoders -------------------------------------------------------------------------------------
def test_caption_tokenizer_and_teacher_forcing_batch(tokenizer, batch):
    special = (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id)
    assert special == (0, 1, 2, 3)
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    lengths = [len(c.split()) + 2 for c in CAPTIONS]
    assert ids.shape == mask.shape == labels.shape == (4, max(lengths))
    assert mask.sum(1).tolist() == lengths
    assert (ids[:, 0] == tokenizer.bos_token_id).all()
    assert [ids[i, n - 1].item() for i, n in enumerate(lengths)] == [tokenizer.eos_token_id] * 4
    assert torch.equal(labels == -100, mask == 0) and torch.equal(labels[mask == 1], ids[mask == 1])
    assert tokenizer.decode(ids[1], skip_special_tokens=True) == "rain falls on a tin roof"
    assert tokenizer("A DOG meows", add_special_tokens=False)["input_ids"][-1] == tokenizer.unk_token_id

    # GPT-2 style pad == eos: the eos is still a label, because labels are masked by the attention mask.
    same_pad = build_caption_tokenizer(CAPTIONS)
    same_pad.pad_token = same_pad.eos_token
    short = encode_captions(same_pad, ["a dog", "rain falls on a tin roof"], max_length=5)
    assert short["input_ids"].shape == (2, 5)
    assert short["labels"][0].tolist() == [1, *same_pad.convert_tokens_to_ids(["a", "dog"]), 2, -100]
    assert short["input_ids"][1, -1].item() == 2  # cut to 3 words, eos kept


def test_audio_tiny_encoder_is_frozen_seeded_and_tokenises_20ms_frames():
    encoder = build_source_encoder("audio-tiny", init_seed=3)
    assert isinstance(encoder, AudioEncoder) and not isinstance(encoder, VideoBackbone)
    assert (encoder.feature_dim, encoder.sampling_rate, encoder.training) == (32, 16_000, False)
    assert count_parameters(encoder)[0] == 0
    tokens = encoder(waveforms(batch=2)).tokens
    assert tokens.shape == (2, 24, 32)  # 8000 samples, total conv stride 320 -> 24 frames
    again = build_audio_encoder("audio-tiny", init_seed=3)
    assert torch.equal(again(waveforms(batch=2)).tokens, tokens)
    assert again.fingerprint() == encoder.fingerprint() != build_audio_encoder("audio-tiny", init_seed=4).fingerprint()
    with pytest.raises(ModelError, match=r"expects waveforms of shape \(B, S\)"):
        encoder(torch.zeros(2, 1, 8000))


def test_unknown_specs_are_errors():
    with pytest.raises(ModelError, match="unknown encoder 'wav2vec'.*audio-tiny"):
        build_source_encoder("wav2vec")
    with pytest.raises(ModelError, match="unknown lm 'gpt-5'"):
        build_causal_lm("gpt-5", build_caption_tokenizer(CAPTIONS))
    with pytest.raises(ConfigError, match="pass texts"):
        load_caption_tokenizer("lm-tiny")
    with pytest.raises(ModelError, match="could not load audio encoder 'hf:/no/such/dir'"):
        build_audio_encoder("hf:/no/such/dir")


def test_hf_audio_encoders_load_from_a_local_path_whisper_runs_its_encoder_only(tmp_path):
    from transformers import (
        Wav2Vec2FeatureExtractor,
        WavLMConfig,
        WavLMModel,
        WhisperConfig,
        WhisperFeatureExtractor,
        WhisperModel,
    )

    torch.manual_seed(0)
    tiny = build_audio_encoder("audio-tiny")
    WavLMModel(WavLMConfig(**tiny.model.config.to_dict())).save_pretrained(tmp_path / "wavlm")
    Wav2Vec2FeatureExtractor(do_normalize=True).save_pretrained(tmp_path / "wavlm")
    wavlm = build_source_encoder(f"hf:{tmp_path / 'wavlm'}")
    assert (wavlm.feature_dim, wavlm.revision) == (32, None)
    assert wavlm(waveforms(batch=2)).tokens.shape == (2, 24, 32)

    # A 1 s Whisper window: 100 log-mel frames, halved by the encoder's strided conv.
    whisper_config = WhisperConfig(
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        num_mel_bins=16,
        max_source_positions=50,
        vocab_size=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    WhisperModel(whisper_config).save_pretrained(tmp_path / "whisper")
    WhisperFeatureExtractor(feature_size=16, chunk_length=1).save_pretrained(tmp_path / "whisper")
    whisper = build_source_encoder(f"hf:{tmp_path / 'whisper'}")
    assert type(whisper.model).__name__ == "WhisperEncoder" and whisper.feature_dim == 16
    assert not any(p.requires_grad for p in whisper.parameters())
    assert whisper(waveforms(batch=2)).tokens.shape == (2, 50, 16)


def test_hf_lm_and_tokenizer_load_from_local_paths_gpt2_and_llama(tmp_path, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    build_causal_lm("lm-tiny", tokenizer).save_pretrained(tmp_path / "gpt2")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    lm_tokenizer = load_caption_tokenizer(f"hf:{tmp_path / 'gpt2'}")
    assert lm_tokenizer.pad_token_id == 0 and len(lm_tokenizer) == len(tokenizer)
    captioner = make_captioner(lm_tokenizer, lm=f"hf:{tmp_path / 'gpt2'}")
    assert captioner(waveforms(), **encode_captions(lm_tokenizer, CAPTIONS, max_length=12)).loss.isfinite()

    # A Llama with a tokenizer that has no pad token (as Llama's own): pad becomes eos.
    no_pad = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer.backend_tokenizer, bos_token="<bos>", eos_token="<eos>", unk_token="<unk>"
    )
    llama = LlamaForCausalLM(
        LlamaConfig(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=len(no_pad),
        )
    )
    llama.save_pretrained(tmp_path / "llama")
    no_pad.save_pretrained(tmp_path / "llama")
    llama_tokenizer = load_caption_tokenizer(f"hf:{tmp_path / 'llama'}")
    assert llama_tokenizer.pad_token_id == llama_tokenizer.eos_token_id == 2
    captioner = make_captioner(llama_tokenizer, lm=f"hf:{tmp_path / 'llama'}", fusion_layers=[0, 1])
    assert find_decoder_layers(captioner.lm) is captioner.lm.model.layers
    out = captioner(waveforms(), **encode_captions(llama_tokenizer, CAPTIONS, max_length=12))
    assert out.logits.shape[-1] == len(llama_tokenizer) and out.loss.isfinite()
    assert len(captioner.generate(waveforms(batch=2), num_beams=2, max_new_tokens=3).texts) == 2


def test_find_decoder_layers_names_what_it_tried():
    class NoLayers(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = torch.nn.Sequential(torch.nn.Linear(2, 2))

    with pytest.raises(ModelError, match="cannot find the decoder layers of NoLayers: none of transformer.h"):
        find_decoder_layers(NoLayers())


# -- configuration -----------------------------------------------------------------------------------------------
def test_fusion_layers_are_validated_against_the_lm_depth(tokenizer):
    with pytest.raises(ConfigError, match=r"'model.fusion_layers'=\[1, 4\]: \[4\] out of range.*4 decoder layers"):
        make_captioner(tokenizer, fusion_layers=[1, 4])
    with pytest.raises(ConfigError, match="'model.unfreeze_top'=5 exceeds the 4 decoder layers"):
        make_captioner(tokenizer, fusion="partial_unfreeze", unfreeze_top=5)
    for bad in ([], [-1], [2, 2]):
        with pytest.raises(ConfigError, match="model.fusion_layers"):
            CaptionModelConfig(fusion_layers=bad)
    CaptionModelConfig(fusion="data_only", fusion_layers=[])  # no layers in the prefix mode
    with pytest.raises(ConfigError, match="'model.adapter_heads'=3 must divide model.adapter_dim=32"):
        CaptionModelConfig(adapter_dim=32, adapter_heads=3)
    with pytest.raises(ConfigError, match="'model.fusion': unknown mode 'gated'"):
        CaptionModelConfig(fusion="gated")
    with pytest.raises(ConfigError, match="model.temperature"):
        CaptionModelConfig(temperature=0.0)
    with pytest.raises(ConfigError, match="model.lora_targets"):
        make_captioner(tokenizer, fusion="data_only", lora_targets=["q_proj"])


# -- the frozen LM is the starting point ---------------------------------------------------------------------------
def test_additive_with_zero_gates_gives_the_frozen_lms_logits_exactly(tokenizer, batch):
    bare = build_causal_lm("lm-tiny", tokenizer, init_seed=0)
    with torch.no_grad():
        expected = bare(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    captioner = make_captioner(tokenizer)
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with torch.no_grad():
        assert not torch.equal(captioner(waveforms(), **inputs).logits, expected)  # alpha = 0.05 fuses
        for block in captioner.fusion.blocks.values():
            block.alpha.zero_()
        assert torch.equal(captioner(waveforms(), **inputs).logits, expected)
        captioner.train()  # frozen parts stay in eval mode: no dropout in the LM
        assert torch.equal(captioner(waveforms(), **inputs).logits, expected)
        # Without source tokens the hooks are inert: the LM alone is the bare LM (e.g. for a retention probe).
        captioner.fusion.blocks["1"].alpha.fill_(1.0)
        assert torch.equal(captioner.lm(**inputs).logits, expected)


@pytest.mark.parametrize("fusion", ["cross_attention", "concat", "partial_unfreeze"])
def test_gated_and_concat_fusion_start_as_the_frozen_lm(tokenizer, batch, fusion):
    bare = build_causal_lm("lm-tiny", tokenizer, init_seed=0)
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    with torch.no_grad():
        assert torch.equal(make_captioner(tokenizer, fusion)(waveforms(), **inputs).logits, bare(**inputs).logits)


# -- the five modes ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fusion", FUSION_MODES)
def test_only_the_modes_parameters_train(tokenizer, fusion):
    captioner = make_captioner(tokenizer, fusion)
    names = trainable_names(captioner)
    projector = {f"projector.{n}" for n, _ in captioner.projector.named_parameters()}
    assert projector <= names
    assert not trainable_names(captioner.encoder)
    lm_trainable = trainable_names(captioner.lm)
    if fusion in ("additive", "cross_attention", "concat"):
        assert lm_trainable == set()
        assert names == projector | {f"fusion.{n}" for n, _ in captioner.fusion.named_parameters()}
        assert sorted(captioner.fusion_gate_magnitudes()) == ([] if fusion == "concat" else [1, 3])
    elif fusion == "partial_unfreeze":
        assert lm_trainable and all(n.startswith(("transformer.h.2.", "transformer.h.3.")) for n in lm_trainable)
        assert len(lm_trainable) == 2 * len(list(captioner.lm.transformer.h[0].parameters()))
    else:
        assert captioner.fusion is None and captioner.fusion_gate_magnitudes() == {}
        assert lm_trainable and all(".lora_A." in n or ".lora_B." in n for n in lm_trainable)
        assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in lm_trainable} == {"c_attn"}
    counts = captioner.parameter_counts()
    assert counts["trainable"] == EXPECTED_TRAINABLE[fusion] == count_parameters(captioner)[0]
    assert counts["trainable/projector"] == PROJECTOR
    assert counts["trainable"] == counts["trainable/projector"] + counts["trainable/fusion"] + counts["trainable/lm"]

    captioner.train()
    assert not captioner.encoder.training
    lm_layers = find_decoder_layers(captioner.lm)
    assert [layer.training for layer in lm_layers] == [False, False] + [fusion == "partial_unfreeze"] * 2
    assert captioner.projector.training


@pytest.mark.parametrize("fusion", FUSION_MODES)
def test_training_lowers_the_loss_and_generation_runs_through_the_fusion(tokenizer, batch, fusion):
    captioner = make_captioner(tokenizer, fusion)
    features = captioner.encode_source(waveforms())
    frozen_before = {k: v.clone() for k, v in captioner.state_dict().items() if k not in trainable_names(captioner)}
    losses = train(captioner, batch, features)
    assert losses[-1] < 0.6 * losses[0], losses
    for key, value in captioner.state_dict().items():
        if key in frozen_before:
            assert torch.equal(value, frozen_before[key]), key

    greedy = captioner.generate(source_features=features, num_beams=1, max_new_tokens=8)
    beam = captioner.generate(source_features=features, num_beams=3, max_new_tokens=8)
    for out in (greedy, beam):
        assert out.token_ids.shape[0] == 4 and 1 <= out.token_ids.shape[1] <= 8
        assert len(out.texts) == 4 and any(out.texts)
    # The same LM without the source (hooks inert / no prefix) decodes something else: the fusion was active.
    with torch.no_grad():
        prompt = bos_prompt(tokenizer, 4)
        bare = captioner.lm.generate(
            input_ids=prompt,
            attention_mask=torch.ones_like(prompt),
            max_new_tokens=8,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )[:, 1:]
    assert bare.shape != greedy.token_ids.shape or not torch.equal(bare, greedy.token_ids)


def test_trained_additive_captions_its_sources_and_beams_stay_with_their_source(trained_additive):
    captioner, features = trained_additive
    # 80 steps on four clips: decoding through the fusion reproduces each clip's own caption.
    assert captioner.generate(source_features=features, num_beams=1, max_new_tokens=8).texts == CAPTIONS
    beam = captioner.generate(source_features=features, num_beams=3, max_new_tokens=8)
    assert beam.texts == CAPTIONS
    # generate() repeats each sample for its beams: every beam must see its own sample's source tokens, so the
    # batch decodes as each sample does alone.
    for i in range(4):
        alone = captioner.generate(source_features=features[i : i + 1], num_beams=3, max_new_tokens=8).token_ids
        assert torch.equal(beam.token_ids[i, : alone.shape[1]], alone[0])
    # Cached decoding (one new position per step) fuses exactly as the full forward does.
    greedy = captioner.generate(source_features=features, num_beams=1, max_new_tokens=8).token_ids
    uncached = captioner.generate(source_features=features, num_beams=1, max_new_tokens=8, use_cache=False)
    assert torch.equal(greedy, uncached.token_ids)
    several = captioner.generate(source_features=features[:2], num_beams=3, max_new_tokens=8, num_return_sequences=3)
    assert several.token_ids.shape[0] == len(several.texts) == 6
    assert several.texts[0] == CAPTIONS[0] and several.texts[3] == CAPTIONS[1]


# -- losses and gates ----------------------------------------------------------------------------------------------
def test_contrastive_loss_is_finite_depends_on_the_source_and_enters_the_loss(tokenizer, batch):
    captioner = make_captioner(tokenizer, contrastive_weight=0.5)
    first = captioner(waveforms(seed=0), **batch)
    second = captioner(waveforms(seed=1), **batch)
    assert first.contrastive_loss.isfinite() and second.contrastive_loss.isfinite()
    assert first.contrastive_loss.item() != pytest.approx(second.contrastive_loss.item(), abs=1e-4)
    torch.testing.assert_close(first.loss, first.xe_loss + first.fusion_gate_penalty + 0.5 * first.contrastive_loss)
    first.loss.backward()
    assert captioner.projector.queries.grad.abs().sum() > 0
    single = captioner(waveforms(batch=1), **{k: v[:1] for k, v in batch.items()})
    assert single.contrastive_loss.item() == 0.0
    without_labels = captioner(waveforms(), batch["input_ids"], batch["attention_mask"])
    assert without_labels.loss is None and without_labels.xe_loss is None


def test_gate_magnitudes_and_penalty(tokenizer):
    additive = make_captioner(tokenizer, fusion_layers=[3, 0], fusion_gate_init=0.05, fusion_gate_l2=1e-4)
    magnitudes = additive.fusion_gate_magnitudes()
    assert sorted(magnitudes) == [0, 3] and all(m == pytest.approx(0.05) for m in magnitudes.values())
    torch.testing.assert_close(additive.fusion_gate_penalty(), torch.tensor(1e-4 * 2 * 0.05**2))
    with torch.no_grad():
        additive.fusion.blocks["3"].alpha.fill_(-0.5)
    assert additive.fusion_gate_magnitudes()[3] == pytest.approx(0.5)
    cross = make_captioner(tokenizer, "cross_attention")
    assert cross.fusion_gate_magnitudes() == {1: 0.0, 3: 0.0} and cross.fusion_gate_penalty().item() == 0.0
    assert make_captioner(tokenizer, "concat").fusion_gate_magnitudes() == {}


# -- second modality, checkpoints, accounting ----------------------------------------------------------------------
def test_video_source_feeds_the_same_additive_fusion(tokenizer, batch):
    captioner = make_captioner(tokenizer, encoder="vjepa2-tiny", num_frames=4)
    assert isinstance(captioner.encoder, VideoBackbone) and captioner.modality == "video"
    frames = torch.randn(2, 4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    assert captioner.encode_source(frames).shape == (2, 32, 48)
    out = captioner(frames, **{k: v[:2] for k, v in batch.items()})
    assert out.source_tokens.shape == (2, 4, 64) and out.loss.isfinite()
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in captioner.fusion.parameters())
    assert all(p.grad is None for p in captioner.encoder.parameters())
    assert sorted(captioner.fusion_gate_magnitudes()) == [1, 3]
    assert len(captioner.generate(frames, num_beams=2, max_new_tokens=4).texts) == 2


@pytest.mark.parametrize("fusion", ["additive", "data_only"])
def test_trainable_state_dict_round_trip(tokenizer, batch, fusion):
    trained = make_captioner(tokenizer, fusion)
    features = trained.encode_source(waveforms())
    train(trained, batch, features, steps=3)
    state = trainable_state_dict(trained)
    assert set(state) == trainable_names(trained)
    assert sum(v.numel() for v in state.values()) == EXPECTED_TRAINABLE[fusion]
    fresh = make_captioner(tokenizer, fusion, seed=1)
    load_trainable_state_dict(fresh, state)
    with torch.no_grad():
        expected = trained(None, **batch, source_features=features).logits
        assert torch.equal(fresh(None, **batch, source_features=features).logits, expected)


def test_params_ratio_and_parameter_groups(tokenizer):
    additive = make_captioner(tokenizer)
    cross = make_captioner(tokenizer, "cross_attention")
    ratio = params_ratio(additive.parameter_counts()["trainable"], cross.parameter_counts()["trainable"])
    assert ratio == pytest.approx(EXPECTED_TRAINABLE["additive"] / EXPECTED_TRAINABLE["cross_attention"])
    assert abs(ratio - 1) < 0.1
    with pytest.raises(ConfigError, match="reference parameter count"):
        params_ratio(10, 0)
    groups = parameter_groups(
        additive, [("projector", additive.projector, 2e-4), ("adapters", None, 1e-4)], weight_decay=0.01
    )
    by_name = {g["name"]: g for g in groups}
    assert [g["name"] for g in groups] == ["projector", "projector_no_decay", "adapters", "adapters_no_decay"]
    assert sum(p.numel() for g in groups for p in g["params"]) == EXPECTED_TRAINABLE["additive"]
    assert by_name["projector"]["lr"] == 2e-4 and by_name["adapters"]["lr"] == 1e-4
    assert any(p is additive.projector.queries for p in by_name["projector_no_decay"]["params"])
    alphas = [block.alpha for block in additive.fusion.blocks.values()]
    assert all(any(p is a for p in by_name["adapters_no_decay"]["params"]) for a in alphas)
    assert by_name["adapters_no_decay"]["weight_decay"] == 0.0 and by_name["adapters"]["weight_decay"] == 0.01


def test_model_config_loads_through_the_recipe_config_machinery():
    cfg = config_from_dict(
        CaptionModelConfig, {"fusion": "concat", "fusion_layers": [12, 24], "fusion_gate_l2": "1e-4"}
    )
    assert (cfg.fusion, cfg.fusion_layers, cfg.fusion_gate_l2) == ("concat", [12, 24], 1e-4)
    assert (cfg.audio_tokens, cfg.projector_width, cfg.fusion_gate_init) == (16, 768, 0.05)
    with pytest.raises(ConfigError, match="unknown config key 'audio_token'"):
        config_from_dict(CaptionModelConfig, {"audio_token": 8})


def test_token_losses_rebuild_the_token_mean_over_any_split_of_the_captions():
    # what makes the loss the same on 1 or N processes: sums and counts add up, per-split means do not
    torch.manual_seed(0)
    logits = torch.randn(6, 9, 11)
    labels = torch.randint(0, 11, (6, 9))
    labels[0, 4:] = -100  # captions of different lengths
    labels[3, 2:] = -100
    reference = torch.nn.functional.cross_entropy(
        logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100
    )
    halves = [
        (caption_token_losses(logits[s], labels[s]), label_token_counts(labels[s])) for s in (slice(0, 3), slice(3, 6))
    ]
    assert sum(t.sum() for t, _ in halves) / sum(c.sum() for _, c in halves) == pytest.approx(
        reference.item(), rel=1e-6
    )
    assert halves[0][0].sum() / halves[0][1].sum() != pytest.approx(reference.item(), rel=1e-3)  # a half's mean is not
