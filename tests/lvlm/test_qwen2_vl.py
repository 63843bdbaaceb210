"""Qwen2-VL and Qwen2.5-VL: M-RoPE positions, dynamic resolution, GQA, and every intervention.

Parity is against transformers' own `generate` on an independently built copy of each tiny model
(SDPA attention, the model's own `get_rope_index` and rope deltas).
"""

import numpy as np
import pytest
import torch
from PIL import Image

from lvlm_hallu import lvlm
from lvlm_hallu.interventions import resolve
from lvlm_hallu.interventions.defaults import Backbone
from lvlm_hallu.interventions.plan import build_plan
from lvlm_hallu.lvlm import tiny
from lvlm_hallu.lvlm.inspection.grids import patch_grid
from lvlm_hallu.lvlm.profile import known_sink_dims
from tests.conftest import ACTIVE, NEUTRAL, hf_generate

NEW = 8
SIZES = [(32, 32), (48, 32), (24, 40)]  # (width, height): 4x4, 4x6 and 5x3 image tokens
PROMPTS = ["Hi", "Describe this image.", "What color is the thing on the left?"]


def picture(size, seed):
    """A deterministic noise image (a flat color would give every patch the same feature)."""
    width, height = size
    return Image.fromarray((np.random.RandomState(seed).rand(height, width, 3) * 255).astype("uint8"))


IMG = picture((32, 32), 0)
IMG2 = picture((48, 32), 1)


@pytest.fixture(scope="module", params=tiny.QWEN)
def pipe(request):
    return lvlm.load(request.param)


def run(pipe, spec, image=IMG2, prompt="Describe it.", n=NEW):
    (res,) = pipe.generate([lvlm.Request(prompt, image, max_new_tokens=n, interventions=resolve(spec))])
    return res


# -- the family as data ----------------------------------------------------------------------------
def test_facts_gqa_and_dynamic_grid(pipe):
    facts = pipe.facts
    assert (facts.num_heads, facts.num_kv_heads, facts.head_dim) == (4, 1, 16)  # 4 query heads per KV head
    assert facts.vision_grid is None  # the grid is per image
    assert facts.image_token_id == pipe.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert pipe.info()["family"] == pipe.model.config.model_type


@pytest.mark.parametrize("case", ["batch1", "padded3", "sizes3"])
def test_greedy_matches_transformers_generate(pipe, case):
    images = {"batch1": [IMG], "padded3": [IMG, IMG, IMG], "sizes3": [picture(s, i) for i, s in enumerate(SIZES)]}[case]
    prompts = PROMPTS[: len(images)]
    reqs = [lvlm.Request(p, im, max_new_tokens=NEW) for p, im in zip(prompts, images)]
    batch = pipe.prepare(reqs)
    if len(reqs) > 1:
        assert (batch["attention_mask"] == 0).any()  # left padding is exercised
    if case == "sizes3":
        assert [int((row == pipe.facts.image_token_id).sum()) for row in batch["input_ids"]] == [16, 24, 15]
    ours = [r.token_ids for r in pipe.generate(reqs)]
    assert ours == hf_generate(pipe.model_id, batch, NEW)
    assert all(len(t) > 1 for t in ours)  # decode steps ran, not only the prefill token


def test_positions_follow_the_model_rope_index(pipe):
    """Prefill positions are get_rope_index's; decoding continues at valid length + rope delta
    (transformers' rule), which differs from 1-D positions once an image is in the prompt."""
    reqs = [lvlm.Request(p, picture(s, i), max_new_tokens=1) for i, (p, s) in enumerate(zip(PROMPTS, SIZES))]
    batch = pipe.prepare(reqs)
    _, state = pipe.engine.prefill(batch["input_ids"], batch["attention_mask"], pipe.vision_inputs(batch))
    ref, deltas = pipe.model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                                   image_grid_thw=batch["image_grid_thw"],
                                                   attention_mask=batch["attention_mask"])
    assert torch.equal(state.position_ids, ref.permute(1, 2, 0))
    lengths = batch["attention_mask"].sum(-1)
    assert torch.equal(state.next_position, (lengths[:, None] + deltas).expand(-1, 3))
    assert (deltas < 0).all()  # images advance positions by max(h, w), not h·w: 1-D ids would be wrong


