"""Device maps (#18): a checkpoint loaded with accelerate placement (some decoder layers offloaded
to disk) decodes the same greedy tokens as the plain load, with and without interventions, and
every layer's cache lives on the device the engine resolved for that layer."""

from types import SimpleNamespace

import pytest
import torch
from accelerate.hooks import AlignDevicesHook, SequentialHook, add_hook_to_module
from PIL import Image

from lvlm_hallu import lvlm
from lvlm_hallu.interventions import resolve
from lvlm_hallu.lvlm import tiny
from lvlm_hallu.lvlm.cache import KVCache
from lvlm_hallu.lvlm.devices import execution_device, parse_device_map, parse_max_memory

PROMPTS = ["Describe this image.", "Is there a red ball in the picture? Answer briefly."]
IMAGES = [Image.new("RGB", (40, 30), "red"), Image.new("RGB", (32, 64), "blue")]


def offload_map(model) -> dict[str, str]:
    """Everything on cpu except every other decoder layer, which goes to disk."""
    names = [n for n, _ in model.named_modules()]
    layers = [n for n in names if n.startswith("model.language_model.layers.") and n.count(".") == 3]
    top = ["model.vision_tower", "model.multi_modal_projector", "model.language_model.embed_tokens",
           "model.language_model.norm", "model.language_model.rotary_emb", "lm_head"]
    placed = {n: "cpu" for n in top if n in names}
    placed.update({n: ("disk" if i % 2 else "cpu") for i, n in enumerate(layers)})
    for name, _ in model.named_parameters():  # direct parameters (LLaVA-NeXT's image_newline)
        if not any(name.startswith(prefix + ".") for prefix in placed):
            placed[name] = "cpu"
    return placed


@pytest.fixture(scope="module", params=tiny.NAMES)
def pair(request, tmp_path_factory):
    """(plain pipeline, offloaded pipeline) of one tiny checkpoint saved to disk and loaded by path."""
    path = tmp_path_factory.mktemp(request.param)
    model, processor = tiny.build(request.param)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    plain = lvlm.load(str(path))
    offloaded = lvlm.load(str(path), device_map=offload_map(model), offload_folder=str(path / "offload"))
    return plain, offloaded


def run(pipe, interventions=None, n=2):
    configs = resolve(interventions)
    reqs = [lvlm.Request(PROMPTS[i], IMAGES[i], max_new_tokens=10, interventions=configs) for i in range(n)]
    return [r.token_ids for r in pipe.generate(reqs)]


# -- execution_device ---------------------------------------------------------------------------
def test_execution_device_prefers_the_hook_over_the_parameters():
    plain = torch.nn.Linear(2, 2)
    assert execution_device(plain) == torch.device("cpu")
    hooked = torch.nn.Linear(2, 2)
    hooked._hf_hook = AlignDevicesHook(execution_device=torch.device("meta"))  # attached, weights not moved
    assert next(hooked.parameters()).device.type == "cpu"  # the weights say cpu, the hook says meta
    assert execution_device(hooked) == torch.device("meta")
    seq = torch.nn.Linear(2, 2)
    seq._hf_hook = SequentialHook(SimpleNamespace(), AlignDevicesHook(execution_device=1))
    assert execution_device(seq) == torch.device("cuda:1")  # accelerate's int = that GPU


def test_execution_device_of_offloaded_weights_is_not_meta():
    offloaded = torch.nn.Linear(2, 2)
    add_hook_to_module(offloaded, AlignDevicesHook(execution_device="cpu", offload=True))
    assert offloaded.weight.device.type == "meta"  # the weights now live in the hook's map
    assert execution_device(offloaded) == torch.device("cpu")
    assert offloaded(torch.ones(1, 2)).device.type == "cpu"
    parent = torch.nn.Sequential(torch.nn.Identity(), offloaded)  # hook on a child only
    assert execution_device(parent) == torch.device("cpu")


def test_cache_places_each_layer_on_its_device():
    """Starts and key classes go to the layer's device, not the device of the tensors given."""
    cache = KVCache(2, chunk=4, devices=[torch.device("cpu"), torch.device("meta")])
    start = torch.zeros(3, dtype=torch.int32)
    for layer in range(2):
        cache.begin_layer(layer, start)
        cache.set_key_classes(layer, torch.ones(3, 5, dtype=torch.uint8))
    assert [cache.start[i].device.type for i in range(2)] == ["cpu", "meta"]
    assert [cache.key_classes(i, 5).device.type for i in range(2)] == ["cpu", "meta"]


