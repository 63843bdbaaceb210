"""`lvlm inspect`: the data behind every picture against independently computed quantities.

Oracles: transformers' eager attention (`output_attentions=True`) for the visual attention mass
and the heat maps; transformers' own LLaVA-NeXT feature packing for the any-resolution patch
grid; forward pre-hooks on the decoder layers plus VAR's sink rule for the sink marks; the
intervention report for the outlined heads, the exit layer and CARVE's regions. Layer and head
counts come from the model (the embedded model's depth changes).
"""

import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from lvlm_hallu import lvlm
from lvlm_hallu.interventions.var import sink_scores
from lvlm_hallu.lvlm import tiny
from lvlm_hallu.lvlm.errors import ImageError
from lvlm_hallu.lvlm.inspection import GridError, InspectError, inspect, patch_grid, pictures, write
from lvlm_hallu.lvlm.shapes import MODEL_DIR
from lvlm_hallu.lvlm.shapes.world import make_scene

PROMPT = "Describe the image."


@pytest.fixture(scope="module")
def tiny_pipe():
    return lvlm.load("tiny-llava")


@pytest.fixture(scope="module")
def next_pipe():
    return lvlm.load("tiny-llava-next")


@pytest.fixture(scope="module")
def shapes_pipe():
    if not (Path(MODEL_DIR) / "config.json").exists():
        pytest.skip("the embedded shapes model is not trained here")
    return lvlm.load("shapes")


@pytest.fixture(scope="module")
def scene_image():
    return make_scene("test", 0)[1]


def picture_data(insp) -> dict:
    return {p.name: p.data for p in pictures(insp)}


def eager_last_row(pipe, image, prompt=PROMPT) -> list[np.ndarray]:
    """Per layer, the last prompt row's head-mean attention over all keys, from transformers'
    eager attention on an independently loaded copy of the model."""
    if pipe.model_id in tiny.ALL:
        model, _ = tiny.build(pipe.model_id)
    else:
        from transformers import LlavaForConditionalGeneration

        model = LlavaForConditionalGeneration.from_pretrained(MODEL_DIR)
    model.set_attn_implementation("eager")
    batch = pipe.prepare([lvlm.Request(prompt, image)])
    with torch.no_grad():
        out = model(**batch, output_attentions=True)
    return [a[0, :, -1, :].float().mean(0).numpy() for a in out.attentions]  # (T,) per layer


# -- patch grids ----------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(40, 30), (30, 70), (64, 32), (64, 64), (1, 300)])
def test_next_grid_follows_transformers_packing(next_pipe, size):
    """Give every patch a feature naming (tile, y, x), pack it with transformers' own
    `pack_image_features`, and check each panel cell receives the patch whose pixels it shows."""
    pipe = next_pipe
    cfg = pipe.model.config
    side = cfg.vision_config.image_size // cfg.vision_config.patch_size
    p = cfg.vision_config.patch_size
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8))
    batch = pipe.prepare([lvlm.Request(PROMPT, image)])
    grid = patch_grid(pipe, batch)
    tiles = batch["pixel_values"].shape[1]
    t, y, x = torch.meshgrid(torch.arange(tiles), torch.arange(side), torch.arange(side), indexing="ij")
    features = torch.stack([t, y, x], -1).reshape(tiles, side * side, 3).float()
    newline = torch.full((3,), -1.0)
    packed, _ = pipe.model.model.pack_image_features([features], batch["image_sizes"], "default", image_newline=newline)
    packed = packed[0]
    assert packed.shape[0] == grid.n_tokens == int((batch["input_ids"] == cfg.image_token_id).sum())
    assert (packed[grid.other] == -1).all()  # the newline tokens, and only they, lie on no patch
    pixels = batch["pixel_values"][0]  # (tiles, 3, S, S)
    ip = pipe.processor.image_processor
    mean, std = torch.tensor(ip.image_mean)[:, None, None], torch.tensor(ip.image_std)[:, None, None]
    for panel in grid.panels:
        seen = np.asarray(panel.picture).astype(int)
        for r in range(panel.shape[0]):
            for c in range(panel.shape[1]):
                tile, py, px = (int(v) for v in packed[panel.tokens[r, c]])
                patch = (pixels[tile, :, py * p:(py + 1) * p, px * p:(px + 1) * p] * std + mean).clamp(0, 1)
                want = (patch.permute(1, 2, 0).numpy() * 255).round().astype(int)
                assert np.abs(seen[r * p:(r + 1) * p, c * p:(c + 1) * p] - want).max() <= 1