# -- every intervention on the family -----------------------------------------------------------------


@pytest.mark.parametrize("method", sorted(NEUTRAL))
def test_neutral_parameters_change_nothing(pipe, method):
    assert run(pipe, NEUTRAL[method]).token_ids == run(pipe, None).token_ids


@pytest.mark.parametrize("method", sorted(ACTIVE))
def test_active_method_changes_output(pipe, method):
    base = run(pipe, None, prompt="What is this?", n=12)
    active = run(pipe, ACTIVE[method], prompt="What is this?", n=12)
    assert active.token_ids != base.token_ids
    assert method in active.report


def test_mixed_batch_equals_rows_alone(pipe):
    specs = [None, "vhr", ACTIVE["var"], "pai", "vte", "vhr+var", "var+vte", [{"name": "pai", "contrast": True}]]
    images = [IMG, IMG2, picture((40, 24), 2), IMG2, IMG, IMG2, IMG, picture((24, 48), 3)]
    prompts = ["Describe it.", "What is this?", "Colors?", "Describe it.", "Hi", "Objects?", "Count.", "Where?"]
    reqs = [lvlm.Request(p, im, max_new_tokens=6, interventions=resolve(s)) for p, im, s in zip(prompts, images, specs)]
    together = pipe.generate(reqs)
    alone = [pipe.generate([r])[0] for r in reqs]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [sorted(r.report) for r in together] == [sorted(r.report) for r in alone]


@pytest.mark.parametrize("k", [0, 2])
def test_vte_keeps_mrope_positions(pipe, k):
    """Removing the visual rows equals masking their keys (which keeps every position): the text
    rows keep their three-axis positions and decoding continues from the prompt's rope deltas."""
    removed = run(pipe, [{"name": "vte", "exit_layer": k}], n=10)
    masked = run(pipe, [{"name": "vte", "exit_layer": k, "emulate": True}], n=10)
    assert removed.token_ids == masked.token_ids
    assert removed.report["vte"]["visual_tokens_removed"] == 24  # a 48x32 image: 6x4 merged patches

    req = lvlm.Request("Describe it.", IMG2, interventions=resolve([{"name": "vte", "exit_layer": k}]))
    batch = pipe.prepare([req])
    plan = build_plan(pipe.facts, [req], profile={})
    plan.bind(batch)
    _, state = pipe.engine.prefill(batch["input_ids"], batch["attention_mask"], pipe.vision_inputs(batch), plan)
    full, _ = pipe.model.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                               image_grid_thw=batch["image_grid_thw"])
    text = batch["input_ids"][0] != pipe.facts.image_token_id
    assert torch.equal(state.position_ids[0], full.permute(1, 2, 0)[0][text])  # the gap stays, on all axes
    assert state.cache.length(k + 1) == batch["input_ids"].shape[1] - 24