# -- a real device map ----------------------------------------------------------------------------
def test_offloaded_layers_run_from_disk_on_their_execution_device(pair):
    _, pipe = pair
    engine = pipe.engine
    on_meta = [next(layer.parameters()).device.type == "meta" for layer in engine.layers]
    assert any(on_meta) and not all(on_meta)  # really split: some layers only exist on disk
    assert engine.layer_devices == [torch.device("cpu")] * len(engine.layers)  # from the hooks, never "meta"
    assert pipe.device == torch.device("cpu")  # from the embedding's hook, not its weight


@pytest.mark.parametrize("interventions", [None, "vhr"])
def test_each_layer_cache_lives_with_its_layer(pair, interventions):
    _, pipe = pair
    reqs = [lvlm.Request(p, i, interventions=resolve(interventions)) for p, i in zip(PROMPTS, IMAGES)]
    plan = pipe.build_plan(reqs)
    batch = pipe.prepare(reqs + plan.twin_requests())
    plan.bind(batch)
    _, state = pipe.engine.prefill(batch["input_ids"], batch["attention_mask"], pipe.vision_inputs(batch), plan)
    cache = state.cache
    assert cache.devices == pipe.engine.layer_devices
    for layer, device in enumerate(pipe.engine.layer_devices):
        k, v = cache.layer_kv(layer)
        assert k.shape[2] > 0 and k.device == v.device == cache.start[layer].device == device
        if interventions:
            assert cache.key_classes(layer, k.shape[2]).device == device


@pytest.mark.parametrize("interventions", [None, "vhr", "var", "pai", "vte", "carve"])
def test_offloaded_greedy_tokens_match_the_plain_load(pair, interventions):
    plain, offloaded = pair
    if interventions and plain.adapter.family != "llava":
        pytest.skip("interventions: one family is enough (the placement code is shared)")
    expected = run(plain, interventions)
    assert run(offloaded, interventions) == expected
    if interventions == "vhr":  # its edit changes the tiny model's tokens: the comparison can fail
        assert expected != run(plain, None)


def test_plain_load_rejects_offload_options_without_a_map(tmp_path):
    with pytest.raises(ValueError, match="need a device_map"):
        lvlm.load("tiny-llava", offload_folder=str(tmp_path))


def test_dispatching_a_built_model_needs_a_folder_for_disk():
    model, _ = tiny.build("tiny-llava")
    with pytest.raises(ValueError, match="offload_folder"):
        lvlm.load("tiny-llava", device_map=offload_map(model))


def test_cli_parsers():
    assert parse_max_memory("0=20GiB, 1=20GiB,cpu=64GiB") == {0: "20GiB", 1: "20GiB", "cpu": "64GiB"}
    assert parse_device_map("auto") == "auto"
    assert parse_device_map('{"lm_head": "cpu"}') == {"lm_head": "cpu"}
    for bad in ("0:20GiB", "cpu="):
        with pytest.raises(ValueError, match="--max-memory"):
            parse_max_memory(bad)
    for bad in ("everywhere", "[1, 2]", "{bad json"):
        with pytest.raises(ValueError, match="--device-map"):
            parse_device_map(bad)


def test_serve_passes_the_placement_to_each_replica_and_refuses_bad_options():
    import ray
    from typer.testing import CliRunner

    from lvlm_hallu.cli import app
    from lvlm_hallu.serve.config import ServeConfig

    config = ServeConfig(device="cuda", device_map="auto", max_memory={0: "20GiB", 1: "20GiB"}, num_gpus=2)
    assert config.load_kwargs() == {"device": "cuda", "dtype": None, "device_map": "auto",
                                    "max_memory": {0: "20GiB", 1: "20GiB"}}
    assert ServeConfig().load_kwargs() == {"device": "cpu", "dtype": None}  # nothing new without a map
    res = CliRunner().invoke(app, ["serve", "--model", "tiny-llava", "--port", "0", "--max-memory", "0:20GiB"],
                             env={"COLUMNS": "200"})
    assert res.exit_code == 2 and "--max-memory" in res.output and len(res.output.strip().splitlines()) == 1
    assert not ray.is_initialized()
