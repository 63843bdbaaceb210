"""The preallocated KV cache (chunked growth, row removal, merging) and incremental detokenization."""

import random

import pytest
import torch
from PIL import Image
from tokenizers import Tokenizer, decoders
from tokenizers.models import BPE
from transformers import PreTrainedTokenizerFast

from lvlm_hallu import lvlm
from lvlm_hallu.lvlm.cache import KVCache
from lvlm_hallu.lvlm.detokenize import IncrementalDetokenizer
from lvlm_hallu.lvlm.engine import NoPlan


def kv(rows, n, fill, heads=2, dim=4):
    """(rows, heads, n, dim) keys whose value at column j is fill + j (so columns are traceable)."""
    cols = torch.arange(n, dtype=torch.float32)[None, None, :, None]
    return (fill + cols).expand(rows, heads, n, dim).contiguous()


def test_growth_across_a_capacity_boundary_keeps_keys_and_shapes():
    cache = KVCache(2, chunk=8)
    cache.begin_layer(0, torch.tensor([0, 3], dtype=torch.int32))
    k0, _ = cache.update(kv(2, 6, 0.0), kv(2, 6, 100.0), 0)
    assert cache.capacity(0) == 8 and cache.growths == 0
    buffer = cache._k[0].data_ptr()
    seen = [k0]
    for step in range(5):  # columns 6..10: crosses the capacity of 8 at column 8
        k, v = cache.update(kv(2, 1, 6.0 + step), kv(2, 1, 106.0 + step), 0)
        seen.append(k)
        if cache.length(0) <= 8:
            assert cache._k[0].data_ptr() == buffer, "no reallocation between growths"
    assert cache.growths == 1 and cache.capacity(0) == 16 and cache.length(0) == 11
    keys, values = cache.layer_kv(0)
    torch.testing.assert_close(keys, kv(2, 11, 0.0))
    torch.testing.assert_close(values, kv(2, 11, 100.0))
    assert cache.start[0].tolist() == [0, 3]


def test_select_rows_compacts_padding_and_keeps_key_classes():
    cache = KVCache(1, chunk=4)
    cache.begin_layer(0, torch.tensor([0, 2, 3], dtype=torch.int32))
    cache.set_key_classes(0, torch.tensor([[1, 1, 0, 0, 0], [0, 0, 1, 0, 0], [0, 0, 0, 1, 0]], dtype=torch.uint8))
    keys = torch.randn(3, 2, 5, 4)
    cache.update(keys, keys + 1, 0)
    cache.select_rows(torch.tensor([2, 1]))  # the unpadded row leaves: two columns are padding for all
    assert cache.length(0) == 3 and cache.start[0].tolist() == [1, 0]
    k, v = cache.layer_kv(0)
    torch.testing.assert_close(k, keys[[2, 1]][:, :, 2:])
    torch.testing.assert_close(v, keys[[2, 1]][:, :, 2:] + 1)
    assert cache.key_classes(0, 4).tolist() == [[0, 1, 0, 0], [1, 0, 0, 0]]  # new column: text (0)


def test_merge_right_aligns_both_sides_per_layer():
    a, b = KVCache(2, chunk=4), KVCache(2, chunk=4)
    ka, kb = torch.randn(1, 2, 5, 4), torch.randn(2, 2, 3, 4)
    for layer, (na, nb) in enumerate([(5, 3), (2, 3)]):  # layer 1: a is the shorter side (a token exit)
        a.begin_layer(layer, torch.tensor([1], dtype=torch.int32))
        a.set_key_classes(layer, torch.full((1, na), 2, dtype=torch.uint8))
        a.update(ka[:, :, :na], ka[:, :, :na], layer)
        b.begin_layer(layer, torch.tensor([0, 2], dtype=torch.int32))
        b.update(kb[:, :, :nb], kb[:, :, :nb] * 2, layer)
    a.merge(b)
    assert [a.length(0), a.length(1)] == [5, 3]
    assert a.start[0].tolist() == [1, 2, 4] and a.start[1].tolist() == [2, 0, 2]
    k0, v0 = a.layer_kv(0)
    torch.testing.assert_close(k0[0], ka[0])
    torch.testing.assert_close(k0[1:, :, 2:], kb)
    torch.testing.assert_close(v0[1:, :, 2:], kb * 2)
    k1, _ = a.layer_kv(1)
    torch.testing.assert_close(k1[0, :, 1:], ka[0, :, :2])
    assert a.key_classes(1, 3).tolist() == [[0, 2, 2], [0, 0, 0], [0, 0, 0]]


