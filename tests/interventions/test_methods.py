"""Each intervention: neutral parameters, effect, parity with independent implementations."""

from dataclasses import replace
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, eager_mask

from lvlm_hallu import lvlm
from lvlm_hallu.interventions import InterventionError, resolve
from lvlm_hallu.interventions.plan import build_plan
from lvlm_hallu.interventions.carve import GENERAL_PROMPT as CARVE_G, refine_image
from lvlm_hallu.interventions.validate import validate
from lvlm_hallu.interventions.vhr import default_layers
from lvlm_hallu.interventions.vte import VTE
from lvlm_hallu.lvlm import tiny
from tests.conftest import ACTIVE, NEUTRAL

IMG = Image.new("RGB", (40, 30), "red")
IMG2 = Image.radial_gradient("L").convert("RGB").resize((48, 40))
NEW = 8


@pytest.fixture(scope="module")
def pipe():
    return lvlm.load("tiny-llava")


def run(pipe, spec, image=IMG, prompt="Describe it.", n=NEW):
    (res,) = pipe.generate([lvlm.Request(prompt, image, max_new_tokens=n, interventions=resolve(spec))])
    return res




@pytest.mark.parametrize("method", sorted(NEUTRAL))
def test_neutral_parameters_change_nothing(pipe, method):
    base = run(pipe, None, image=IMG2)
    assert run(pipe, NEUTRAL[method], image=IMG2).token_ids == base.token_ids


@pytest.mark.parametrize("method", sorted(ACTIVE))
def test_active_method_changes_output(pipe, method):
    base = run(pipe, None, image=IMG2, n=12)
    active = run(pipe, ACTIVE[method], image=IMG2, n=12)
    assert active.token_ids != base.token_ids
    assert method in active.report


def test_mixed_batch_equals_rows_alone(pipe):
    specs = [None, "vhr", "var", "pai", "vte", "vhr+var", "var+vte", [{"name": "pai", "contrast": True}]]
    specs[2] = ACTIVE["var"]
    images = [IMG, IMG2, Image.new("RGB", (64, 64), "blue"), IMG2, IMG, IMG2, IMG, IMG2]
    prompts = ["Describe it.", "What is this?", "Colors?", "Describe it.", "Hi", "Objects?", "Count.", "Where?"]
    reqs = [lvlm.Request(p, im, max_new_tokens=6, interventions=resolve(s)) for p, im, s in zip(prompts, images, specs)]
    together = pipe.generate(reqs)
    alone = [pipe.generate([r])[0] for r in reqs]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    assert [sorted(r.report) for r in together] == [sorted(r.report) for r in alone]


def test_rows_repacked_by_token_exit_keep_their_own_edits(pipe):
    """A VAR row shorter than a VTE row: the exit re-packs the batch, VAR must follow the new layout."""
    reqs = [
        lvlm.Request("Describe every object in this picture, please.", IMG2, max_new_tokens=6,
                     interventions=resolve([{"name": "vte", "exit_layer": 2}])),
        lvlm.Request("Hi", IMG2, max_new_tokens=6, interventions=resolve(ACTIVE["var"])),
        lvlm.Request("What?", IMG2, max_new_tokens=6, interventions=resolve([{"name": "pai", "alpha": 2.0}])),
    ]
    together = pipe.generate(reqs)
    alone = [pipe.generate([r])[0] for r in reqs]
    assert [r.token_ids for r in together] == [r.token_ids for r in alone]
    batch_logits = plan_logits(pipe, reqs)[1]
    for i, req in enumerate(reqs):
        torch.testing.assert_close(batch_logits[i], plan_logits(pipe, [req])[1][0], atol=1e-4, rtol=1e-4)


