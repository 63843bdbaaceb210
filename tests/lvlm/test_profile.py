"""Model profiles: sink-dimension discovery, published values, on-disk cache."""

import json

import torch

import lvlm
from lvlm import profile as profiles
from lvlm.tiny import char_tokenizer, llava_15_7b_config


def test_calibration_finds_a_planted_sink_dimension(tmp_path, monkeypatch):
    monkeypatch.setenv("LVLM_CACHE", str(tmp_path))
    pipe = lvlm.load("tiny-llava")
    bos = pipe.tokenizer.bos_token_id
    with torch.no_grad():  # a massive activation on BOS in dimension 5, as sink tokens carry
        pipe.engine.embed.weight[bos, 5] = 60.0
    data = profiles.load_or_compute(pipe, refresh=True)
    assert data["sink_dims"][0] == 5 and data["sink_dims_source"] == "calibrated"
    # |x[d]| / RMS(x) is at most sqrt(E) = 8 here, so the tiny model can never pass tau = 20
    assert data["sink_dim_magnitude"][5] > 7.0
    assert sorted(data["vhd_mean"]) == [0, 1, 2, 3] and all(v > 0 for v in data["vhd_mean"].values())


def test_profile_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("LVLM_CACHE", str(tmp_path))
    pipe = lvlm.load("tiny-llava")
    first = profiles.load_or_compute(pipe)
    path = profiles.cache_path(pipe)
    assert json.loads(path.read_text())["sink_dims"] == first["sink_dims"]
    monkeypatch.setattr(profiles, "compute", lambda *a, **k: (_ for _ in ()).throw(AssertionError("recomputed")))
    assert profiles.load_or_compute(pipe)["version"] == profiles.PROFILE_VERSION


def test_published_sink_dims_for_llava_15_7b():
    assert profiles.known_sink_dims(llava_15_7b_config(char_tokenizer())) == (1415, 2533)
