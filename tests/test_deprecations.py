"""The suite fails on deprecated calls (pyproject.toml, [tool.pytest.ini_options] filterwarnings).

Checked with the warning that issue #19 found: transformers' notice that a decoder layer's
`past_key_values=` keyword is deprecated in favour of `cache=`, raised by transformers' own
wrapper, so Python attributes it to a transformers module, not to the caller.
"""

import tomllib
import warnings
from pathlib import Path

import pytest
import torch


def test_the_old_decoder_layer_keyword_is_an_error_under_the_suite_filters():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_attention_heads=2, num_key_value_heads=2,
                         num_hidden_layers=1, vocab_size=8)
    layer = LlamaDecoderLayer(config, layer_idx=0).eval()
    hidden = torch.randn(1, 3, 16)  # (B, T, E)
    position_ids = torch.arange(3)[None]
    cos_sin = LlamaRotaryEmbedding(config)(hidden, position_ids)
    with torch.no_grad():
        current = layer(hidden, position_ids=position_ids, position_embeddings=cos_sin, cache=None)
        with pytest.raises(FutureWarning, match="past_key_values"):
            layer(hidden, position_ids=position_ids, position_embeddings=cos_sin, past_key_values=None)
    assert current.shape == hidden.shape  # the current keyword runs silently


@pytest.mark.parametrize("module", ["lvlm_hallu.lvlm.engine", "lvlm_hallu.interventions.vhr", "lvlm_hallu.demo", "lvlm_hallu.eval", "torch.nn.functional",
                                    "ray.serve.api", "transformers.modeling_layers"])
@pytest.mark.parametrize("category", [FutureWarning, DeprecationWarning])
def test_deprecations_attributed_to_the_project_or_its_libraries_fail(module, category):
    with pytest.raises(category):
        warnings.warn_explicit("old call", category, "x.py", 1, module=module)


@pytest.mark.parametrize("module", ["lvlmx", "evaluate.loading", "pydantic.main"])
def test_other_packages_deprecations_only_warn(module):
    with pytest.warns(DeprecationWarning):
        warnings.warn_explicit("their own business", DeprecationWarning, "x.py", 1, module=module)


def test_every_known_third_party_exception_gives_its_reason():
    pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
    text = pyproject.read_text()
    filters = tomllib.loads(text)["tool"]["pytest"]["ini_options"]["filterwarnings"]
    for line in filters:
        if line.startswith("ignore"):
            assert f'"{line}",  # ' in text.replace("\\\\", "\\"), f"no reason given for {line!r}"


def test_rays_own_pydantic_field_notice_is_the_one_known_exception():
    message = ("Using extra keyword arguments on `Field` is deprecated and will be removed. Use `json_schema_extra` "
               "instead. (Extra keys: 'update_type').")
    with warnings.catch_warnings(record=True) as seen:
        warnings.warn_explicit(message, DeprecationWarning, "config.py", 177, module="ray.serve._private.config")
    assert seen == []  # ignored, neither raised nor shown
    with pytest.raises(DeprecationWarning):  # the same notice from anywhere else in Ray still fails
        warnings.warn_explicit(message, DeprecationWarning, "api.py", 1, module="ray.serve.api")
