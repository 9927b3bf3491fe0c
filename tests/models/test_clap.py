"""CLAP similarity: shapes, determinism, resampling, the model's own logits as reference, loading from a path."""

import numpy as np
import pytest
import torch
from scipy.signal import resample_poly

from avlm.errors import DataError, ModelError
from avlm.models.clap import ClapSimilarity

CANDIDATES = [
    ["a loud short high beep sounds once", "a quiet tone", "there are three noise bursts, each brief and deep"],
    ["a soft rising chirp"],
    ["two words", "a falling chirp plays softly three times", "unknown words zebra"],
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def clap():
    return ClapSimilarity("clap-tiny")


def clips(seed=0):
    """Three 16 kHz clips: longer than clap-tiny's 1 s window (cropped at random), shorter (repeat-padded), between."""
    rng = np.random.default_rng(seed)
    return [0.1 * rng.standard_normal(n).astype(np.float32) for n in (40_000, 8_000, 17_000)]


def test_similarity_has_one_cosine_per_candidate_and_is_deterministic(clap):
    np.random.seed(123)
    before = np.random.get_state()[1].copy()
    first = clap.similarity(clips(), 16_000, CANDIDATES)
    # numpy's global RNG (the feature extractor's random crop) is seeded for the call and then restored
    np.testing.assert_array_equal(np.random.get_state()[1], before)
    np.random.seed(7)  # another global state changes nothing
    again = clap.similarity(clips(), 16_000, CANDIDATES)
    rebuilt = ClapSimilarity("clap-tiny").similarity(clips(), 16_000, CANDIDATES)
    assert [s.shape for s in first] == [(3,), (1,), (3,)]
    assert all(s.dtype == np.float64 and np.all(np.abs(s) <= 1) for s in first)
    for a, b, c in zip(first, again, rebuilt, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    # different clips, different similarities; another init seed, another model
    other = clap.similarity(clips(seed=1), 16_000, CANDIDATES)
    assert not np.allclose(first[0], other[0])
    reseeded = ClapSimilarity("clap-tiny", init_seed=1).similarity(clips(), 16_000, CANDIDATES)
    assert not np.allclose(first[0], reseeded[0])


def test_similarity_is_the_models_own_audio_text_logit_over_its_scale(clap):
    """ClapModel.forward's logits_per_audio are logit_scale · cos(audio, text): the reference for the cosines."""
    waveform = clips()[1]  # within the 1 s window: no random crop to repeat
    texts = CANDIDATES[0]
    extractor, tokenizer = clap.processor.feature_extractor, clap.processor.tokenizer
    audio = extractor(resample_poly(waveform.astype(np.float64), 3, 1), sampling_rate=48_000, return_tensors="pt")
    text = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = clap.model(**text, **audio)
    expected = (out.logits_per_audio[0] / clap.model.logit_scale_a.exp()).double().numpy()
    np.testing.assert_allclose(clap.similarity([waveform], 16_000, [texts])[0], expected, atol=1e-6, rtol=0)


def test_other_rates_are_resampled_to_48_khz(clap):
    waveform = clips()[1]
    at_16k = clap.similarity([waveform], 16_000, [CANDIDATES[0]])[0]
    at_48k = clap.similarity([resample_poly(waveform.astype(np.float64), 3, 1)], 48_000, [CANDIDATES[0]])[0]
    np.testing.assert_array_equal(at_16k, at_48k)
    assert clap.sampling_rate == 48_000
    # torch tensors are accepted as well
    from_tensor = clap.similarity([torch.from_numpy(waveform)], 16_000, [CANDIDATES[0]])[0]
    np.testing.assert_array_equal(from_tensor, at_16k)


def test_tiny_tokenizer_knows_the_demo_vocabulary_and_adds_bos_eos(clap):
    tokenizer = clap.processor.tokenizer
    ids = tokenizer("a faint brief high pitched beep sounds three times")["input_ids"]
    assert ids[0] == tokenizer.bos_token_id and ids[-1] == tokenizer.eos_token_id
    assert tokenizer.unk_token_id not in ids
    assert tokenizer("a zebra")["input_ids"][2] == tokenizer.unk_token_id


def test_hf_spec_loads_a_saved_clap_from_a_local_path(clap, tmp_path):
    clap.model.save_pretrained(tmp_path)
    clap.processor.save_pretrained(tmp_path)
    loaded = ClapSimilarity(f"hf:{tmp_path}")
    expected = clap.similarity(clips(), 16_000, CANDIDATES)
    for a, b in zip(loaded.similarity(clips(), 16_000, CANDIDATES), expected, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def test_bad_specs_and_inputs_are_errors(clap, tmp_path):
    with pytest.raises(ModelError, match="unknown CLAP model 'clap-huge'"):
        ClapSimilarity("clap-huge")
    with pytest.raises(ModelError, match="could not load CLAP model"):
        ClapSimilarity(f"hf:{tmp_path / 'missing'}")
    with pytest.raises(DataError, match="2 clips but 1 candidate lists"):
        clap.similarity(clips()[:2], 16_000, CANDIDATES[:1])
    with pytest.raises(DataError, match="clip 0: expected a non-empty mono waveform"):
        clap.similarity([np.zeros((2, 100))], 16_000, [["a tone"]])
    with pytest.raises(DataError, match="sample_rate must be a positive integer"):
        clap.similarity(clips()[:1], 0, CANDIDATES[:1])
