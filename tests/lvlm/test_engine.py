"""The engine against transformers' own generate and attention implementations."""

import pytest
import torch
from PIL import Image

from lvlm_hallu import lvlm
from lvlm_hallu.lvlm import tiny
from lvlm_hallu.lvlm.engine import NoPlan
from tests.conftest import hf_generate

PROMPTS = ["Describe this image.", "What is in the picture?", "Hi", "Is there a red ball in the image? Answer briefly."]
COLORS = ["red", "blue", "green", "white"]
SIZES = [(40, 30), (64, 64), (32, 80), (50, 50)]


def requests(n: int, max_new_tokens: int = 12):
    return [
        lvlm.Request(PROMPTS[i], Image.new("RGB", SIZES[i], COLORS[i]), max_new_tokens=max_new_tokens)
        for i in range(n)
    ]


@pytest.fixture(scope="module", params=tiny.NAMES)
def pipe(request):
    return lvlm.load(request.param)


@pytest.mark.parametrize("n", [1, 4])
def test_greedy_matches_transformers_generate(pipe, n):
    reqs = requests(n)
    batch = pipe.prepare(reqs)
    if n == 4:
        assert (batch["attention_mask"] == 0).any(), "the batch must be left-padded for this test"
    ours = [r.token_ids for r in pipe.generate(reqs)]
    assert ours == hf_generate(pipe.model_id, batch, 12)


def test_batch_rows_equal_rows_alone(pipe):
    reqs = requests(4, max_new_tokens=6)
    together = [r.token_ids for r in pipe.generate(reqs)]
    alone = [pipe.generate([r])[0].token_ids for r in reqs]
    assert together == alone


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_registered_attention_matches_transformers(pipe, impl):
    batch = pipe.prepare(requests(3))
    ref_model, _ = tiny.build(pipe.model_id)
    ref_model.set_attn_implementation(impl)
    with torch.no_grad():
        ref = ref_model(**batch).logits
        via_hf = pipe.model(**batch).logits  # our "lvlm" attention through transformers' forward
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(via_hf[valid], ref[valid], atol=1e-5, rtol=1e-5)
    # and through our own engine (empty plan): next-token logits of the prompt
    logits, _ = pipe.engine.prefill(batch["input_ids"], batch["attention_mask"], pipe.vision_inputs(batch), NoPlan())
    torch.testing.assert_close(logits, ref[:, -1].float(), atol=1e-5, rtol=1e-5)


class DropKeys(NoPlan):
    """Reference for a shortened layer: hide keys `drop` of `layer` by masking at decode."""

    def __init__(self, layer, drop):
        self.layer, self.drop = layer, drop

    def key_mask(self, layer, state):
        if layer != self.layer or state.phase != "decode":
            return None
        k_len = state.cache.length(layer) + 1
        keep = torch.ones(state.hidden.shape[0], k_len, dtype=torch.bool)
        keep[:, self.drop] = False
        return keep