def test_vhr_twin_uses_the_family_chat_template(pipe):
    req = lvlm.Request("Describe it.", IMG2, interventions=resolve("vhr"))
    plan = build_plan(pipe.facts, [req], profile={})
    (twin,) = plan.twin_requests()
    batch = pipe.prepare([req, twin])
    texts = [pipe.tokenizer.decode(row[mask.bool()]) for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
    assert texts[1] == "<|im_start|>user\nDescribe it.<|im_end|>\n<|im_start|>assistant\n"
    assert texts[0].startswith("<|im_start|>user\n<|vision_start|><|image_pad|>")
    assert texts[0].endswith("<|vision_end|>Describe it.<|im_end|>\n<|im_start|>assistant\n")


def test_carve_reads_the_real_patch_grid(pipe):
    """CARVE maps its read-out through the image's own grid from image_grid_thw (4 rows x 6 columns
    for a 48x32 image), not a square; the grid's picture is the image as the tower saw it."""
    req = lvlm.Request("Describe it.", IMG2)
    grid = pipe.image_grid(req)
    assert grid.shape == (4, 6) and sorted(grid.ravel().tolist()) == list(range(24))
    (panel,) = patch_grid(pipe, pipe.prepare([req])).panels
    assert panel.picture.size == (48, 32)
    diff = np.abs(np.asarray(panel.picture, dtype=float) - np.asarray(IMG2, dtype=float))
    assert diff.max() <= 2  # same size: only normalization round-off
    res = run(pipe, ACTIVE["carve"])
    x0, y0, x1, y1 = res.report["carve"]["box"]
    assert 0 <= x0 < x1 <= 48 and 0 <= y0 < y1 <= 32 and (x1 - x0, y1 - y0) != (48, 32)


# -- VAR: published dimensions for Qwen2-VL-7B, calibration otherwise --------------------------------
def _config(name: str, hidden: int, layers: int):
    from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

    cls = {"qwen2_vl": Qwen2VLConfig, "qwen2_5_vl": Qwen2_5_VLConfig}[name]
    return cls(text_config={"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": 28,
                            "num_key_value_heads": 4, "vocab_size": 100})


def test_var_sink_dims_published_for_qwen2_vl_7b_only():
    assert known_sink_dims(_config("qwen2_vl", 3584, 28)) == (458, 2570)
    assert Backbone.of_config(_config("qwen2_vl", 3584, 28)).published("var", "tau").value == 20.0
    assert known_sink_dims(_config("qwen2_5_vl", 3584, 28)) is None  # Qwen2.5-VL-7B: calibrate
    assert known_sink_dims(_config("qwen2_vl", 1536, 28)) is None  # Qwen2-VL-2B: calibrate


def test_var_calibrates_the_tiny_backbone(pipe):
    profile = pipe.profile()
    assert profile["sink_dims_source"] == "calibrated"
    assert profile["backbone"]["model_type"] == pipe.model.config.text_config.model_type
    res = run(pipe, "var")
    assert res.report["var"]["sources"]["sink_dims"] == "calibrated"


def test_text_only_prompts_match_transformers_generate(pipe):
    """No image at all (VHR's and PAI's twins are such rows): M-RoPE reduces to 1-D positions."""
    reqs = [lvlm.Request(p, None, max_new_tokens=NEW) for p in PROMPTS[:2]]
    batch = pipe.prepare(reqs)
    assert "image_grid_thw" not in batch
    assert [r.token_ids for r in pipe.generate(reqs)] == hf_generate(pipe.model_id, batch, NEW)


def test_rows_joining_a_running_batch_decode_as_alone(pipe):
    """Continuous batching merges rows whose M-RoPE positions (and rope deltas) differ."""
    from lvlm_hallu.lvlm.pipeline import RunningBatch

    specs = [None, "vte", None, [{"name": "pai", "alpha": 1.0, "contrast": True}]]
    reqs = [lvlm.Request(PROMPTS[i % 3], picture(SIZES[i % 3], i), max_new_tokens=[7, 4, 6, 5][i],
                         interventions=resolve(s)) for i, s in enumerate(specs)]
    alone = [pipe.generate([r])[0].token_ids for r in reqs]
    batch, rows, step, schedule = RunningBatch(pipe), {}, 0, {0: [0], 1: [1], 2: [2, 3]}
    while len(rows) < len(reqs) or batch:
        for i in schedule.get(step, []):
            (rows[i],) = batch.admit([reqs[i]])
        batch.step()
        step += 1
    assert [rows[i].result.token_ids for i in range(len(reqs))] == alone


def test_cli_generate_takes_the_family_unchanged(pipe, tmp_path):
    import json

    from typer.testing import CliRunner

    from lvlm_hallu.cli import app

    IMG2.save(tmp_path / "a.png")
    res = CliRunner().invoke(app, ["generate", "--model", pipe.model_id, "--image", str(tmp_path / "a.png"),
                                   "--prompt", "Describe it.", "-n", "5", "--interventions", "vhr+pai", "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["model"] == pipe.model_id and 1 <= out["completion_tokens"] <= 5
    expected = run(pipe, "vhr+pai", n=5)
    assert out["text"] == expected.text


def test_checkpoint_directory_loads_by_path(pipe, tmp_path):
    """Real checkpoints load by path (or hub id) through AutoConfig, the adapter's model class and
    the image-only processor, and generate what the built model does."""
    model, processor = tiny.build(pipe.model_id)
    model.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    loaded = lvlm.load(str(tmp_path))
    assert loaded.adapter.family == pipe.adapter.family and loaded.facts == pipe.facts
    req = lvlm.Request("Describe it.", IMG2, max_new_tokens=6)
    assert loaded.generate([req])[0].token_ids == pipe.generate([req])[0].token_ids


def test_eval_runner_takes_the_family_unchanged(pipe, tmp_path):
    from lvlm_hallu.eval.runner import Item, local_answer
    from lvlm_hallu.eval.runner import run as eval_run

    items = []
    for i, size in enumerate(SIZES):
        picture(size, i).save(tmp_path / f"{i}.png")
        items.append(Item(f"k{i}", "Is there a cat in the image?", str(tmp_path / f"{i}.png")))
    answer = local_answer(pipe, max_new_tokens=4, interventions="pai", resolve=resolve)
    records = eval_run(items, answer, tmp_path / "out.jsonl", batch_size=3, progress=False)
    expected = [run(pipe, "pai", image=picture(s, i), prompt="Is there a cat in the image?", n=4).text
                for i, s in enumerate(SIZES)]
    assert [records[it.key]["answer"] for it in items] == expected


def test_service_answers_with_the_family_unchanged(pipe):
    """The OpenAI-compatible app over a Qwen pipeline: the same tokens as the pipeline alone."""
    import base64
    import io

    from fastapi.testclient import TestClient

    from lvlm_hallu.serve.app import Service, build_app
    from lvlm_hallu.serve.config import ServeConfig

    buf = io.BytesIO()
    IMG2.save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    service = Service(pipe, ServeConfig(model=pipe.model_id, api_key="k", warmup=False, eval_jobs=False))
    body = {"model": pipe.model_id, "max_tokens": 6, "interventions": ["vhr", "pai"],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "Describe it."},
                                                      {"type": "image_url", "image_url": {"url": url}}]}]}
    with TestClient(build_app(service)) as http:
        r = http.post("/v1/chat/completions", headers={"Authorization": "Bearer k"}, json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    expected = run(pipe, "vhr+pai", n=6)
    assert out["choices"][0]["message"]["content"] == expected.text
    assert out["usage"]["completion_tokens"] == len(expected.token_ids)


def test_memory_estimate_counts_gqa_kv_heads(pipe):
    from lvlm_hallu.lvlm import memory

    est = memory.estimate(memory.config_for(pipe.model_id), dtype=torch.float32)
    assert est.kv_bytes_per_token == 4 * 2 * 1 * 16 * 4  # layers x (K, V) x 1 KV head x head_dim x fp32
    assert est.parameters == sum(p.numel() for p in pipe.model.parameters())


def test_unsupported_architecture_lists_the_families():
    from lvlm_hallu.lvlm.adapters import adapter_for
    from lvlm_hallu.lvlm.errors import UnsupportedModelError

    with pytest.raises(UnsupportedModelError, match=r"qwen2_vl \(Qwen2VLForConditionalGeneration\).*"
                                                    r"qwen2_5_vl \(Qwen2_5_VLForConditionalGeneration\)"):
        adapter_for(type("Config", (), {"model_type": "qwen3_vl"})())


def test_two_images_in_one_prompt_match_transformers_generate(pipe):
    """CARVE's code mode asks about the original and the refined image together: one row whose
    M-RoPE positions cover two grids of different shapes."""
    reqs = [lvlm.Request("Compare them.", [IMG2, picture((24, 40), 5)], max_new_tokens=NEW),
            lvlm.Request("Hi", IMG, max_new_tokens=NEW)]
    batch = pipe.prepare(reqs)
    assert batch["image_grid_thw"].tolist() == [[1, 8, 12], [1, 10, 6], [1, 8, 8]]
    assert [r.token_ids for r in pipe.generate(reqs)] == hf_generate(pipe.model_id, batch, NEW)
    code = run(pipe, [{"name": "carve", "mode": "code", "max_steps": 4}])
    assert code.prompt_tokens > run(pipe, [{"name": "carve", "max_steps": 4}]).prompt_tokens
