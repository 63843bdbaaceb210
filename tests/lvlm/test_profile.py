"""Model profiles: sink-dimension discovery, published values, on-disk cache."""

import json
import os
from pathlib import Path

import pytest
import torch

from lvlm_hallu import lvlm
from lvlm_hallu.lvlm import profile as profiles
from lvlm_hallu.lvlm.tiny import char_tokenizer, llava_15_7b_config


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


def test_writers_of_one_profile_at_once_do_not_collide(tmp_path):
    """Replicas that load one model with one cache write its profile at the same time; with one
    temporary name for all, a writer renamed another's file away (FileNotFoundError)."""
    import threading

    path, start, errors = tmp_path / "profiles" / "m.json", threading.Barrier(2), []

    def write():
        start.wait()
        for i in range(300):
            try:
                profiles._write(path, {"version": 1, "i": i, "pad": "x" * 50_000})
            except OSError as err:
                errors.append(err)

    threads = [threading.Thread(target=write) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert json.loads(path.read_text())["i"] == 299 and [p.name for p in path.parent.iterdir()] == ["m.json"]


def test_published_sink_dims_for_llava_15_7b():
    assert profiles.known_sink_dims(llava_15_7b_config(char_tokenizer())) == (1415, 2533)


def test_calibration_uses_the_width_scaled_threshold(tmp_path, monkeypatch):
    monkeypatch.setenv("LVLM_CACHE", str(tmp_path))
    pipe = lvlm.load("tiny-llava")  # E = 64: tau_E = 20 * sqrt(64 / 4096) = 2.5
    data = profiles.load_or_compute(pipe, refresh=True)
    assert data["tau"] == 2.5 and data["tau_source"] == "scaled"
    assert data["backbone"] == {"model_type": "llama", "hidden_size": 64, "num_layers": pipe.facts.num_layers}
    assert sorted(data["bos_phi_max"]) == list(range(2, pipe.facts.num_layers))
    assert all(0 < v <= 8.0 for v in data["bos_phi_max"].values())  # phi <= sqrt(E)
    # The image tokens' distribution, from the same layer inputs, recomputed here by hand.
    batch = pipe.prepare([profiles.Request(p, im, max_new_tokens=1) for im in profiles.calibration_images()
                          for p in profiles.CALIBRATION_PROMPTS])
    rec = profiles._LayerInputs()
    pipe.engine.prefill(batch["input_ids"], batch["attention_mask"], pipe.vision_inputs(batch), rec)
    layer = pipe.facts.num_layers - 1
    x = rec.all[layer][batch["input_ids"] == pipe.facts.image_token_id]  # (N, E)
    phi = x.abs() / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt()
    assert data["visual_phi_max"][layer] == round(float(phi.max()), 2)
    assert data["visual_phi_dim"][layer] == int(phi.amax(0).argmax())


def test_sink_dimensions_must_persist_over_layers():
    normed = torch.ones(6, 16)  # (layers 2..7, E): BOS |x_d| / RMS(x)
    normed[:, 3] = 9.0  # a sink through dimension 3 in every layer
    normed[3:, 11] = 12.0  # in half of the layers (from layer 5 on): still a sink dimension, stronger late
    normed[5, 7] = 50.0  # one layer only: a transient outlier, not a sink dimension
    assert profiles.select_sink_dims(normed, tau=5.0) == [3, 11]  # ranked by median magnitude
    assert profiles.select_sink_dims(normed, tau=10.0) == [11]
    assert profiles.select_sink_dims(normed, tau=60.0) == []


def test_tuned_values_survive_a_refresh_and_ship_only_for_embedded_models(tmp_path, monkeypatch):
    monkeypatch.setenv("LVLM_CACHE", str(tmp_path))
    pipe = lvlm.load("tiny-llava")
    profiles.save_tuned(pipe, {"vhr": {"params": {"alpha": 1.5}}})
    assert profiles.load_or_compute(pipe, refresh=True)["tuned"]["vhr"]["params"] == {"alpha": 1.5}
    with pytest.raises(ValueError, match="only the embedded models"):
        profiles.ship_tuned(pipe, {"vhr": {"params": {"alpha": 1.5}}})
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"weights v1")
    shipped = tmp_path / "tuned.json"
    monkeypatch.setattr(profiles, "_shipped_paths", lambda: {"tiny-llava": (shipped, weights)})
    profiles.ship_tuned(pipe, {"pai": {"params": {"alpha": 0.6}}, "vte": {"params": {"exit_layer": 1}}})
    profiles.ship_tuned(pipe, {"pai": {"params": {"alpha": 0.6}}})  # a search of PAI only keeps VTE's values
    data = profiles.load_or_compute(pipe)
    assert data["tuned_shipped"] == {"pai": {"params": {"alpha": 0.6}, "shipped": True},
                                     "vte": {"params": {"exit_layer": 1}, "shipped": True}}
    assert "tuned_shipped" not in json.loads(profiles.cache_path(pipe).read_text())  # read from the package
    weights.write_bytes(b"weights v2")  # retrained: the shipped values no longer apply
    with pytest.warns(UserWarning, match="tuned for other weights"):
        assert profiles.load_or_compute(pipe)["tuned_shipped"] == {}
    profiles.ship_tuned(pipe, {"pai": {"params": {"alpha": 0.4}}})  # the new weights' search: VTE's old value goes
    assert json.loads(shipped.read_text())["methods"] == {"pai": {"params": {"alpha": 0.4}}}