# -- VHR against an independent implementation on transformers' own forward (eager + hooks) --------
def vhr_reference_tokens(batch, layers, alpha, n, positions="all"):
    """Greedy tokens of row 0 with VHR done by o_proj pre-hooks on transformers' eager model
    (`positions` "last": at prefill only the last prompt position is scaled)."""
    model, _ = tiny.build("tiny-llava")
    model.set_attn_implementation("eager")
    cfg = model.config.text_config
    H, D = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    chosen, divergence = {}, {}

    def hook(layer):
        def pre(module, args):
            x = args[0]  # (B, T, H*D): head outputs before o_proj
            B, T, _ = x.shape
            heads = x.view(B, T, H, D)
            if T > 1:  # prefill: rows 0 (image) and 1 (image removed)
                o_img, o_txt = heads[0, -1], heads[1, -1]
                vhd = torch.linalg.vector_norm(o_img - o_txt, dim=-1)
                ta = (o_txt * o_txt).sum(-1)
                big_vhd = vhd > vhd.mean() + vhd.std(correction=0)
                big_ta = ta > ta.mean() + ta.std(correction=0)
                vhd = torch.where(big_vhd & big_ta, 0.0, vhd)
                divergence[layer] = vhd.tolist()
                chosen[layer] = vhd > torch.quantile(vhd, 0.5, interpolation="lower")
            scale = torch.where(chosen[layer], alpha, 1.0)[None, None, :, None].expand(1, T, H, 1).clone()
            if positions == "last":
                scale[:, :-1] = 1.0
            return ((heads * scale).view(B, T, H * D),)

        return pre

    for layer in layers:
        model.model.language_model.layers[layer].self_attn.o_proj.register_forward_pre_hook(hook(layer))
    out = model.generate(**batch, max_new_tokens=n, do_sample=False)
    selected = {l: h.nonzero().flatten().tolist() for l, h in sorted(chosen.items())}
    return out[0, batch["input_ids"].shape[1]:].tolist(), selected, divergence


def test_vhr_matches_hooked_transformers(pipe):
    req = lvlm.Request("Describe it.", IMG2, max_new_tokens=NEW, interventions=resolve([{"name": "vhr", "alpha": 3.0, "layers": [1, 2, 3]}]))
    plans = []
    (ours,) = pipe.generate([req], plan_factory=lambda facts, reqs: plans.append(build_plan(facts, reqs)) or plans[-1])
    batch = pipe.prepare([req, replace(req, image=None, interventions=())])
    tokens, selected, divergence = vhr_reference_tokens(batch, [1, 2, 3], 3.0, NEW)
    assert ours.report["vhr"]["heads"] == selected
    (vhr,) = plans[0].components
    for layer, values in divergence.items():
        assert vhr.vhd[0][layer] == pytest.approx(values, abs=1e-4)
    assert all(len(h) == 2 for h in selected.values())  # half of 4 heads, above the median
    eos = pipe.tokenizer.eos_token_id
    assert ours.token_ids == (tokens[: tokens.index(eos) + 1] if eos in tokens else tokens)


def test_vhr_reinforcing_the_last_prompt_position_only_matches_hooked_transformers(pipe):
    """`positions: last` (docs/methods.md "VHR" leaves open which prompt positions are scaled): at
    prefill only the position that predicts the first token is reinforced, in both rows; decode
    steps as with `all`. It selects its own heads and gives other tokens than `all`."""
    spec = {"name": "vhr", "alpha": 3.0, "layers": [1, 2, 3], "positions": "last"}
    req = lvlm.Request("Describe it.", IMG2, max_new_tokens=NEW, interventions=resolve([spec]))
    (ours,) = pipe.generate([req])
    batch = pipe.prepare([req, replace(req, image=None, interventions=())])
    tokens, selected, _ = vhr_reference_tokens(batch, [1, 2, 3], 3.0, NEW, positions="last")
    assert ours.report["vhr"]["heads"] == selected and ours.report["vhr"]["positions"] == "last"
    eos = pipe.tokenizer.eos_token_id
    assert ours.token_ids == (tokens[: tokens.index(eos) + 1] if eos in tokens else tokens)
    everywhere, _, _ = vhr_reference_tokens(batch, [1, 2, 3], 3.0, NEW)
    assert everywhere != tokens  # the option changes what VHR does
    (last, every) = pipe.generate([req, replace(req, interventions=resolve([{**spec, "positions": "all"}]))])
    assert last.token_ids == ours.token_ids  # one batch, each row its own reading
    assert every.token_ids == (everywhere[: everywhere.index(eos) + 1] if eos in everywhere else everywhere)
    with pytest.raises(InterventionError, match="positions must be one of all, last"):
        resolve([{**spec, "positions": "first"}])