def test_llava_grid_is_the_square_patch_grid_of_the_image(shapes_pipe, scene_image):
    pipe = shapes_pipe
    grid = patch_grid(pipe, pipe.prepare([lvlm.Request(PROMPT, scene_image)]))
    side = pipe.facts.vision_grid
    (panel,) = grid.panels
    assert panel.shape == (side, side) and grid.other.size == 0
    assert panel.tokens.ravel().tolist() == list(range(side * side))
    # the scene is already at the tower's resolution: the panel shows the image itself
    assert panel.picture.size == scene_image.size
    assert np.abs(np.asarray(panel.picture).astype(int) - np.asarray(scene_image).astype(int)).max() <= 1


def test_family_without_grid_is_a_clear_error(tiny_pipe):
    class Fake:
        adapter = type("A", (), {"family": "no_such_family"})()  # every supported family has a grid

    with pytest.raises(GridError, match="no patch grid for family 'no_such_family'.*llava"):
        patch_grid(Fake(), {})


# -- heat maps and visual attention mass ----------------------------------------------------------

@pytest.mark.parametrize("which", ["tiny", "next", "shapes"])
def test_heatmaps_sum_to_visual_attention_mass_of_eager_attention(which, tiny_pipe, next_pipe, shapes_pipe, scene_image):
    pipe = {"tiny": tiny_pipe, "next": next_pipe, "shapes": shapes_pipe}[which]
    image = scene_image if which == "shapes" else Image.new("RGB", (40, 30), "orange")
    L = pipe.facts.num_layers
    insp = inspect(pipe, image, PROMPT, "none", layers=tuple(range(L)), max_new_tokens=2)
    data = picture_data(insp)
    eager = eager_last_row(pipe, image)
    visual = (pipe.prepare([lvlm.Request(PROMPT, image)])["input_ids"][0] == pipe.facts.image_token_id).numpy()
    mass = np.array([e[visual].sum() for e in eager])
    assert np.allclose(data["mass"]["baseline"], mass, atol=1e-5)
    assert mass.max() > 0.01  # the check is not vacuous
    for layer in range(L):
        maps = [np.array(m) for m in data["heatmaps"]["before"][layer]]
        total = sum(m.sum() for m in maps) + data["heatmaps"]["before_other"][layer]
        assert total == pytest.approx(mass[layer], abs=1e-5)
        # each patch holds the eager weight of its own token
        for m, panel in zip(maps, insp.baseline.grid.panels):
            assert np.allclose(m, eager[layer][visual][panel.tokens], atol=1e-6)


def test_pai_heatmaps_show_more_attention_on_the_image(tiny_pipe):
    pipe = tiny_pipe
    L = pipe.facts.num_layers
    insp = inspect(pipe, Image.new("RGB", (32, 32), "blue"), PROMPT, [{"name": "pai", "alpha": 0.5}],
                   layers=tuple(range(L)), max_new_tokens=2)
    data = picture_data(insp)
    before, after = np.array(data["mass"]["baseline"]), np.array(data["mass"]["intervened"])
    start = 2  # PAI edits layers [2, L); earlier layers compute exactly what they computed before
    assert np.allclose(before[:start], after[:start], atol=1e-6)
    for layer in range(L):  # every heat map sums to the mass drawn for its run
        got = sum(np.sum(m) for m in data["heatmaps"]["after"][layer]) + data["heatmaps"]["after_other"][layer]
        assert got == pytest.approx(after[layer], abs=1e-5)
    assert not np.allclose(before[start:], after[start:], atol=1e-4)


def test_vte_exit_marked_and_image_gone_after_it(shapes_pipe, scene_image):
    pipe = shapes_pipe
    L = pipe.facts.num_layers
    k = L // 2 - 1
    insp = inspect(pipe, scene_image, PROMPT, [{"name": "vte", "exit_layer": k}], layers=(k, k + 1), max_new_tokens=2)
    data = picture_data(insp)
    assert data["mass"]["exit_layer"] == insp.intervened.report["vte"]["exit_layer"] == k
    before, after = np.array(data["mass"]["baseline"]), np.array(data["mass"]["intervened"])
    assert np.allclose(after[: k + 1], before[: k + 1], atol=1e-5)  # nothing changes up to the exit
    assert (after[k + 1:] == 0).all() and (before[k + 1:] > 0).all()
    assert data["heatmaps"]["after"][k + 1] is None and data["heatmaps"]["after"][k] is not None


