"""Bad input raises clear, typed errors."""

import pytest
import torch
from PIL import Image
from transformers import BertConfig

from lvlm_hallu import lvlm
from lvlm_hallu.lvlm.adapters import adapter_for
from lvlm_hallu.lvlm.errors import ImageError, PromptError, UnsupportedModelError
from lvlm_hallu.lvlm.pipeline import load_image


@pytest.fixture(scope="module")
def pipe():
    return lvlm.load("tiny-llava")


def test_unreadable_image(tmp_path):
    bad = tmp_path / "x.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(ImageError, match="cannot read image"):
        load_image(bad)
    with pytest.raises(ImageError):
        load_image(b"")


def test_unknown_family_lists_supported():
    with pytest.raises(UnsupportedModelError, match=r"'bert'.*llava.*llava_next"):
        adapter_for(BertConfig())


def test_missing_image_token(pipe):
    batch = pipe.prepare([lvlm.Request("Describe.", Image.new("RGB", (32, 32)))])
    no_token = pipe.tokenizer(["USER: Describe. ASSISTANT:"], return_tensors="pt")
    with pytest.raises(PromptError, match="image tokens"):
        pipe.engine.prefill(no_token["input_ids"], no_token["attention_mask"], pipe.vision_inputs(batch))
    with pytest.raises(PromptError, match="no image"):
        pipe.engine.prefill(batch["input_ids"], batch["attention_mask"], {})


def test_prompt_longer_than_context(pipe):
    with pytest.raises(PromptError, match="exceeds the model context"):
        pipe.generate([lvlm.Request("word " * 200, Image.new("RGB", (32, 32)), max_new_tokens=8)])


def test_empty_prompt_and_zero_tokens(pipe):
    with pytest.raises(PromptError, match="empty"):
        pipe.generate([lvlm.Request("  ", None)])
    with pytest.raises(PromptError, match="max_new_tokens"):
        pipe.generate([lvlm.Request("hi", None, max_new_tokens=0)])


def test_text_only_request(pipe):
    (res,) = pipe.generate([lvlm.Request("hello", None, max_new_tokens=3)])
    assert len(res.token_ids) <= 3 and res.prompt_tokens > 0