def test_vhr_with_pai_contrast_leaves_the_shared_twin_plain(pipe):
    """docs/methods.md "VHR": PAI's image-removed branch stays unreinforced when VHR shares the request."""
    model, _ = tiny.build("tiny-llava")
    vhr = {"name": "vhr", "alpha": 3.0, "layers": [1, 2, 3]}
    req = lvlm.Request("Describe it.", IMG2, interventions=resolve([vhr, {"name": "pai", "alpha": 0.5, "contrast": True}]))
    with torch.no_grad():
        plain = model(**pipe.prepare([replace(req, image=None, interventions=())])).logits[0, -1]

    def prefill(request):  # as the pipeline lays out a batch: the request, then its image-removed twin
        plan = build_plan(pipe.facts, [request], profile={})
        component, scales = next(c for c in plan.components if c.name == "vhr"), []
        scale = component._scale
        component._scale = lambda *a: scales.append(scale(*a)) or scales[-1]  # record every layer's (B, H) scales
        batch = pipe.prepare([request, *plan.twin_requests()])
        plan.bind(batch)
        logits, _ = pipe.engine.prefill(batch["input_ids"], batch["attention_mask"], pipe.vision_inputs(batch), plan)
        return logits, plan, torch.stack([s for s in scales if s is not None])  # None: a layer VHR leaves alone

    logits, plan, scales = prefill(req)
    assert plan.twin == [False, True] and scales.shape == (3, 2, 4)
    assert scales[:, 1].eq(1).all() and scales[:, 0].eq(3.0).sum() == 6  # the twin plain, two heads per layer reinforced
    torch.testing.assert_close(logits[1], plain, atol=1e-4, rtol=1e-4)  # the twin is the plain text-only model
    assert plan.reports()[0]["vhr"]["reinforce_twin"] is False
    # VHR alone reinforces its twin (the default reading of 1.5), so the checks above can fail.
    _, plan, scales = prefill(replace(req, interventions=resolve([vhr])))
    assert scales[:, 1].eq(3.0).sum() == 6 and plan.reports()[0]["vhr"]["reinforce_twin"] is True
    with pytest.raises(InterventionError, match="must stay plain") as err:
        build_plan(pipe.facts, [replace(req, interventions=resolve([{**vhr, "reinforce_twin": True}, {"name": "pai", "contrast": True}]))])
    assert err.value.param == "interventions.vhr.reinforce_twin"


def test_vhr_default_layers():
    assert default_layers(32) == (1, *range(18, 32))
    assert default_layers(8) == (1, 4, 5, 6, 7)  # {1} ∪ last round(14·8/32) = 4
    assert default_layers(4) == (1, 2, 3)  # round(1.75) = 2: no longer every layer


# -- VAR and PAI against an independent materialized attention on transformers' forward ---------------
class Materialized:
    """A test-local attention function: softmax written out, with PAI and VAR edits."""

    def __init__(self, visual, pai_alpha=0.0, var=None):
        self.visual, self.pai_alpha, self.var = visual, pai_alpha, var
        self.sinks: dict[int, torch.Tensor] = {}

    def layer_hook(self, layer):
        def pre(module, args, kwargs):
            x = (args[0] if args else kwargs["hidden_states"]).float()
            if self.var is not None and layer >= 2:
                rms = torch.sqrt((x * x).mean(-1, keepdim=True) + 1e-6)
                phi = (x[..., self.var["dims"]] / rms).abs().max(-1).values
                self.sinks[layer] = (phi > self.var["tau"]) & kwargs["attention_mask"][:, 0].diagonal(dim1=-2, dim2=-1).eq(0)
        return pre

    def __call__(self, module, q, k, v, mask, scaling=None, dropout=0.0, **kw):
        layer = module.layer_idx
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        s = q @ k.transpose(-1, -2) * scaling  # (B, H, T, T)
        if self.pai_alpha and layer >= 2:
            last = s[:, :, -1]
            s[:, :, -1] = torch.where(self.visual[:, None, :], last + self.pai_alpha * last.abs(), last)
        a = torch.softmax(s + mask, dim=-1)
        if self.var is not None and 2 <= layer <= self.var["last"]:
            S = self.sinks[layer][:, None, None, :]
            V = self.visual[:, None, None, :]
            N = V & ~S
            after_image = torch.arange(s.shape[-1]) > self.visual.long().argmax(-1, keepdim=True) + self.visual.sum(-1, keepdim=True) - 1
            a_v, a_sv, a_s, a_n = (a * V).sum(-1), (a * (S & V)).sum(-1), (a * S).sum(-1), (a * N).sum(-1)
            pick = (a_v >= self.var["min_visual"]) & (a_sv <= (1 - self.var["rho"]) * a_v) & (a_n > 0) & after_image[:, None, :]
            if self.var.get("require_visual_sink", True):  # official code: no visual sink in the layer, no edit
                pick &= (S & V).any(-1)
            p = self.var["p"]
            new = torch.where(S, (1 - p) * a, a)
            new = torch.where(N, a + (p * a_s / a_n.clamp_min(1e-30))[..., None] * a, new)
            a = torch.where(pick[..., None], new, a)
        return (a @ v).transpose(1, 2).contiguous(), a


