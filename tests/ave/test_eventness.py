"""Stage-1 eventness: each scorer on hand-made features, the learned heads on a separable set, post-processing,
the score file and its cache."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator, Mapping

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from avlm.ave import eventness
from avlm.ave.eventness import (
    SCORERS,
    EventnessConfig,
    EventnessInputs,
    cached_eventness_scores,
    eventness_scores,
    postprocess,
    read_scores,
    register_scorer,
    write_scores,
)
from avlm.config import config_from_dict
from avlm.errors import AvlmError, ConfigError, DataError

SECONDS = 10


@pytest.fixture(autouse=True)
def one_thread():
    """The heads' steps are tiny: on a busy 2-core machine a second intra-op thread makes them ~30x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@dataclasses.dataclass
class StandInFeatures:
    """The fields of avlm.ave.features.AveFeatures that the scorers read."""

    video_ids: list[str]
    stage1_visual: dict[int, torch.Tensor]
    audio: torch.Tensor
    audio_rms: torch.Tensor
    visual: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    tokens: dict[int, int] = dataclasses.field(default_factory=dict)
    key: dict[str, str] = dataclasses.field(default_factory=lambda: {"features": "stand-in"})

    def index(self, video_ids):
        position = {video_id: i for i, video_id in enumerate(self.video_ids)}
        return [position[video_id] for video_id in video_ids]


def _features(n: int, audio_dim: int = 2, visual_dim: int = 2, resolutions=(56, 80)) -> StandInFeatures:
    return StandInFeatures(
        video_ids=[f"v{i}" for i in range(n)],
        stage1_visual={r: torch.zeros(n, SECONDS, visual_dim) for r in resolutions},
        audio=torch.zeros(n, SECONDS, audio_dim),
        audio_rms=torch.zeros(n, SECONDS),
    )


def _inputs(features, labels=None, train_ids=()) -> EventnessInputs:
    return EventnessInputs(features=features, labels=labels or {}, train_ids=list(train_ids))


# ----------------------------------------------------------------------------------------------------------------
# Training-free scorers, oracle, random


def test_audio_energy_is_the_rms_and_peaks_where_it_is_loud():
    features = _features(2)
    features.audio_rms[0] = torch.tensor([0.1, 0.1, 0.2, 0.9, 0.8, 0.1, 0.1, 0.1, 0.1, 0.1])
    features.audio_rms[1, 7] = 0.5
    scores = eventness_scores(_inputs(features), EventnessConfig(method="audio_energy"), ["v1", "v0"])
    assert list(scores) == ["v1", "v0"]
    np.testing.assert_array_equal(scores["v0"], features.audio_rms[0].double().numpy())
    assert scores["v0"].dtype == np.float64
    assert int(np.argmax(scores["v0"])) == 3 and int(np.argmax(scores["v1"])) == 7


def test_visual_change_peaks_at_a_cut_on_the_lowest_resolution_by_default():
    features = _features(1)
    features.stage1_visual[56][0, 6:] = torch.tensor([3.0, 4.0])  # a cut between seconds 5 and 6
    features.stage1_visual[80][0, 2:] = torch.tensor([1.0, 0.0])  # another cut, at 80 px only
    lowest = eventness_scores(_inputs(features), EventnessConfig(method="visual_change"), ["v0"])["v0"]
    np.testing.assert_array_equal(lowest, [0, 0, 0, 0, 0, 0, 5, 0, 0, 0])
    at_80 = eventness_scores(_inputs(features), EventnessConfig(method="visual_change", visual_resolution=80), ["v0"])
    np.testing.assert_array_equal(at_80["v0"], [0, 0, 1, 0, 0, 0, 0, 0, 0, 0])
    # Second 0 is compared with second 1: a cut right after it marks both.
    features.stage1_visual[56][0, 1:] = torch.tensor([3.0, 4.0])
    first = eventness_scores(_inputs(features), EventnessConfig(method="visual_change"), ["v0"])["v0"]
    np.testing.assert_array_equal(first, [5, 5, 0, 0, 0, 0, 0, 0, 0, 0])


def test_a_resolution_that_is_not_cached_names_the_key():
    with pytest.raises(ConfigError, match=r"^config key 'eventness.visual_resolution': 112 .*\[56, 80\]"):
        eventness_scores(_inputs(_features(1)), EventnessConfig(method="visual_change", visual_resolution=112), ["v0"])