def test_select_rows_in_order_moves_rows_up_in_place_and_keeps_decoding():
    cache = KVCache(2, chunk=8)
    keys = torch.randn(4, 2, 5, 4)
    for layer in range(2):
        cache.begin_layer(layer, torch.tensor([0, 1, 0, 2], dtype=torch.int32))  # row 0 and 2 unpadded
        cache.set_key_classes(layer, torch.arange(4, dtype=torch.uint8)[:, None].expand(4, 5).contiguous())
        cache.update(keys, keys + 1, layer)
    buffer = cache._k[0].data_ptr()
    cache.select_rows(torch.tensor([0, 2, 3]))  # row 1 leaves; row 0 keeps column 0 in use
    assert cache._k[0].data_ptr() == buffer, "no new buffer when no column is dropped"
    assert cache.length(0) == 5 and cache.start[0].tolist() == [0, 0, 2]
    k, v = cache.layer_kv(0)
    torch.testing.assert_close(k, keys[[0, 2, 3]])
    torch.testing.assert_close(v, keys[[0, 2, 3]] + 1)
    assert cache.key_classes(0, 6)[:, :5].tolist() == [[0] * 5, [2] * 5, [3] * 5]
    for step in range(4):  # keeps writing (and grows past the capacity of 8) on the kept rows
        cache.update(kv(3, 1, 10.0 + step), kv(3, 1, 20.0 + step), 0)
    k, _ = cache.layer_kv(0)
    torch.testing.assert_close(k[:, :, :5], keys[[0, 2, 3]])
    torch.testing.assert_close(k[:, :, 5:], kv(3, 4, 10.0))
    cache.select_rows(torch.tensor([2, 0]))  # out of order: the copying path, same contract
    torch.testing.assert_close(cache.layer_kv(1)[0], keys[[3, 0]])


def test_merge_left_padding_is_zero():
    a, b = KVCache(1, chunk=4), KVCache(1, chunk=4)
    a.begin_layer(0, torch.tensor([0], dtype=torch.int32))
    a.update(torch.full((1, 2, 6, 4), 7.0), torch.ones(1, 2, 6, 4), 0)
    b.begin_layer(0, torch.tensor([0], dtype=torch.int32))
    b.update(torch.ones(1, 2, 2, 4), torch.ones(1, 2, 2, 4), 0)
    a.merge(b)
    k, v = a.layer_kv(0)
    assert a.start[0].tolist() == [0, 4]
    assert k[1, :, :4].abs().sum() == 0 and v[1, :, :4].abs().sum() == 0, "masked, but must be finite"


def _requests(n, max_new_tokens):
    colors = ["red", "blue", "green"]
    prompts = ["Describe this image.", "What is in the picture?", "Hi"]
    return [lvlm.Request(prompts[i], Image.new("RGB", (40 + 8 * i, 32), colors[i]), max_new_tokens=max_new_tokens)
            for i in range(n)]


@pytest.fixture(scope="module")
def pipe():
    return lvlm.load("tiny-llava")


def test_small_chunks_and_static_shapes_decode_the_same_tokens(pipe):
    reqs = _requests(3, 12)
    engine = pipe.engine
    base = [r.token_ids for r in pipe.generate(reqs)]
    try:
        engine.cache_chunk = 8  # a growth every 8 tokens, several during the decode
        assert [r.token_ids for r in pipe.generate(reqs)] == base
        engine.static_shapes = True  # attention over the whole capacity, tail masked
        assert [r.token_ids for r in pipe.generate(reqs)] == base
    finally:
        engine.cache_chunk, engine.static_shapes = 256, False


def test_static_shapes_refuse_interventions(pipe):
    from lvlm_hallu.interventions import resolve

    req = lvlm.Request("Hi", Image.new("RGB", (32, 32)), max_new_tokens=2, interventions=resolve("pai"))
    pipe.engine.static_shapes = True
    try:
        with pytest.raises(ValueError, match="static_shapes"):
            pipe.generate([req])
    finally:
        pipe.engine.static_shapes = False