def materialized_logits(batch, visual, **kw):
    model, _ = tiny.build("tiny-llava")
    fn = Materialized(visual, **kw)
    AttentionInterface.register("test_materialized", fn)
    AttentionMaskInterface.register("test_materialized", eager_mask)
    model.set_attn_implementation({"text_config": "test_materialized", "vision_config": "sdpa"})
    for i, layer in enumerate(model.model.language_model.layers):
        layer.register_forward_pre_hook(fn.layer_hook(i), with_kwargs=True)
    with torch.no_grad():
        return model(**batch).logits[:, -1], fn


def plan_logits(pipe, reqs):
    reqs = reqs if isinstance(reqs, list) else [reqs]
    batch = pipe.prepare(reqs)
    plan = build_plan(pipe.facts, reqs, profile={})
    plan.bind(batch)
    logits, state = pipe.engine.prefill(batch["input_ids"], batch["attention_mask"], pipe.vision_inputs(batch), plan)
    return batch, logits, plan


def test_pai_matches_materialized(pipe):
    req = lvlm.Request("Describe it.", IMG2, interventions=resolve([{"name": "pai", "alpha": 0.7}]))
    batch, ours, _ = plan_logits(pipe, req)
    visual = batch["input_ids"] == pipe.facts.image_token_id
    ref, _ = materialized_logits(batch, visual, pai_alpha=0.7)
    plain, _ = materialized_logits(batch, visual)
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ours, plain, atol=1e-3)


@pytest.mark.parametrize("require_visual_sink", [True, False])
def test_var_matches_materialized(pipe, require_visual_sink):
    var = {"p": 0.8, "rho": 0.2, "min_visual": 0.1, "tau": 1.5, "require_visual_sink": require_visual_sink}
    req = lvlm.Request("Describe it.", IMG2, interventions=resolve([{"name": "var", "sink_dims": [3, 7], **var}]))
    batch, ours, plan = plan_logits(pipe, req)
    visual = batch["input_ids"] == pipe.facts.image_token_id
    ref, fn = materialized_logits(batch, visual, var={**var, "dims": [3, 7], "last": pipe.facts.num_layers - 2})
    plain, _ = materialized_logits(batch, visual)
    sinks = plan.reports()[0]["var"]["sinks"]
    for layer, found in fn.sinks.items():
        assert sinks[layer]["visual"] + sinks[layer]["text"] == int(found.sum())
    assert sum(s["visual"] for s in sinks.values()) > 0
    torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    assert not torch.allclose(ours, plain, atol=1e-4)


# -- VTE ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [0, 1, 2])
def test_vte_equals_masked_emulation(pipe, k):
    removed = run(pipe, [{"name": "vte", "exit_layer": k}], image=IMG2, n=10)
    masked = run(pipe, [{"name": "vte", "exit_layer": k, "emulate": True}], image=IMG2, n=10)
    assert removed.token_ids == masked.token_ids
    assert removed.report["vte"]["exit_layer"] == k
    assert removed.report["vte"]["visual_tokens_removed"] == 16