def test_av_cosine_is_high_where_audio_and_visual_align():
    features = _features(1)
    features.audio[0] = torch.tensor([1.0, 0.0])
    features.stage1_visual[56][0] = torch.tensor([0.0, 2.0])  # orthogonal: cosine 0
    features.stage1_visual[56][0, 2] = torch.tensor([5.0, 0.0])  # aligned: 1
    features.stage1_visual[56][0, 7] = torch.tensor([-1.0, 0.0])  # opposed: -1
    features.stage1_visual[56][0, 4] = torch.tensor([1.0, 1.0])  # 45°
    scores = eventness_scores(_inputs(features), EventnessConfig(method="av_cosine"), ["v0"])["v0"]
    expected = np.zeros(SECONDS)
    expected[[2, 7, 4]] = [1.0, -1.0, np.sqrt(0.5)]
    np.testing.assert_allclose(scores, expected, atol=1e-12)


def test_av_cosine_needs_a_shared_space():
    with pytest.raises(ConfigError, match=r"^config key 'eventness.method': .*3 and 2 wide: a shared-space model"):
        eventness_scores(_inputs(_features(1, audio_dim=3)), EventnessConfig(method="av_cosine"), ["v0"])


def test_oracle_is_the_labels_and_keeps_ties():
    labels = {"v0": np.array([0, 0, 3, 3, 3, 0, 0, 0, 1, 0]), "v1": np.zeros(SECONDS, dtype=np.int64)}
    scores = eventness_scores(_inputs(_features(2), labels), EventnessConfig(method="oracle"), ["v0", "v1"])
    np.testing.assert_array_equal(scores["v0"], [0, 0, 1, 1, 1, 0, 0, 0, 1, 0])
    np.testing.assert_array_equal(scores["v1"], np.zeros(SECONDS))
    with pytest.raises(DataError, match=r"oracle scorer needs labels of 1 clips .*'v1'"):
        eventness_scores(_inputs(_features(2), {"v0": labels["v0"]}), EventnessConfig(method="oracle"), ["v0", "v1"])


def test_random_is_seeded_per_clip():
    features = _features(3)
    cfg = EventnessConfig(method="random", seed=4)
    together = eventness_scores(_inputs(features), cfg, ["v0", "v1", "v2"])
    alone = eventness_scores(_inputs(features), cfg, ["v2"])
    np.testing.assert_array_equal(together["v2"], alone["v2"])
    assert not np.array_equal(together["v0"], together["v1"])
    other_seed = eventness_scores(_inputs(features), EventnessConfig(method="random", seed=5), ["v2"])
    assert not np.array_equal(other_seed["v2"], alone["v2"])
    assert all(((0 <= s) & (s < 1)).all() for s in together.values())


# ----------------------------------------------------------------------------------------------------------------
# Learned heads


def _separable_set(n: int = 80, seed: int = 0) -> tuple[StandInFeatures, dict[str, np.ndarray]]:
    """One event per clip (1–6 s, class 1..3); event seconds' audio is shifted along a common "event" direction
    and along their class's direction."""
    rng = np.random.default_rng(seed)
    audio = rng.normal(size=(n, SECONDS, 6))
    visual = rng.normal(size=(n, SECONDS, 4))
    labels = {}
    for i in range(n):
        length = int(rng.integers(1, 7))
        start = int(rng.integers(0, SECONDS - length + 1))
        cls = int(rng.integers(1, 4))
        row = np.zeros(SECONDS, dtype=np.int64)
        row[start : start + length] = cls
        audio[i, start : start + length, 0] += 4.0
        audio[i, start : start + length, cls] += 3.0
        labels[f"v{i}"] = row
    features = StandInFeatures(
        video_ids=[f"v{i}" for i in range(n)],
        stage1_visual={56: torch.tensor(visual, dtype=torch.float32)},
        audio=torch.tensor(audio, dtype=torch.float32),
        audio_rms=torch.zeros(n, SECONDS),
    )
    return features, labels


def _auc(scores: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray]) -> float:
    ids = list(scores)
    return roc_auc_score(np.concatenate([labels[v] != 0 for v in ids]), np.concatenate([scores[v] for v in ids]))


@pytest.mark.parametrize(
    ("objective", "head"),
    [("bce", "mlp"), ("mil", "mlp"), ("multiclass", "mlp"), ("bce", "tcn"), ("mil", "bilstm"), ("multiclass", "tcn")],
)
def test_learned_heads_rank_event_seconds_first_on_held_out_clips(objective, head):
    features, labels = _separable_set()
    train, held_out = features.video_ids[:60], features.video_ids[60:]
    cfg = EventnessConfig(method="learned", objective=objective, head=head, hidden=16, epochs=20, lr=1e-2)
    scores = eventness_scores(_inputs(features, labels, train), cfg, held_out)
    assert _auc(scores, labels) > 0.9
    # Deterministic given the seed, and the global RNG is left alone.
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    again = eventness_scores(_inputs(features, labels, train), cfg, held_out)
    assert torch.equal(torch.rand(1), before)
    for video_id in held_out:
        np.testing.assert_array_equal(again[video_id], scores[video_id])