# -- VAR sinks ------------------------------------------------------------------------------------

def test_sink_marks_equal_the_sink_sets(tiny_pipe):
    pipe = tiny_pipe
    image = Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    inputs: dict[int, torch.Tensor] = {}  # layer -> hidden states entering it at the last prefill

    def hook(layer):
        def grab(module, args, kwargs):
            hidden = args[0] if args else kwargs["hidden_states"]
            if hidden.shape[1] > 1:
                inputs[layer] = hidden.detach().clone()
        return grab

    handles = [m.register_forward_pre_hook(hook(i), with_kwargs=True) for i, m in enumerate(pipe.engine.layers)]
    try:
        inspect(pipe, image, PROMPT, "none", max_new_tokens=1)
        visual = (pipe.prepare([lvlm.Request(PROMPT, image)])["input_ids"][0] == pipe.facts.image_token_id)
        phi = sink_scores(inputs[2][:1], (0, 1))[0][visual]  # choose tau so that some, not all, tokens are sinks
        tau = float(phi.median())
        spec = [{"name": "var", "sink_dims": [0, 1], "tau": tau}]
        insp = inspect(pipe, image, PROMPT, spec, max_new_tokens=1)
    finally:
        for h in handles:
            h.remove()
    data = picture_data(insp)["sinks"]
    report = insp.intervened.report["var"]["sinks"]
    assert sorted(int(l) for l in data["per_layer"]) == sorted(int(l) for l in report)
    marked_any = 0
    for layer, marks in data["per_layer"].items():
        expected = np.flatnonzero((sink_scores(inputs[layer][:1], (0, 1))[0] > tau)[visual].numpy()).tolist()
        assert marks == expected
        assert len(marks) == report[layer]["visual"]
        marked_any += len(marks)
    n = int(visual.sum())
    assert 0 < marked_any < n * len(data["per_layer"])
    # a range groups consecutive layers with one sink set
    for r in data["ranges"]:
        lo, hi = r["layers"]
        assert all(data["per_layer"][l] == r["tokens"] for l in range(lo, hi + 1))


# -- VHR heads ------------------------------------------------------------------------------------

def test_outlined_heads_equal_the_selected_heads(tiny_pipe):
    pipe = tiny_pipe
    L, H = pipe.facts.num_layers, pipe.facts.num_heads
    insp = inspect(pipe, Image.new("RGB", (32, 32), "green"), PROMPT, "vhr", max_new_tokens=1)
    data = picture_data(insp)["vhd"]
    report = insp.intervened.report["vhr"]
    assert data["outlined"] == {int(l): h for l, h in report["heads"].items()}
    assert sorted(data["outlined"]) == data["targets"] == sorted(report["layers"])
    for layer in range(L):
        row = data["matrix"][layer]
        if layer not in data["targets"]:
            assert row == [None] * H
            continue
        lower_median = sorted(row)[(H - 1) // 2]  # VHR selects heads above the (lower) median
        assert data["outlined"][layer] == [h for h in range(H) if row[h] > lower_median]
        assert row == report["vhd"][layer]


# -- CARVE ----------------------------------------------------------------------------------------

def test_carve_regions_and_crop_match_the_report(tiny_pipe):
    pipe = tiny_pipe
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (48, 64, 3), dtype=np.uint8))
    insp = inspect(pipe, image, PROMPT, [{"name": "carve", "max_steps": 3}], max_new_tokens=2)
    data = picture_data(insp)["carve"]
    report = insp.intervened.report["carve"]
    assert data["regions"] == report["regions"] and len(data["kept"]) == report["kept"]
    assert data["box"] == report["box"]
    assert data["mask_fraction"] == pytest.approx(report["mask_fraction"], abs=1e-4)
    assert data["score_shape"] == [image.height, image.width]
    # the answer with CARVE looks at the refined image: its heat maps lie on that picture
    x0, y0, x1, y1 = report["box"]
    refined = insp.carve["refined"]  # the crop, upscaled with its aspect kept
    assert refined.width / refined.height == pytest.approx((x1 - x0) / (y1 - y0), rel=0.1)
    side = pipe.model.config.vision_config.image_size
    assert insp.intervened.grid.panels[0].picture.size == (side, side)