def test_vte_removal_shortens_later_layers(pipe):
    req = lvlm.Request("Describe it.", IMG2, interventions=resolve([{"name": "vte", "exit_layer": 1}]))
    _, _, plan = plan_logits(pipe, req)
    batch = pipe.prepare([req])
    plan = build_plan(pipe.facts, [req], profile={})
    plan.bind(batch)
    _, state = pipe.engine.prefill(batch["input_ids"], batch["attention_mask"], pipe.vision_inputs(batch), plan)
    lengths = [state.cache.length(l) for l in range(pipe.facts.num_layers)]
    assert lengths[0] == lengths[1] == batch["input_ids"].shape[1]
    assert lengths[2] == lengths[3] == lengths[0] - 16


def test_vte_dynamic_policy_exits(pipe):
    res = run(pipe, [{"name": "vte", "policy": "dynamic", "threshold": 1.0, "min_layer": 1}])
    assert res.report["vte"]["exit_layer"] == 1
    never = run(pipe, [{"name": "vte", "policy": "dynamic", "threshold": 0.0}])
    assert never.report["vte"]["exit_layer"] is None
    assert never.token_ids == run(pipe, None).token_ids


def test_vte_router_weights(pipe, tmp_path, monkeypatch):
    E = pipe.facts.hidden_size
    monkeypatch.setenv("LVLM_ROUTER_DIR", str(tmp_path))  # routers come by name from the operator's directory
    torch.save({"w1": torch.zeros(4, 2 * E), "b1": torch.zeros(4), "w2": torch.zeros(1, 4), "b2": torch.full((1,), 5.0)},
               tmp_path / "router.pt")
    res = run(pipe, [{"name": "vte", "policy": "router", "router": "router", "min_layer": 1}])
    assert res.report["vte"]["exit_layer"] == 1  # the router says "exit" at the first allowed layer


def test_vte_loads_dyvte_routers_as_they_are_and_evaluates_them_from_layer_0(pipe, tmp_path, monkeypatch):
    """docs/methods.md "VTE" (DyVTE routers): two bias-free logits, exit when g1 > g0, from layer 0."""
    E = pipe.facts.hidden_size
    monkeypatch.setenv("LVLM_ROUTER_DIR", str(tmp_path))
    u = torch.zeros(2 * E)
    u[E] = 1.0  # reads one coordinate a of the last hidden state: h = (gelu(a), gelu(-a))
    w1 = torch.stack([u, -u])
    torch.save({"w1": w1, "w2": torch.tensor([[0.0, 0.0], [1.0, 1.0]])}, tmp_path / "exits.pt")  # g1 = a·erf(a/√2) > 0
    torch.save({"w1": w1, "w2": torch.tensor([[1.0, 1.0], [0.0, 0.0]])}, tmp_path / "stays.pt")  # g0 > g1
    torch.save({"w1": w1, "w2": torch.zeros(1, 2)}, tmp_path / "bad.pt")
    assert run(pipe, [{"name": "vte", "policy": "router", "router": "exits"}]).report["vte"]["exit_layer"] == 0
    stays = run(pipe, [{"name": "vte", "policy": "router", "router": "stays"}])
    assert stays.report["vte"]["exit_layer"] is None and stays.token_ids == run(pipe, None).token_ids
    with pytest.raises(ValueError, match="w2 must have 2 rows"):
        run(pipe, [{"name": "vte", "policy": "router", "router": "bad"}])


def test_vte_router_features_leave_out_the_last_token():
    hidden = torch.arange(8.0)[None, :, None].expand(1, 8, 3).clone()  # row t holds t
    visual = torch.tensor([[False, True, True, True, False, False, False, False]])  # text 4..7 after the image
    plan = SimpleNamespace(main_row=lambda r: 0, visual=visual)
    state = SimpleNamespace(hidden=hidden, row_start=torch.tensor([0]))
    features = VTE._router_features(None, plan, state, 0)
    assert features.tolist() == [5.0] * 3 + [7.0] * 3  # mean of rows 4, 5, 6 (not 7); then the last row