def test_mil_learns_from_clip_level_labels_only():
    features, labels = _separable_set(n=30)
    train = features.video_ids[:20]
    cfg = EventnessConfig(method="learned", objective="mil", epochs=3)
    scores = eventness_scores(_inputs(features, labels, train), cfg, ["v25"])
    # Moving each train clip's event to other seconds keeps its clip-level labels: the same fit.
    moved = {video_id: np.roll(labels[video_id], 3) for video_id in train}
    again = eventness_scores(_inputs(features, moved, train), cfg, ["v25"])
    np.testing.assert_array_equal(again["v25"], scores["v25"])
    one_class = {video_id: np.where(labels[video_id] != 0, 2, 0) for video_id in train}
    with pytest.raises(DataError, match=r"every train clip has the same event classes \(\[2\]\): use bce"):
        eventness_scores(_inputs(features, one_class, train), cfg, ["v25"])


class TrainOnlyLabels(Mapping):
    """Labels that fail the test if anything reads a clip outside ``allowed``."""

    def __init__(self, labels: Mapping[str, np.ndarray], allowed):
        self.labels, self.allowed, self.read = dict(labels), set(allowed), set()

    def __getitem__(self, video_id):
        assert video_id in self.allowed, f"read the label of non-train clip {video_id}"
        self.read.add(video_id)
        return self.labels[video_id]

    def __iter__(self) -> Iterator[str]:
        raise AssertionError("iterated over every clip's labels")

    def __len__(self) -> int:
        return len(self.labels)


def test_learned_reads_only_train_labels(tmp_path):
    features, labels = _separable_set(n=30)
    train = features.video_ids[:20]
    guarded = TrainOnlyLabels(labels, train)
    cfg = EventnessConfig(method="learned", epochs=2)
    inputs = _inputs(features, guarded, train)
    scores, _ = cached_eventness_scores(inputs, cfg, features.video_ids, tmp_path)
    assert set(scores) == set(features.video_ids)
    assert guarded.read == set(train)


def test_learned_refuses_train_labels_without_background():
    features, _ = _separable_set(n=4)
    all_events = {video_id: np.ones(SECONDS, dtype=np.int64) for video_id in features.video_ids}
    with pytest.raises(DataError, match="40 event and 0 background seconds over 4 train clips"):
        eventness_scores(
            _inputs(features, all_events, features.video_ids), EventnessConfig(method="learned", epochs=1), ["v0"]
        )


def test_learned_features_follow_the_inputs_order():
    features, _ = _separable_set(n=3)
    features.audio_rms[:] = 7.0
    x = eventness._learned_features(features, EventnessConfig(inputs=["audio_rms", "audio"]), ["v2", "v0"])
    assert x.shape == (2, SECONDS, 1 + 6)
    assert torch.equal(x[:, :, 0], torch.full((2, SECONDS), 7.0))
    assert torch.equal(x[0, :, 1:], features.audio[2])


# ----------------------------------------------------------------------------------------------------------------
# Post-processing


def test_smoothing_is_a_centred_mean_cut_at_the_edges():
    scores = np.array([[0.0, 0, 3, 0, 0, 0, 0, 0, 0, 6]])
    np.testing.assert_allclose(postprocess(scores, 3), [[0, 1, 1, 1, 0, 0, 0, 0, 2, 3]], rtol=0, atol=1e-12)
    np.testing.assert_allclose(
        postprocess(scores, 5), [[1, 0.75, 0.6, 0.6, 0.6, 0, 0, 1.2, 1.5, 2]], rtol=0, atol=1e-12
    )
    np.testing.assert_array_equal(postprocess(scores, 1), scores)


def test_normalisations_equal_hand_computed_values():
    x = np.array([[2.0, 4, 4, 4, 5, 5, 7, 9, 5, 5], [3.0] * SECONDS])
    minmax = postprocess(x, normalize="minmax")
    np.testing.assert_allclose(minmax[0], (x[0] - 2) / 7, atol=1e-12)
    # mean 5; squared deviations 9+1+1+1+4+16 = 32 over 10 seconds: std √3.2
    zscore = postprocess(x, normalize="zscore")
    np.testing.assert_allclose(zscore[0], np.array([-3, -1, -1, -1, 0, 0, 2, 4, 0, 0]) / np.sqrt(3.2), atol=1e-12)
    # A flat clip carries no ranking: zeros, not NaN.
    np.testing.assert_array_equal(minmax[1], np.zeros(SECONDS))
    np.testing.assert_array_equal(zscore[1], np.zeros(SECONDS))
    # Smoothing first, then normalisation.
    smoothed = postprocess(np.array([[0.0, 0, 3, 0, 0, 0, 0, 0, 0, 6]]), 3, "minmax")
    np.testing.assert_allclose(smoothed, [[0, 1 / 3, 1 / 3, 1 / 3, 0, 0, 0, 0, 2 / 3, 1]], atol=1e-12)