def test_layer_with_shorter_kv_decodes_like_masked_reference():
    pipe = lvlm.load("tiny-llava")
    reqs = requests(2)
    batch = pipe.prepare(reqs)
    vision = pipe.vision_inputs(batch)
    layer = 2
    image_pos = (batch["input_ids"][1] == pipe.facts.image_token_id).nonzero().flatten()
    drop = image_pos[:5]  # same columns in both rows (row 1 is the longest: no padding)

    def run(plan, shorten: bool):
        logits, state = pipe.engine.prefill(batch["input_ids"], batch["attention_mask"], vision, plan)
        if shorten:
            cache = state.cache
            keep = torch.ones(cache.length(layer), dtype=torch.bool)
            keep[drop] = False
            start = cache.start[layer] - (drop.unsqueeze(1) < cache.start[layer]).sum(0).to(torch.int32)
            keys, values = cache.layer_kv(layer)
            cache.replace_layer(layer, keys[:, :, keep], values[:, :, keep], start)
            assert cache.length(layer) == cache.length(0) - len(drop)
        steps = []
        token = logits.argmax(-1)
        for _ in range(4):
            logits = pipe.engine.decode_one_token(token, state)
            steps.append(logits)
            token = logits.argmax(-1)
        return torch.stack(steps)

    shortened = run(NoPlan(), shorten=True)
    masked = run(DropKeys(layer, drop), shorten=False)
    full = run(NoPlan(), shorten=False)
    torch.testing.assert_close(shortened, masked, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(shortened, full, atol=1e-5), "dropping keys must change something"


def test_streaming_reassembles_text_and_stop_strings():
    pipe = lvlm.load("tiny-llava")
    (plain,) = pipe.generate(requests(1, max_new_tokens=10))
    assert len(plain.text) >= 4
    stop = plain.text[2:4]
    pieces = []
    (stopped,) = pipe.generate(
        [lvlm.Request(PROMPTS[0], Image.new("RGB", SIZES[0], COLORS[0]), max_new_tokens=10, stop=(stop,))],
        on_token=lambda row, delta: pieces.append(delta),
    )
    assert stopped.finish_reason == "stop"
    assert stopped.text == plain.text[: plain.text.find(stop)]
    assert "".join(pieces) == stopped.text


def test_sampling_is_seeded():
    pipe = lvlm.load("tiny-llava")
    req = lambda seed: lvlm.Request(PROMPTS[1], Image.new("RGB", (40, 40)), max_new_tokens=8, temperature=1.0, top_p=0.9, seed=seed)
    a, b, c = (pipe.generate([req(s)])[0].token_ids for s in (1, 1, 2))
    assert a == b and a != c


# -- continuous batching: rows join and leave a running batch -----------------------------------

JOIN_METHODS = {
    "none": None,
    "vhr": [{"name": "vhr", "alpha": 4.0}],
    "var": [{"name": "var", "p": 1.0, "rho": 0.0, "min_visual": 0.0, "sink_dims": [3, 7], "tau": 1.5}],
    "pai": [{"name": "pai", "alpha": 3.0}],
    "pai-contrast": [{"name": "pai", "alpha": 1.0, "contrast": True}],  # a twin row through the decode
    "vte": [{"name": "vte", "exit_layer": 0}],  # layers of different lengths
    "vte-dynamic": [{"name": "vte", "policy": "dynamic", "threshold": 0.5, "min_layer": 1}],
}


def join_requests(specs):
    """Requests with different prompts, images and lengths, so that rows leave at different steps."""
    from lvlm_hallu.interventions import resolve

    lengths = [9, 4, 7, 5, 6]
    return [
        lvlm.Request(PROMPTS[i % 4], Image.new("RGB", SIZES[i % 4], COLORS[i % 4]), max_new_tokens=lengths[i],
                     interventions=resolve(spec))
        for i, spec in enumerate(specs)
    ]


def staggered(pipe, reqs, schedule):
    """Run through one RunningBatch; schedule[step] lists the requests admitted before that step."""
    from lvlm_hallu.lvlm.pipeline import RunningBatch

    batch, rows, step = RunningBatch(pipe), {}, 0
    sizes = []
    while len(rows) < len(reqs) or batch:
        for i in schedule.get(step, []):
            (rows[i],) = batch.admit([reqs[i]])
        sizes.append(len(batch))
        batch.step()
        step += 1
    return [rows[i].result for i in range(len(reqs))], sizes


SCHEDULE = {0: [0], 2: [1], 3: [2, 3], 6: [4]}  # joins while others run; row 1 leaves before 4 joins


@pytest.mark.parametrize("method", sorted(JOIN_METHODS))
def test_rows_joining_and_leaving_decode_as_alone(method):
    pipe = lvlm.load("tiny-llava")
    reqs = join_requests([JOIN_METHODS[method]] * 5)
    alone = [pipe.generate([r])[0] for r in reqs]
    static = pipe.generate(reqs)
    joined, sizes = staggered(pipe, reqs, SCHEDULE)
    assert max(sizes) >= 3, "rows must actually share the batch"
    assert [r.token_ids for r in joined] == [r.token_ids for r in alone] == [r.token_ids for r in static]
    assert [r.text for r in joined] == [r.text for r in alone]
    for a, j in zip(alone, joined):  # the intervention report travels with the row
        assert {k: v for k, v in a.report.items() if k != "added_ms"}.keys() == j.report.keys() - {"added_ms"}


def test_mixed_methods_join_and_leave_as_alone():
    pipe = lvlm.load("tiny-llava")
    specs = [JOIN_METHODS[m] for m in ("pai-contrast", "none", "vte", "vhr", "var")]
    reqs = join_requests(specs)
    alone = [pipe.generate([r])[0].token_ids for r in reqs]
    joined, _ = staggered(pipe, reqs, SCHEDULE)
    assert [r.token_ids for r in joined] == alone
    static = pipe.generate(reqs)
    assert [r.token_ids for r in static] == alone
    assert joined[2].report["vte"]["exit_layer"] == 0 and "vhr" in joined[3].report


def test_cancelled_row_leaves_and_others_continue():
    from lvlm_hallu.lvlm.pipeline import RunningBatch

    pipe = lvlm.load("tiny-llava")
    reqs = join_requests([None, None, None])
    alone = [pipe.generate([r])[0].token_ids for r in reqs]
    batch = RunningBatch(pipe)
    rows = batch.admit(reqs)
    batch.step()
    batch.cancel(rows[1])
    while batch:
        batch.step()
    assert rows[1].result.finish_reason == "cancelled" and len(rows[1].result.token_ids) == 2
    assert [rows[0].result.token_ids, rows[2].result.token_ids] == [alone[0], alone[2]]


def test_decoder_layers_without_a_cache_parameter_are_refused():
    """transformers 5.17 (the lent GPU machines' release) names the decoder layers' cache
    `past_key_values`: `cache=` would vanish into `**kwargs` and every decode step would attend to
    its own token only. The engine refuses such layers instead of answering wrongly."""
    from lvlm_hallu.lvlm.engine import check_cache_argument
    from lvlm_hallu.lvlm.errors import UnsupportedModelError

    class OldLayer(torch.nn.Module):
        def forward(self, hidden_states, attention_mask=None, position_ids=None, past_key_values=None,
                    use_cache=False, position_embeddings=None, **kwargs):
            return hidden_states

    class Layer(torch.nn.Module):
        def forward(self, hidden_states, attention_mask=None, position_ids=None, cache=None, **kwargs):
            return hidden_states

    check_cache_argument(torch.nn.ModuleList([Layer(), Layer()]))
    with pytest.raises(UnsupportedModelError, match="OldLayer.forward takes no `cache` argument"):
        check_cache_argument(torch.nn.ModuleList([Layer(), OldLayer()]))
    pipe = lvlm.load("tiny-llava")  # the installed transformers passes
    check_cache_argument(pipe.engine.layers)