def test_a_local_checkpoint_rewritten_in_place_gets_a_new_profile(tmp_path, monkeypatch):
    from lvlm_hallu.lvlm import tiny

    monkeypatch.setenv("LVLM_CACHE", str(tmp_path / "cache"))
    model, processor = tiny.build("tiny-llava")
    ckpt = tmp_path / "ckpt"
    model.save_pretrained(ckpt)
    processor.save_pretrained(ckpt)
    pipe = lvlm.load(str(ckpt))
    profiles.save_tuned(pipe, {"vhr": {"params": {"alpha": 1.5}}})
    before = profiles.cache_path(pipe)
    reloaded = lvlm.load(str(ckpt))  # loading again finds the same profile and its tuned values
    assert profiles.cache_path(reloaded) == before
    assert profiles.load_or_compute(reloaded)["tuned"] == {"vhr": {"params": {"alpha": 1.5}}}
    with torch.no_grad():
        model.get_input_embeddings().weight.add_(1.0)
    model.save_pretrained(ckpt)
    again = lvlm.load(str(ckpt))
    assert profiles.cache_path(again) != before
    assert "tuned" not in profiles.load_or_compute(again)  # the old weights' search does not apply


def test_a_hub_checkpoint_at_another_revision_gets_its_own_profile(tmp_path):
    """A hub id is keyed by the commit its revision resolves to in the Hugging Face cache: new
    weights pushed under the same id (same config) no longer inherit the old profile's sink
    dimensions and tuned values. Real cache resolution (transformers and huggingface_hub, offline)
    over a cache laid out as the hub client writes it, in a subprocess so that its cache path
    takes effect."""
    import subprocess
    import sys

    from lvlm_hallu.lvlm import tiny

    repo = tmp_path / "hub" / "models--lvlm-test--tiny"
    model, processor = tiny.build("tiny-llava")
    for commit in ("a" * 40, "b" * 40):
        model.save_pretrained(repo / "snapshots" / commit)
        processor.save_pretrained(repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "LVLM_CACHE": str(tmp_path / "c")}
    # one process, four loads: (what refs/main names, the revision asked for)
    steps = [("a" * 40, ""), ("a" * 40, ""), ("b" * 40, ""), ("b" * 40, "a" * 40)]
    script = ("import sys, pathlib, lvlm; from lvlm import profile\n"
              "ref = pathlib.Path(sys.argv[1])\n"
              "for step in sys.argv[2:]:\n"
              "    main, revision = step.split(':')\n"
              "    ref.write_text(main)\n"
              "    p = lvlm.load('lvlm-test/tiny', revision=revision or None)\n"
              "    print('LOADED', p.snapshot.name, profile.cache_path(p).name)\n")
    (repo / "refs" / "main").write_text("a" * 40)
    out = subprocess.run([sys.executable, "-c", script, str(repo / "refs" / "main"), *(f"{m}:{r}" for m, r in steps)],
                         env=env, capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    assert out.returncode == 0, out.stderr[-2000:]
    loaded = [tuple(line.split()[1:]) for line in out.stdout.splitlines() if line.startswith("LOADED")]
    first, again, moved, pinned = loaded
    assert first[0] == "a" * 40 and moved[0] == "b" * 40
    assert first[1] == again[1] != moved[1]  # same commit, same profile; a new commit, a new one
    assert pinned == first  # an explicit revision resolves to its own snapshot