def test_eventness_scores_post_process_the_scorer():
    features = _features(1)
    features.audio_rms[0] = torch.tensor([0.0, 0, 3, 0, 0, 0, 0, 0, 0, 6])
    cfg = EventnessConfig(method="audio_energy", smoothing=3, normalize="minmax")
    scores = eventness_scores(_inputs(features), cfg, ["v0"])["v0"]
    np.testing.assert_allclose(scores, [0, 1 / 3, 1 / 3, 1 / 3, 0, 0, 0, 0, 2 / 3, 1], atol=1e-12)


# ----------------------------------------------------------------------------------------------------------------
# Config and registry


@pytest.mark.parametrize(
    ("values", "key"),
    [
        ({"method": "imagebind"}, "method"),
        ({"head": "gru"}, "head"),
        ({"inputs": []}, "inputs"),
        ({"inputs": ["audio", "audio"]}, "inputs"),
        ({"inputs": ["video"]}, "inputs"),
        ({"smoothing": 2}, "smoothing"),
        ({"mil_top_k": 11}, "mil_top_k"),
        ({"lr": 0.0}, "lr"),
        ({"epochs": 0}, "epochs"),
    ],
)
def test_config_errors_name_the_key(values, key):
    with pytest.raises(ConfigError, match=rf"^config key 'eventness.{key}': "):
        EventnessConfig(**values)


def test_config_loads_through_the_config_loader():
    cfg = config_from_dict(EventnessConfig, {"method": "learned", "inputs": ["audio_rms"], "normalize": "zscore"})
    assert (cfg.method, cfg.inputs, cfg.normalize) == ("learned", ["audio_rms"], "zscore")


def test_registered_scorers_are_checked(monkeypatch):
    monkeypatch.setattr(eventness, "SCORERS", dict(SCORERS))
    monkeypatch.setattr(eventness, "_LABELS_READ", dict(eventness._LABELS_READ))

    @register_scorer("nine_seconds")
    def nine_seconds(inputs, cfg, video_ids):
        return {video_id: np.zeros(9) for video_id in video_ids}

    with pytest.raises(ValueError, match="already registered"):
        register_scorer("nine_seconds")(nine_seconds)
    with pytest.raises(AvlmError, match=r"scorer 'nine_seconds' must give 10 finite scores .*'v0'"):
        eventness_scores(_inputs(_features(1)), EventnessConfig(method="nine_seconds"), ["v0"])


# ----------------------------------------------------------------------------------------------------------------
# The score file and the cache


def test_write_then_read_round_trips_exactly(tmp_path):
    scores = {
        "a": np.array([0.1, 1 / 3, -1e-300, 2.5e10, 0, 1, 2, 3, 4, 5]),
        "b": np.linspace(0, 1, SECONDS),
        "c": np.arange(SECONDS, dtype=np.float64),
    }
    path = tmp_path / "sub" / "eventness_scores.json"
    write_scores(path, scores)
    assert json.loads(path.read_text()) == {k: v.tolist() for k, v in scores.items()}
    back = read_scores(path, ["c", "a"])
    assert list(back) == ["c", "a"]
    for video_id in back:
        np.testing.assert_array_equal(back[video_id], scores[video_id])
        assert back[video_id].dtype == np.float64
    assert [p.name for p in path.parent.iterdir()] == ["eventness_scores.json"]  # no temporary file left


def test_read_names_missing_and_bad_ids(tmp_path):
    path = tmp_path / "scores.json"
    path.write_text(
        '{\n  "a": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],\n  "b": [1, 2],\n  "c": [0, 0, 0, 0, 0, 0, 0, 0, 0, "x"]\n}\n'
    )
    with pytest.raises(DataError) as error:
        read_scores(path, ["a", "b", "c", "d", "e"])
    message = str(error.value)
    assert message.startswith(f"{path}: no scores for 2 of 5 clips: 'd', 'e'")
    assert "line 3: 'b' must have 10 finite numbers" in message
    assert "line 4: 'c' must have 10 finite numbers" in message
    assert read_scores(path, ["a"])["a"].tolist() == list(range(SECONDS))