def test_vte_exit_at_L_is_neutral_as_at_L_minus_1(pipe):
    L = pipe.facts.num_layers
    base = run(pipe, None, image=IMG2)
    for k in (L - 1, L):
        res = run(pipe, [{"name": "vte", "exit_layer": k}], image=IMG2)
        assert res.token_ids == base.token_ids and res.report["vte"]["exit_layer"] is None
    with pytest.raises(InterventionError, match="outside"):
        validate(resolve([{"name": "vte", "exit_layer": L + 1}]), pipe.facts)


# -- CARVE -----------------------------------------------------------------------------------------
def test_carve_reports_and_refines(pipe):
    res = run(pipe, ACTIVE["carve"], image=IMG2)
    info = res.report["carve"]
    assert info["extra_passes"] == 2 and info["kept"] >= 1 and 0 < info["mask_fraction"] <= 0.25
    assert res.report["added_ms"] > 0
    code = run(pipe, [{"name": "carve", "mode": "code", "max_steps": 4, "answer_suffix": False}], image=IMG2)
    assert code.prompt_tokens > res.prompt_tokens  # two images in the final prompt
    # The crop is upscaled by the larger ratio to the tower's square input (docs/methods.md "CARVE"), never shrunk.
    x0, y0, x1, y1 = info["box"]
    side = pipe.model.config.vision_config.image_size
    factor = max(1.0, side / (x1 - x0), side / (y1 - y0))
    assert info["refined_size"] == [round((x1 - x0) * factor), round((y1 - y0) * factor)]
    assert min(info["refined_size"]) >= min(side - 1, x1 - x0, y1 - y0) and info["answer_suffix"] is False


def test_carve_upscales_a_thin_crop_by_the_larger_ratio():
    score = np.zeros((100, 100))
    score[40:50, 10:90] = 1.0  # one 80 x 10 region holds every top pixel
    refined, info = refine_image(Image.new("RGB", (100, 100), "white"), score, top_p=0.08, k_min=1, target=(336, 336))
    assert info["box"] == [10, 40, 90, 50] and refined.size == (2688, 336)  # x 33.6: both sides cover 336
    assert refine_image(Image.new("RGB", (100, 100)), score, top_p=0.08, k_min=1)[0].size == (800, 100)
    image = Image.new("RGB", (100, 100))
    assert refine_image(image, score, top_p=1.0, k_min=1, target=(336, 336))[0] is image  # keeps all: neutral


def test_carve_never_shrinks_a_crop_below_its_own_size():
    """An any-resolution family's target is its base tile (LLaVA-NeXT: 32 x 32 in the tiny models):
    a 64 x 48 crop must keep its size (the larger ratio, 0.67, would shrink it to 43 x 32), a
    crop smaller than the tile on one side is upscaled until it covers it."""
    score = np.zeros((100, 100))
    score[20:68, 10:74] = 1.0  # one 64 x 48 region
    big, info = refine_image(Image.new("RGB", (100, 100), "white"), score, top_p=0.3072, k_min=1, target=(32, 32))
    assert info["box"] == [10, 20, 74, 68] and big.size == (64, 48)
    thin = np.zeros((100, 100))
    thin[40:56, 10:74] = 1.0  # 64 x 16: the height needs x2 to cover the 32-pixel tile
    assert refine_image(Image.new("RGB", (100, 100)), thin, top_p=0.1024, k_min=1, target=(32, 32))[0].size == (128, 32)


