"""Token log-probabilities against transformers' own generate scores (output_scores=True)."""

import pytest
import torch
from PIL import Image

from lvlm_hallu import lvlm
from lvlm_hallu.interventions import resolve
from lvlm_hallu.lvlm import tiny
from lvlm_hallu.lvlm.logprobs import TokenPieces, step_logprobs
from lvlm_hallu.lvlm.types import TextDelta

PROMPTS = ["Describe this image.", "What is in the picture?", "Hi"]
COLORS = ["red", "blue", "green"]
SIZES = [(40, 30), (64, 64), (32, 80)]
K = 5


def requests(n: int, logprobs: int | None = K, max_new_tokens: int = 8, interventions=()):
    return [lvlm.Request(PROMPTS[i], Image.new("RGB", SIZES[i], COLORS[i]), max_new_tokens=max_new_tokens,
                         logprobs=logprobs, interventions=interventions) for i in range(n)]


@pytest.fixture(scope="module")
def pipe():
    return lvlm.load("tiny-llava")


def hf_scores(batch: dict, max_new_tokens: int):
    """transformers' greedy tokens and per-step log_softmax(scores) on an independent copy."""
    model, _ = tiny.build("tiny-llava")
    model.set_attn_implementation("sdpa")
    out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False, output_scores=True,
                         return_dict_in_generate=True)
    chosen = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)  # (B, steps)
    logp = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], dim=1)  # (B, steps, V)
    return out.sequences[:, batch["input_ids"].shape[1]:], chosen, logp, model.generation_config.eos_token_id


@pytest.mark.parametrize("n", [1, 3])
def test_logprobs_equal_transformers_generate_scores(pipe, n):
    reqs = requests(n)
    batch = pipe.prepare(reqs)
    tokens, chosen, logp, eos = hf_scores(batch, 8)
    compared = 0
    for b, result in enumerate(pipe.generate(reqs)):
        hf_tokens = tokens[b].tolist()
        assert result.token_ids == hf_tokens[: len(result.token_ids)]
        answer = [t for t in result.token_ids if t != eos]  # EOS ends the answer and has no entry
        assert [e.token_id for e in result.logprobs] == answer
        for t, entry in enumerate(result.logprobs):
            assert entry.logprob == pytest.approx(float(chosen[b, t]), abs=1e-5)
            top_lp, top_ids = logp[b, t].topk(K)
            assert [e.logprob for e in entry.top] == pytest.approx(top_lp.tolist(), abs=1e-5)
            assert [e.token_id for e in entry.top] == top_ids.tolist()
            assert entry.top[0].token_id == entry.token_id  # greedy: the chosen token is the argmax
            compared += 1
    assert compared >= 8 * n - n  # at most one EOS per row


def test_top_zero_and_off(pipe):
    (zero,) = pipe.generate(requests(1, logprobs=0))
    assert zero.logprobs and all(e.top == () and e.logprob <= 0 for e in zero.logprobs)
    (off,) = pipe.generate(requests(1, logprobs=None))
    assert off.logprobs is None
    assert off.token_ids == zero.token_ids


def test_rows_without_logprobs_in_the_same_batch(pipe):
    mixed = requests(2)
    mixed[1].logprobs = None
    a, b = pipe.generate(mixed)
    assert a.logprobs is not None and b.logprobs is None
    assert [e.token_id for e in a.logprobs] == [t for t in a.token_ids if t not in pipe.eos_ids]


def test_streamed_deltas_carry_every_entry_in_order(pipe):
    got: list = []
    (result,) = pipe.generate(requests(1, max_new_tokens=10), on_token=lambda _row, delta: got.append(delta))
    assert all(isinstance(d, TextDelta) for d in got)
    streamed = [e for d in got for e in d.logprobs]
    assert streamed == result.logprobs[: len(streamed)]  # the rest goes out with the final chunk
    assert "".join(got) == result.text


def test_with_intervention_logprobs_are_of_the_adjusted_distribution(pipe):
    """PAI changes the logits (attention edit plus the image-removed twin's contrast): the entries are
    of the distribution the greedy token was chosen from, so the chosen token is its argmax."""
    pai = tuple(resolve([{"name": "pai", "alpha": 2.0, "start_layer": 0}]))
    plain = pipe.generate(requests(2))
    edited = pipe.generate(requests(2, interventions=pai))
    differs = False
    for p, e in zip(plain, edited):
        for entry in e.logprobs:
            assert entry.top[0].token_id == entry.token_id
            assert entry.logprob == pytest.approx(entry.top[0].logprob, abs=1e-6)
            assert sum(torch.tensor([t.logprob for t in entry.top]).exp()) <= 1 + 1e-5
        differs |= [x.logprob for x in p.logprobs] != pytest.approx([x.logprob for x in e.logprobs], abs=1e-4)
    assert differs


def test_step_logprobs_sampled_token_and_rows():
    logits = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0]])
    out = step_logprobs(logits, [0, 0], [1, None])
    ref = torch.log_softmax(logits[0], -1)
    assert out[1] is None
    assert out[0][0] == pytest.approx(float(ref[0]))  # the drawn token, not the argmax
    assert out[0][1] == [(2, pytest.approx(float(ref[2])))]
    assert step_logprobs(logits, [0, 0], [None, None]) is None


def test_token_pieces_bytes():
    shapes = lvlm.load("shapes").tokenizer
    pieces = TokenPieces(shapes)
    ids = shapes(" red circle\né", add_special_tokens=False)["input_ids"]
    texts = [pieces(i)[0] for i in ids]
    raw = b"".join(bytes(pieces(i)[1]) for i in ids)
    assert raw.decode("utf-8") == " red circle\né"
    assert texts[0].startswith(" ")  # the leading space of a word token is kept