# -- answers and files ----------------------------------------------------------------------------

class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.images, self.ids, self.text = [], set(), []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "img":
            self.images.append(attrs["src"])
        if "id" in attrs:
            self.ids.add(attrs["id"])

    def handle_data(self, data):
        self.text.append(data)


def test_files_are_valid_png_and_html(tiny_pipe, tmp_path):
    insp = inspect(tiny_pipe, Image.new("RGB", (40, 30), "red"), PROMPT,
                   [{"name": "var", "sink_dims": [0], "tau": 1.0}, "vhr", "pai"], max_new_tokens=4)
    paths = write(insp, tmp_path / "out")
    names = {"heatmaps", "mass", "sinks", "vhd"}
    assert names <= set(paths)
    for name in names:
        with Image.open(paths[name]) as png:
            assert png.format == "PNG" and png.width > 100 and png.height > 100
            png.verify()
    page = _Page()
    page.feed(paths["html"].read_text())
    page.close()
    assert sorted(page.images) == sorted(f"{n}.png" for n in names)
    assert all((paths["html"].parent / src).is_file() for src in page.images)
    assert {"answer-baseline", "answer-intervened"} <= page.ids
    data = json.loads(paths["data"].read_text())
    assert data["answers"] == {"baseline": insp.baseline.text, "intervened": insp.intervened.text}
    assert set(data["pictures"]) == names


def test_token_changes_rebuild_both_answers(tiny_pipe):
    insp = inspect(tiny_pipe, Image.new("RGB", (32, 32), "white"), PROMPT, [{"name": "pai", "alpha": 3.0}],
                   max_new_tokens=12)
    changes = insp.token_changes()
    assert sum((c["baseline"] for c in changes), []) == insp.baseline.tokens
    assert sum((c["intervened"] for c in changes), []) == insp.intervened.tokens
    assert all(c["baseline"] == c["intervened"] for c in changes if c["op"] == "equal")
    assert "".join(insp.baseline.tokens) == tiny_pipe.tokenizer.decode(insp.baseline.token_ids)


def test_token_pieces_keep_word_spaces(shapes_pipe):
    from lvlm_hallu.lvlm.inspection.trace import token_pieces

    tok = shapes_pipe.tokenizer
    ids = tok("There is a house and a tree.", add_special_tokens=False)["input_ids"]
    pieces = token_pieces(tok, ids)
    assert len(pieces) == len(ids) and "".join(pieces) == tok.decode(ids)


# -- bad input ------------------------------------------------------------------------------------

def test_unreadable_image_is_a_clear_error(tiny_pipe, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image")
    with pytest.raises(ImageError, match="cannot read image"):
        inspect(tiny_pipe, str(bad), PROMPT, "vhr")
    truncated = tmp_path / "cut.png"
    Image.new("RGB", (64, 64), "red").save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:40])
    with pytest.raises(ImageError, match="cannot read image"):
        inspect(tiny_pipe, str(truncated), PROMPT, "none")


def test_image_the_processor_rejects_is_a_clear_error(tiny_pipe, monkeypatch):
    with pytest.raises(ImageError, match="takes one image"):
        inspect(tiny_pipe, [Image.new("RGB", (8, 8))] * 2, PROMPT, "none")

    def refuse(requests):
        raise ValueError("Unsupported number of image dimensions: 2")

    monkeypatch.setattr(tiny_pipe, "prepare", refuse)
    with pytest.raises(ImageError, match="llava processor cannot take this 7x5 image: Unsupported number"):
        inspect(tiny_pipe, Image.new("RGB", (7, 5)), PROMPT, "vhr")


