"""LLaVA-OneVision (tiny random-weight model): parity with transformers, every intervention, loading.

The tiny model has OneVision's real structure: SigLIP tower with "full" features, any-resolution
tiles unpadded to the image's aspect ratio with one newline token per row, bilinear pooling above
`anyres_max_4` base tiles, and a Qwen2 text model with 4 query heads per KV head.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from lvlm_hallu import lvlm
from lvlm_hallu.interventions import resolve
from lvlm_hallu.lvlm import tiny
from lvlm_hallu.lvlm.errors import UnsupportedModelError
from tests.conftest import ACTIVE, NEUTRAL, hf_generate

NAME = tiny.ONEVISION
# (W, H): a 1x2-tile image, a 3x3-tile image that OneVision pools, a tall 3x1-tile image
IMAGES = [Image.new("RGB", (40, 30), "red"), Image.radial_gradient("L").convert("RGB").resize((100, 90)),
          Image.linear_gradient("L").convert("RGB").resize((32, 80))]
PROMPTS = ["Describe this image.", "What is in the picture?", "Hi"]


@pytest.fixture(scope="module")
def pipe():
    return lvlm.load(NAME)


def requests(n, max_new_tokens=10, spec=None):
    return [lvlm.Request(PROMPTS[i], IMAGES[i], max_new_tokens=max_new_tokens, interventions=resolve(spec))
            for i in range(n)]


def test_tiny_model_is_onevision_with_gqa(pipe):
    assert pipe.adapter.family == "llava_onevision"
    assert type(pipe.model).__name__ == "LlavaOnevisionForConditionalGeneration"
    assert (pipe.facts.num_heads, pipe.facts.num_kv_heads) == (4, 1)
    batch = pipe.prepare(requests(3))
    image_tokens = (batch["input_ids"] == pipe.facts.image_token_id).sum(-1).tolist()
    # base 4x4 patches + the tiles' patches unpadded to the aspect ratio, a newline token per row:
    # 40x30 -> 1x2 tiles (4x8 patches) unpadded to 4x6; 100x90 -> 3x3 tiles (12x12) unpadded to 11x12,
    # then pooled by sqrt(132 / (4 * 16)) to 7x8; 32x80 -> 3x1 tiles (12x4) unpadded to 10x4
    assert image_tokens == [16 + 4 * (6 + 1), 16 + 7 * (8 + 1), 16 + 10 * (4 + 1)]


@pytest.mark.parametrize("n", [1, 3])
def test_greedy_matches_transformers_generate(pipe, n):
    reqs = requests(n)
    batch = pipe.prepare(reqs)
    if n == 3:  # images of three sizes give three prompt lengths: the batch is left-padded
        assert (batch["attention_mask"] == 0).any()
        assert len(set(batch["attention_mask"].sum(-1).tolist())) == 3
    ours = [r.token_ids for r in pipe.generate(reqs)]
    assert ours == hf_generate(NAME, batch, 10)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_prefill_logits_match_transformers_attention(pipe, impl):
    from lvlm_hallu.lvlm.engine import NoPlan

    batch = pipe.prepare(requests(3))
    ref_model, _ = tiny.build(NAME)
    ref_model.set_attn_implementation(impl)
    with torch.no_grad():
        ref = ref_model(**batch).logits[:, -1]
    logits, _ = pipe.engine.prefill(batch["input_ids"], batch["attention_mask"], pipe.vision_inputs(batch), NoPlan())
    torch.testing.assert_close(logits, ref.float(), atol=1e-5, rtol=1e-5)




def one(pipe, spec, n=12, image=IMAGES[1]):
    (res,) = pipe.generate([lvlm.Request(PROMPTS[0], image, max_new_tokens=n, interventions=resolve(spec))])
    return res


@pytest.mark.parametrize("method", sorted(NEUTRAL))
def test_neutral_parameters_change_nothing(pipe, method):
    assert one(pipe, NEUTRAL[method]).token_ids == one(pipe, None).token_ids


@pytest.mark.parametrize("method", sorted(ACTIVE))
def test_active_method_changes_output(pipe, method):
    active = one(pipe, ACTIVE[method])
    assert active.token_ids != one(pipe, None).token_ids
    assert method in active.report


def test_mixed_batch_equals_rows_alone(pipe):
    specs = [None, "vhr", ACTIVE["var"], "pai", "vte", "var+vte", [{"name": "pai", "contrast": True}]]
    reqs = [lvlm.Request(PROMPTS[i % 3], IMAGES[(i + 1) % 3], max_new_tokens=6, interventions=resolve(s))
            for i, s in enumerate(specs)]
    together = pipe.generate(reqs)
    alone = [pipe.generate([r])[0] for r in reqs]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [sorted(r.report) for r in together] == [sorted(r.report) for r in alone]


def test_checkpoint_directory_loads_with_the_image_only_processor(pipe, tmp_path):
    pipe.model.save_pretrained(tmp_path)
    pipe.processor.save_pretrained(tmp_path)
    loaded = lvlm.load(str(tmp_path))
    assert loaded.adapter.family == "llava_onevision"
    assert loaded.processor.num_image_tokens == pipe.processor.num_image_tokens
    assert loaded.processor.vision_aspect_ratio == tiny.ONEVISION_ASPECT
    reqs = requests(2, max_new_tokens=6)
    assert [r.token_ids for r in loaded.generate(reqs)] == [r.token_ids for r in pipe.generate(reqs)]


def test_unsupported_architecture_lists_onevision():
    from types import SimpleNamespace

    from lvlm_hallu.lvlm.adapters import adapter_for

    with pytest.raises(UnsupportedModelError, match="llava_onevision \\(LlavaOnevisionForConditionalGeneration\\)"):
        adapter_for(SimpleNamespace(model_type="idefics3"))


@pytest.mark.parametrize("image", IMAGES, ids=["1x2-tiles", "3x3-tiles-pooled", "3x1-tiles"])
def test_patch_grid_follows_transformers_packing(pipe, image):
    """Label every patch with its place on the tile grid, let transformers' own `pack_image_features`
    unpad, pool and add newlines, and read the labels back through our patch grid."""
    from transformers.models.llava_onevision.modeling_llava_onevision import (get_anyres_image_grid_shape,
                                                                              image_size_to_num_patches)

    from lvlm_hallu.lvlm.inspection.grids import patch_grid

    config = pipe.model.config
    batch = pipe.prepare([lvlm.Request(PROMPTS[0], image)])
    grid = patch_grid(pipe, batch)
    base, tiles = grid.panels
    size, side = config.vision_config.image_size, pipe.facts.vision_grid
    image_size = batch["image_sizes"][0].tolist()
    nph, npw = get_anyres_image_grid_shape(image_size, config.image_grid_pinpoints, size)
    n_tiles = image_size_to_num_patches(image_size, config.image_grid_pinpoints, size)
    assert n_tiles == 1 + nph * npw
    i, j = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    labels = [torch.stack([i, j, torch.ones_like(i)], -1).flatten(0, 1).float()]  # base: (side², 3) (row, col, 1)
    for t in range(nph * npw):  # tile t covers rows (t // npw)*side.., cols (t % npw)*side.. of the stitched grid
        r, c = i + (t // npw) * side, j + (t % npw) * side
        labels.append(torch.stack([r, c, torch.zeros_like(r)], -1).flatten(0, 1).float())
    newline = torch.full((3,), float("nan"))
    (packed,), _ = pipe.model.model.pack_image_features([torch.stack(labels)], batch["image_sizes"], image_newline=newline,
                                                        vision_aspect_ratio=config.vision_aspect_ratio)
    assert packed.shape[0] == grid.n_tokens == int((batch["input_ids"] == config.image_token_id).sum())
    assert torch.isnan(packed[torch.as_tensor(grid.other)]).all()  # the tokens on no patch are the newlines
    got_base = packed[torch.as_tensor(base.tokens)]  # (side, side, 3)
    torch.testing.assert_close(got_base, torch.stack([i, j, torch.ones_like(i)], -1).float())
    got = packed[torch.as_tensor(tiles.tokens)]  # (rows, cols, 3)
    assert not torch.isnan(got).any() and (got[..., 2] == 0).all()
    rows, cols = tiles.shape
    if (rows, cols) == (got[..., 0].max() - got[..., 0].min() + 1, got[..., 1].max() - got[..., 1].min() + 1):
        r0, c0 = got[0, 0, 0], got[0, 0, 1]  # not pooled: exact cells of the unpadded region
        torch.testing.assert_close(got[..., 0], r0 + torch.arange(rows)[:, None].float().expand(rows, cols))
        torch.testing.assert_close(got[..., 1], c0 + torch.arange(cols)[None, :].float().expand(rows, cols))
    else:  # pooled: bilinear weights of the labels keep rows and columns in order
        assert image is IMAGES[1] and (rows, cols) == (7, 8)
        assert (got[1:, :, 0] > got[:-1, :, 0]).all() and (got[:, 1:, 1] > got[:, :-1, 1]).all()
    # the tiles' picture is the unpadded region: its aspect ratio is the image's (to a patch)
    assert abs(tiles.picture.width / tiles.picture.height - image.width / image.height) < 0.35


def test_carve_reads_the_any_resolution_tiles(pipe):
    """CARVE's grid for a 40x30 image is its 4x6 unpadded tile grid (image tokens 16.. after the
    4x4 base tile, one newline after each row), not a square; a contrast peak on one cell of it
    lands on that cell's pixels of the original image."""
    from lvlm_hallu.interventions.carve import fuse

    req = lvlm.Request(PROMPTS[0], IMAGES[0])
    grid = pipe.image_grid(req)
    assert grid.shape == (4, 6)
    assert grid[:, 0].tolist() == [16, 23, 30, 37] and grid[0].tolist() == list(range(16, 22))
    n_tokens = int((pipe.prepare([req])["input_ids"] == pipe.facts.image_token_id).sum())
    general = torch.ones(n_tokens)
    for r, c in [(0, 0), (2, 4), (3, 5)]:
        task = torch.ones(n_tokens)
        task[grid[r, c]] = 50.0
        score = fuse([{0: task}], [{0: general}], grid=grid, size=IMAGES[0].size, lam=1e-8)  # (H, W)
        y, x = np.unravel_index(np.argmax(score), score.shape)
        width, height = IMAGES[0].size  # a cell covers width/6 x height/4 pixels
        assert int(x * 6 // width) == c and int(y * 4 // height) == r
    # the pooled 3x3-tile image: CARVE reads its 7x8 pooled grid
    assert pipe.image_grid(lvlm.Request(PROMPTS[0], IMAGES[1])).shape == (7, 8)


def test_carve_on_llava_next_reads_the_tiles_too():
    next_pipe = lvlm.load("tiny-llava-next")
    grid = next_pipe.image_grid(lvlm.Request(PROMPTS[0], IMAGES[2]))  # 32x80: tall tiles, not the 4x4 base
    assert grid.shape[0] > grid.shape[1] and grid.min() == 16


def test_vhr_twin_uses_the_family_chat_template(pipe):
    from lvlm_hallu.interventions.plan import build_plan

    req = lvlm.Request("Describe it.", IMAGES[0], interventions=resolve("vhr"))
    (twin,) = build_plan(pipe.facts, [req], profile={}).twin_requests()
    batch = pipe.prepare([req, twin])
    texts = [pipe.tokenizer.decode(row[mask.bool()]) for row, mask in zip(batch["input_ids"], batch["attention_mask"])]
    assert texts[1] == "<s><|im_start|>user\nDescribe it.<|im_end|>\n<|im_start|>assistant\n"
    assert texts[0] == texts[1].replace("user\n", "user\n" + "<image>" * 44 + "\n")


def test_memory_estimate_counts_the_single_kv_head(pipe):
    from lvlm_hallu.lvlm import memory

    est = memory.estimate(memory.config_for(NAME), dtype=torch.float32)
    assert est.kv_bytes_per_token == 4 * 2 * 1 * 16 * 4  # layers x (K, V) x 1 KV head x head_dim x fp32
    assert est.parameters == sum(p.numel() for p in pipe.model.parameters())


def test_service_answers_with_the_family_unchanged(pipe):
    """The OpenAI-compatible app over a OneVision pipeline: the pipeline's own tokens."""
    import base64
    import io

    from fastapi.testclient import TestClient

    from lvlm_hallu.serve.app import Service, build_app
    from lvlm_hallu.serve.config import ServeConfig

    buf = io.BytesIO()
    IMAGES[1].save(buf, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()
    service = Service(pipe, ServeConfig(model=pipe.model_id, api_key="k", warmup=False, eval_jobs=False))
    body = {"model": pipe.model_id, "max_tokens": 6, "interventions": ["vhr", "pai"],
            "messages": [{"role": "user", "content": [{"type": "text", "text": PROMPTS[0]},
                                                      {"type": "image_url", "image_url": {"url": url}}]}]}
    with TestClient(build_app(service)) as http:
        r = http.post("/v1/chat/completions", headers={"Authorization": "Bearer k"}, json=body)
    assert r.status_code == 200, r.text
    expected = one(pipe, "vhr+pai", n=6)
    assert r.json()["choices"][0]["message"]["content"] == expected.text
    assert r.json()["usage"]["completion_tokens"] == len(expected.token_ids)


def test_inspect_heatmaps_hold_eager_attention_of_their_patches(pipe):
    """`lvlm inspect` on OneVision: per layer, each patch of the base and (pooled) tile panels
    holds transformers' eager attention weight of its own token (GQA 4:1), and panels plus
    the newline tokens sum to the visual attention mass."""
    from lvlm_hallu.lvlm.inspection import inspect, pictures

    image = IMAGES[1]
    L = pipe.facts.num_layers
    insp = inspect(pipe, image, PROMPTS[0], "none", layers=tuple(range(L)), max_new_tokens=2)
    data = {p.name: p.data for p in pictures(insp)}
    model, _ = tiny.build(NAME)
    model.set_attn_implementation("eager")
    batch = pipe.prepare([lvlm.Request(PROMPTS[0], image)])
    with torch.no_grad():
        out = model(**batch, output_attentions=True)
    eager = [a[0, :, -1, :].float().mean(0).numpy() for a in out.attentions]  # (T,) per layer
    visual = (batch["input_ids"][0] == pipe.facts.image_token_id).numpy()
    mass = np.array([e[visual].sum() for e in eager])
    assert np.allclose(data["mass"]["baseline"], mass, atol=1e-5) and mass.max() > 0.01
    assert [p.shape for p in insp.baseline.grid.panels] == [(4, 4), (7, 8)]
    for layer in range(L):
        maps = [np.array(m) for m in data["heatmaps"]["before"][layer]]
        assert sum(m.sum() for m in maps) + data["heatmaps"]["before_other"][layer] == pytest.approx(mass[layer], abs=1e-5)
        for m, panel in zip(maps, insp.baseline.grid.panels):
            assert np.allclose(m, eager[layer][visual][panel.tokens], atol=1e-6)