def test_decode_step_allocates_no_cache_between_growths(pipe):
    batch = pipe.prepare(_requests(2, 8))
    logits, state = pipe.engine.prefill(batch["input_ids"], batch["attention_mask"], pipe.vision_inputs(batch), NoPlan())
    cache = state.cache
    pointers = [cache._k[l].data_ptr() for l in range(len(cache))]
    room = cache.capacity(0) - cache.length(0)
    token = logits.argmax(-1)
    for _ in range(min(room, 5)):
        token = pipe.engine.decode_one_token(token, state).argmax(-1)
    assert [cache._k[l].data_ptr() for l in range(len(cache))] == pointers
    assert cache.growths == 0


# -- incremental detokenization ------------------------------------------------------------------

def byte_fallback_tokenizer():
    """A Llama-style SentencePiece tokenizer: word pieces with '▁' and <0xNN> byte-fallback tokens."""
    words = ["▁the", "▁cat", "▁a", "s", "▁red", "ball", ".", ",", "▁", "é", "▁naïve", "!"]
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for b in range(256):
        vocab[f"<0x{b:02X}>"] = len(vocab)
    for w in words:
        vocab[w] = len(vocab)
    tok = Tokenizer(BPE(vocab, [], unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    return fast, vocab


def random_streams(vocab_ids, byte_ids, seed, n_streams=40, length=60):
    rng = random.Random(seed)
    utf8 = [list(ch.encode()) for ch in "é€😀ñ中"]
    for _ in range(n_streams):
        ids = []
        while len(ids) < length:
            roll = rng.random()
            if roll < 0.25 and byte_ids:  # a valid multi-byte character as byte tokens
                ids += [byte_ids[b] for b in rng.choice(utf8)]
            elif roll < 0.35 and byte_ids:  # a stray byte (never valid UTF-8 on its own)
                ids.append(byte_ids[rng.randrange(128, 256)])
            else:
                ids.append(rng.choice(vocab_ids))
        yield ids


def check_stream(tokenizer, ids):
    detok = IncrementalDetokenizer(tokenizer)
    pieces = []
    for i, t in enumerate(ids):
        pieces.append(detok.push(t))
        assert not detok.text.endswith("\ufffd") or tokenizer.decode(ids[: i + 1], skip_special_tokens=True).endswith("\ufffd")
    pieces.append(detok.finish())
    full = tokenizer.decode(ids, skip_special_tokens=True)
    assert "".join(pieces) == full == detok.text


def test_incremental_detokenization_equals_full_decoding_with_byte_fallback():
    tokenizer, vocab = byte_fallback_tokenizer()
    byte_ids = [vocab[f"<0x{b:02X}>"] for b in range(256)]
    words = [i for name, i in vocab.items() if not name.startswith("<0x")]
    assert tokenizer.decode([byte_ids[0xC3], byte_ids[0xA9]]) == "é"  # the fixture really falls back
    for ids in random_streams(words, byte_ids, seed=0):
        check_stream(tokenizer, ids)


@pytest.mark.parametrize("name", ["shapes", "tiny-llava"])
def test_incremental_detokenization_equals_full_decoding_on_model_tokenizers(name):
    tokenizer = lvlm.load(name).tokenizer
    ids = list(range(len(tokenizer)))
    for stream in random_streams(ids, [], seed=1, n_streams=30):
        check_stream(tokenizer, stream)


def test_incremental_detokenization_is_amortized_constant():
    tokenizer, vocab = byte_fallback_tokenizer()
    decoded = []
    real = tokenizer.decode

    def counting(ids, **kw):
        decoded.append(len(ids))
        return real(ids, **kw)

    tokenizer.decode = counting
    words = [i for name, i in vocab.items() if not name.startswith("<0x") and name not in ("<s>", "</s>", "<unk>")]
    rng = random.Random(3)
    detok = IncrementalDetokenizer(tokenizer)
    n = 3000
    for _ in range(n):
        detok.push(rng.choice(words))
    total = sum(decoded)
    assert total < 6 * n, f"decoded {total} token ids for {n} tokens: not O(1) per token"
    detok.finish()
    assert detok.text == real(detok.ids, skip_special_tokens=True)
