"""Server limits a request does not name, and the context: an operator's --max-tokens below the
default answer length caps the default instead of refusing every request that omits max_tokens
(the official `openai` client omits it); a prompt that overflows the context only with its image
tokens is `context_length_exceeded`, like a long text."""

from __future__ import annotations

import openai
import pytest
from fastapi.testclient import TestClient

from lvlm_hallu.serve.app import Service, build_app
from lvlm_hallu.serve.config import ServeConfig
from lvlm_hallu.serve.limits import Limits
from tests.serve.conftest import data_url, png

KEY = "limits-key"


@pytest.fixture
def http(fake_pipeline):
    config = ServeConfig(model="fake", api_key=KEY, limits=Limits(max_tokens=12), max_batch_size=4)
    assert Limits().default_max_tokens > 12  # the case under test: the default is above the limit
    with TestClient(build_app(Service(fake_pipeline, config)), raise_server_exceptions=False) as client:
        yield client


def messages():
    return [{"role": "user", "content": [{"type": "text", "text": "Describe this image."},
                                         {"type": "image_url", "image_url": {"url": data_url(png())}}]}]


def test_omitted_max_tokens_gets_the_servers_limit_when_it_is_below_the_default(http, fake_pipeline):
    client = openai.OpenAI(api_key=KEY, base_url=str(http.base_url) + "/v1", http_client=http, max_retries=0)
    reply = client.chat.completions.create(model="fake", messages=messages())
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 12
    assert len(reply.choices[0].message.content.split()) == 12
    with pytest.raises(openai.BadRequestError, match="exceeds this server's limit of 12"):
        client.chat.completions.create(model="fake", messages=messages(), max_tokens=13)


def test_image_tokens_that_overflow_the_context_are_context_length_exceeded():
    from lvlm_hallu import lvlm

    pipe = lvlm.load("tiny-llava")
    config = ServeConfig(model="tiny-llava", api_key=KEY, limits=Limits(max_tokens=pipe.max_context))
    with TestClient(build_app(Service(pipe, config)), raise_server_exceptions=False) as http:
        text_tokens = len(pipe.tokenizer("Describe this image.", add_special_tokens=False)["input_ids"])
        fits_as_text = pipe.max_context - text_tokens - 1  # passes the text-only check before the model
        client = openai.OpenAI(api_key=KEY, base_url=str(http.base_url) + "/v1", http_client=http, max_retries=0)
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(model="tiny-llava", messages=messages(), max_tokens=fits_as_text)
        error = info.value.body
        assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
        assert f"max_new_tokens={fits_as_text} exceeds the model context of {pipe.max_context}" in error["message"]
        with pytest.raises(openai.BadRequestError) as info:  # not "the prompt is empty" about the user's prompt
            client.chat.completions.create(model="tiny-llava", messages=messages(), max_tokens=2,
                                           extra_body={"interventions": [{"name": "carve", "general_prompt": " "}]})
        assert info.value.body["param"] == "interventions.carve.general_prompt"