def test_carve_probes_stop_at_eos_greedy_whatever_the_request(pipe, monkeypatch):
    """The read-out probes are greedy, at most max_steps (32) tokens, and stop at EOS even when the
    request asks `ignore_eos` (a benchmark's fixed-length decoding), samples, seeds or logprobs."""
    request = dict(max_new_tokens=48, temperature=0.9, top_p=0.5, seed=7, ignore_eos=True, logprobs=2)
    probes, answers = [], []
    generate = pipe.generate

    def spy(reqs, **kw):
        results = generate(reqs, **kw)
        if "plan_factory" in kw:
            probes.extend(reqs)
            answers.extend(results)
        return results

    (first,) = generate([lvlm.Request("Describe it.", IMG2, max_new_tokens=1)])  # the Q probe's first token
    monkeypatch.setattr(pipe, "generate", spy)
    monkeypatch.setattr(pipe, "eos_ids", pipe.eos_ids | {first.token_ids[0]})  # ... is now an EOS
    pipe.generate([lvlm.Request("Describe it.", IMG2, interventions=resolve("carve"), **request)])
    assert [(p.max_new_tokens, p.temperature, p.top_p, p.seed, p.ignore_eos, p.logprobs) for p in probes] == [
        (32, 0.0, 1.0, None, False, None)] * 2
    assert answers[0].token_ids == [first.token_ids[0]] and answers[0].finish_reason == "stop"
    assert len(answers[1].token_ids) <= 32


def test_carve_answer_suffix_goes_on_q_and_g_in_code_mode(pipe, monkeypatch):
    prompts = []
    generate = pipe.generate

    def spy(reqs, **kw):  # the read-out probes run with CARVE's own plan
        if "plan_factory" in kw:
            prompts.append([r.prompt for r in reqs])
        return generate(reqs, **kw)

    monkeypatch.setattr(pipe, "generate", spy)
    suffix = "\nAnswer the question using a single word or phrase."
    tokens = {}
    for spec, on in (({"mode": "code"}, True), ({"mode": "paper"}, False), ({"mode": "paper", "answer_suffix": True}, True)):
        prompts.clear()
        res = run(pipe, [{"name": "carve", "max_steps": 2, **spec}], image=IMG2, n=2)
        assert prompts == [["Describe it." + suffix, CARVE_G + suffix] if on else ["Describe it.", CARVE_G]]
        assert res.report["carve"]["answer_suffix"] is on
        tokens[on] = tokens.get(on, []) + [res.prompt_tokens]
    suffix_tokens = len(pipe.tokenizer(suffix, add_special_tokens=False)["input_ids"])
    assert tokens[True][1] == tokens[False][0] + suffix_tokens  # and the final question carries it


# -- invalid configurations --------------------------------------------------------------------------
@pytest.mark.parametrize(
    "spec, message",
    [
        ("nope", "unknown intervention 'nope'; valid names: none, carve, pai, var, vhr, vte"),
        ([{"name": "vhr", "alpha": 0}], "alpha must be a number > 0"),
        ([{"name": "vhr", "alpha": -1}], "alpha must be a number > 0"),
        ([{"name": "var", "p": 1.5}], "p must be a number in [0, 1]"),
        ([{"name": "var", "rho": -0.1}], "rho must be a number in [0, 1]"),
        ([{"name": "pai", "alpha": -0.5}], "alpha must be >= 0"),
        ([{"name": "vte", "policy": "magic"}], "policy must be one of fixed, dynamic, router"),
        ([{"name": "vhr", "beta": 1}], "unknown parameter(s) beta"),
        ("vhr+vhr", "requested twice"),
        ([{"alpha": 1}], "needs a string 'name'"),
    ],
)
def test_invalid_configs(spec, message):
    with pytest.raises(InterventionError) as err:
        resolve(spec)
    assert message in str(err.value)


def test_one_object_is_one_intervention():
    (config,) = resolve({"name": "vhr", "alpha": 1.5, "layers": [2, 3]})
    assert (config.name, config.alpha, tuple(config.layers)) == ("vhr", 1.5, (2, 3))
    assert resolve({"name": "vhr", "alpha": 1.5}) == resolve([{"name": "vhr", "alpha": 1.5}])
    with pytest.raises(InterventionError, match="needs a string 'name'"):
        resolve({"alpha": 1.5})


def test_invalid_for_the_model(pipe):
    with pytest.raises(ValueError, match="exit_layer 9 outside the model's 0..4"):
        run(pipe, [{"name": "vte", "exit_layer": 9}])
    with pytest.raises(ValueError, match=r"layers \[7\] outside"):
        run(pipe, [{"name": "vhr", "layers": [7]}])
    with pytest.raises(InterventionError, match="carve needs an image"):
        run(pipe, "carve", image=None)