def test_read_refuses_malformed_files(tmp_path):
    path = tmp_path / "scores.json"
    path.write_text('{\n  "a": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],\n  "a": [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]\n}\n')
    with pytest.raises(DataError, match=rf"^{path}:3: video id 'a' is listed twice"):
        read_scores(path, ["a"])
    path.write_text('{\n  "a": [0, 1,\n')
    with pytest.raises(DataError, match=rf"^{path}:3: not JSON"):
        read_scores(path, ["a"])
    path.write_text("[1, 2]")
    with pytest.raises(DataError, match="got a JSON list"):
        read_scores(path, ["a"])
    with pytest.raises(DataError, match="cannot read"):
        read_scores(tmp_path / "absent.json", ["a"])


def test_cache_reuses_scores_and_refits_when_the_key_changes(tmp_path, monkeypatch):
    fits = []
    fit = eventness._fit_head
    monkeypatch.setattr(eventness, "_fit_head", lambda *args: fits.append(1) or fit(*args))
    features, labels = _separable_set(n=20)
    train, scored = features.video_ids[:15], features.video_ids[15:]
    cfg = EventnessConfig(method="learned", epochs=2)
    first, path = cached_eventness_scores(_inputs(features, labels, train), cfg, scored, tmp_path)
    assert path.parent.parent == tmp_path / "eventness" and path.name == "eventness_scores.json"
    assert len(fits) == 1
    second, same_path = cached_eventness_scores(_inputs(features, labels, train), cfg, scored, tmp_path)
    assert len(fits) == 1 and same_path == path
    for video_id in scored:
        np.testing.assert_array_equal(second[video_id], first[video_id])
    # Another seed, other train clips, other features: other entries, each fitted once.
    cached_eventness_scores(_inputs(features, labels, train), dataclasses.replace(cfg, seed=1), scored, tmp_path)
    cached_eventness_scores(_inputs(features, labels, train[1:]), cfg, scored, tmp_path)
    features.key = {"features": "other"}
    cached_eventness_scores(_inputs(features, labels, train), cfg, scored, tmp_path)
    assert len(fits) == 4
    assert len(list((tmp_path / "eventness").iterdir())) == 4


def test_cache_covers_the_oracle_labels_and_rebuilds_a_broken_file(tmp_path):
    features = _features(1)
    labels = {"v0": np.array([0, 1, 1, 0, 0, 0, 0, 0, 0, 0])}
    cfg = EventnessConfig(method="oracle")
    scores, path = cached_eventness_scores(_inputs(features, labels), cfg, ["v0"], tmp_path)
    moved = {"v0": np.array([0, 0, 0, 0, 0, 0, 0, 1, 1, 0])}
    moved_scores, moved_path = cached_eventness_scores(_inputs(features, moved), cfg, ["v0"], tmp_path)
    assert moved_path != path
    np.testing.assert_array_equal(moved_scores["v0"], moved["v0"])
    path.write_text("{ half a fi")
    again, again_path = cached_eventness_scores(_inputs(features, labels), cfg, ["v0"], tmp_path)
    assert again_path == path
    np.testing.assert_array_equal(again["v0"], scores["v0"])
    assert read_scores(path, ["v0"])["v0"].tolist() == labels["v0"].tolist()


def test_a_score_file_is_reused_and_post_processed(tmp_path):
    source = tmp_path / "logged" / "eventness_scores.json"
    write_scores(source, {"v0": np.array([0.0, 0, 3, 0, 0, 0, 0, 0, 0, 6]), "v9": np.zeros(SECONDS)})
    cfg = EventnessConfig(method="learned", scores_file=str(source), smoothing=3)
    # No features are read and nothing is fitted: the file's scores, smoothed.
    inputs = _inputs(features=None)
    scores, path = cached_eventness_scores(inputs, cfg, ["v0"], tmp_path / "cache")
    np.testing.assert_allclose(scores["v0"], [0, 1, 1, 1, 0, 0, 0, 0, 2, 3], atol=1e-12)
    np.testing.assert_allclose(read_scores(path, ["v0"])["v0"], scores["v0"], atol=0)
    # The key is the file's content: another file at the same path is another entry.
    write_scores(source, {"v0": np.ones(SECONDS)})
    changed, changed_path = cached_eventness_scores(inputs, cfg, ["v0"], tmp_path / "cache")
    assert changed_path != path
    np.testing.assert_array_equal(changed["v0"], np.ones(SECONDS))
    with pytest.raises(DataError, match="no scores for 1 of 1 clips: 'v5'"):
        eventness_scores(inputs, cfg, ["v5"])