def test_intervention_on_text_only_prompt_is_a_clear_error(tiny_pipe):
    from lvlm_hallu.interventions import InterventionError

    with pytest.raises(InterventionError, match="vhr\\+pai act on the image's tokens and this prompt is text-only"):
        inspect(tiny_pipe, None, PROMPT, "vhr+pai")
    insp = inspect(tiny_pipe, None, PROMPT, "none", max_new_tokens=2)  # without interventions it is fine
    assert [p.name for p in pictures(insp)] == ["mass"]
    assert insp.baseline.grid.n_tokens == 0


def test_unwritable_output_directory_is_a_clear_error(tiny_pipe, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    insp = inspect(tiny_pipe, Image.new("RGB", (32, 32)), PROMPT, "none", max_new_tokens=1)
    with pytest.raises(InspectError, match="cannot write to output directory"):
        write(insp, blocker / "out")


def test_layers_outside_the_model_are_rejected(tiny_pipe):
    L = tiny_pipe.facts.num_layers
    with pytest.raises(ValueError, match=f"outside the model's 0..{L - 1}"):
        inspect(tiny_pipe, Image.new("RGB", (32, 32)), PROMPT, "none", layers=(L,))


# -- command line ---------------------------------------------------------------------------------

def test_cli_writes_the_page(tmp_path):
    from lvlm_hallu.cli import app

    img = tmp_path / "a.png"
    Image.new("RGB", (40, 40), "red").save(img)
    out = tmp_path / "inspect"
    res = CliRunner().invoke(app, ["inspect", "--model", "tiny-llava", "--image", str(img), "--prompt", "Describe.",
                                   "--interventions", "vhr+pai", "--out", str(out), "-n", "3", "--layers", "1,2"])
    assert res.exit_code == 0, res.output
    assert "without:" in res.stdout and "with vhr+pai:" in res.stdout
    assert {"index.html", "data.json", "heatmaps.png", "vhd.png", "mass.png"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / "data.json").read_text())["pictures"]["heatmaps"]["layers"] == [1, 2]


def test_cli_text_only_prompt_with_intervention_is_a_clear_error(tmp_path):
    from lvlm_hallu.cli import app

    res = CliRunner().invoke(app, ["inspect", "--model", "tiny-llava", "--prompt", "x", "--interventions", "pai",
                                   "--out", str(tmp_path / "o")])
    assert res.exit_code == 2
    assert "pai acts on the image's tokens and this prompt is text-only" in " ".join(res.output.split())


def test_cli_bad_output_directory_fails_before_loading(tmp_path):
    from lvlm_hallu.cli import app

    blocker = tmp_path / "file"
    blocker.write_text("x")
    res = CliRunner().invoke(app, ["inspect", "--model", "no-such-model", "--prompt", "x", "--out", str(blocker / "o")])
    assert res.exit_code == 2
    assert "cannot write to output directory" in res.output


# -- eval compare --inspect -----------------------------------------------------------------------

def test_first_images_takes_distinct_images():
    from lvlm_hallu.lvlm.inspection.attach import first_images

    cases = [("q1", "a.png", "x?"), ("q2", "a.png", "y?"), ("t", None, "z"), ("q3", "b.png", "x?"), ("q4", "c.png", "x?")]
    assert first_images(cases, 2) == [("q1", "a.png", "x?"), ("q3", "b.png", "x?")]


@pytest.mark.slow
def test_eval_compare_attaches_inspections(tmp_path, shapes_pipe):
    from lvlm_hallu.lvlm.shapes import SYNONYMS_PATH, build_split
    from lvlm_hallu.cli import app

    root = tmp_path / "world"
    instances, captions = build_split(root, "test", 3)
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["eval", "compare", "--benchmark", "chair", "--interventions", "none,pai",
                                   "--images", str(root / "images"), "--instances", str(instances),
                                   "--captions", str(captions), "--synonyms", str(SYNONYMS_PATH), "--model", "shapes",
                                   "--no-progress", "-n", "2", "--max-new-tokens", "8", "--inspect", "1",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    pages = sorted(out.glob("inspect/*/*/index.html"))
    assert [p.relative_to(out).as_posix() for p in pages] == ["inspect/pai/0/index.html"]  # "none" has nothing to show
    markdown = (out / "chair_report.md").read_text()
    assert "## Inspections" in markdown and "(inspect/pai/0/index.html)" in markdown
    data = json.loads((pages[0].parent / "data.json").read_text())
    assert data["interventions"] == "pai" and "heatmaps" in data["pictures"]
