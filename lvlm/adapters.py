"""Model families described as data: where each part of a LLaVA-class model lives.

The engine never probes a model with `hasattr` chains. Each supported family is one `Adapter`
row naming the module paths (decoder layers, rotary embedding, final norm, lm_head, token
embedding), the method that turns pixels into projected image features, which processor outputs
and config fields feed it, where the config keeps the image token id, and how rotary position ids
are computed (`positions`, a key of lvlm/positions.py: 1-D from the attention mask, or Qwen2-VL's
three-axis M-RoPE from the model's own `get_rope_index`, arXiv 2409.12191). `ModelFacts` holds the
numbers the interventions need (layer and head counts), read once from the config.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch

from lvlm_hallu.lvlm.errors import UnsupportedModelError


@dataclass(frozen=True)
class Adapter:
    family: str
    model_type: str  # config.model_type of the checkpoint
    model_class: str  # transformers class that loads it
    processor_class: str
    vision_inputs: tuple[str, ...]  # processor outputs passed to the image-feature method
    layers: str = "model.language_model.layers"
    rotary: str = "model.language_model.rotary_emb"
    norm: str = "model.language_model.norm"
    embed: str = "model.language_model.embed_tokens"
    lm_head: str = "lm_head"
    image_features: str = "model.get_image_features"
    feature_kwargs: tuple[str, ...] = ("vision_feature_layer", "vision_feature_select_strategy")  # config fields
    positions: str = "sequence"  # rule in lvlm.positions.POSITIONS
    position_inputs: tuple[str, ...] = ()  # processor outputs the position rule reads besides the ids and mask
    rope_index: str | None = None  # the model's own M-RoPE index function (positions == "mrope")
    vision_grid: str = "square"  # rule in VISION_GRIDS: patches per side of a base image, or None
    images_only_processor: bool = False  # build transformers' processor without its video processor (lvlm/processors.py)

    def get(self, model: torch.nn.Module, part: str) -> Any:
        """Resolve one of the dotted paths above on a loaded model."""
        return operator.attrgetter(getattr(self, part))(model)


ADAPTERS: dict[str, Adapter] = {
    a.model_type: a
    for a in (
        Adapter(
            family="llava",
            model_type="llava",
            model_class="LlavaForConditionalGeneration",
            processor_class="LlavaProcessor",
            vision_inputs=("pixel_values",),
        ),
        Adapter(
            family="llava_next",
            model_type="llava_next",
            model_class="LlavaNextForConditionalGeneration",
            processor_class="LlavaNextProcessor",
            vision_inputs=("pixel_values", "image_sizes"),
        ),
        # LLaVA-OneVision (arXiv 2408.03326): LLaVA-NeXT's any-resolution tiles with a newline token
        # per row, pooled bilinearly when they exceed `vision_aspect_ratio` (anyres_max_9) base
        # tiles; SigLIP tower; Qwen2 text model (GQA, q/k/v biases), 1-D positions.
        Adapter(
            family="llava_onevision",
            model_type="llava_onevision",
            model_class="LlavaOnevisionForConditionalGeneration",
            processor_class="LlavaOnevisionProcessor",
            vision_inputs=("pixel_values", "image_sizes", "batch_num_images"),
            images_only_processor=True,
        ),
        *(
            # Qwen2-VL / Qwen2.5-VL (arXiv 2409.12191, 2502.13923): dynamic resolution (one image
            # gives (h/2)·(w/2) tokens of its own patch grid `image_grid_thw`), M-RoPE positions
            # from the model's `get_rope_index`, GQA; the text model is Qwen2 (q/k/v biases).
            Adapter(
                family=model_type,
                model_type=model_type,
                model_class=model_class,
                processor_class=processor_class,
                vision_inputs=("pixel_values", "image_grid_thw"),
                feature_kwargs=(),
                positions="mrope",
                position_inputs=("mm_token_type_ids", "image_grid_thw"),
                rope_index="model.get_rope_index",
                vision_grid="dynamic",
                images_only_processor=True,
            )
            for model_type, model_class, processor_class in (
                ("qwen2_vl", "Qwen2VLForConditionalGeneration", "Qwen2VLProcessor"),
                ("qwen2_5_vl", "Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLProcessor"),
            )
        ),
    )
}

# Patches per side of one base image: fixed-resolution towers have a square grid; dynamic-resolution
# ones (Qwen2-VL) have a grid per image, read from the processor's `image_grid_thw` (None here).
VISION_GRIDS = {
    "square": lambda vision: vision.image_size // vision.patch_size,
    "dynamic": lambda vision: None,
}


def adapter_for(config: Any) -> Adapter:
    """The adapter of a checkpoint's config, or a clear error listing the supported families."""
    model_type = getattr(config, "model_type", None)
    adapter = ADAPTERS.get(model_type)
    if adapter is None:
        supported = ", ".join(f"{a.model_type} ({a.model_class})" for a in ADAPTERS.values())
        raise UnsupportedModelError(f"unsupported architecture {model_type!r}; supported: {supported}")
    return adapter


@dataclass(frozen=True)
class ModelFacts:
    """Numbers of the language model that plans and kernels need, read once from the config."""

    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int
    vocab_size: int
    max_context: int
    image_token_id: int
    vision_grid: int | None  # patches per side of one base image (LLaVA-1.5-7B: 24); None: per image (Qwen2-VL)

    @classmethod
    def from_config(cls, config: Any) -> "ModelFacts":
        text = config.text_config
        heads = text.num_attention_heads
        return cls(
            num_layers=text.num_hidden_layers,
            num_heads=heads,
            num_kv_heads=getattr(text, "num_key_value_heads", None) or heads,
            head_dim=getattr(text, "head_dim", None) or text.hidden_size // heads,
            hidden_size=text.hidden_size,
            vocab_size=text.vocab_size,
            max_context=text.max_position_embeddings,
            image_token_id=config.image_token_id,
            vision_grid=VISION_GRIDS[adapter_for(config).vision_grid](config.vision_config),
        )
