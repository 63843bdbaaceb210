"""Image-only variants of transformers' multimodal processors whose video processor needs torchvision.

LLaVA-OneVision's, Qwen2-VL's and Qwen2.5-VL's processors take an image processor, a tokenizer
and a video processor.
transformers' video processors require torchvision, which this project does not install (its
image processors are the PIL ones), and `ProcessorMixin` refuses a processor built without one.
The classes here are transformers' own processor classes with the video processor left out of
their sub-processors (ProcessorMixin reads them from the `__init__` signature), so they build
and load (`from_pretrained`) from an image processor and a tokenizer alone; placeholder expansion
and the chat template are transformers' own code. The engine does not take videos.
"""

from __future__ import annotations

from transformers import LlavaOnevisionProcessor, Qwen2_5_VLProcessor, Qwen2VLProcessor


class LlavaOnevisionImageProcessor(LlavaOnevisionProcessor):
    """LlavaOnevisionProcessor for images only (the same arguments, minus `video_processor`)."""

    def __init__(self, image_processor=None, tokenizer=None, num_image_tokens=None, vision_feature_select_strategy=None,
                 chat_template=None, image_token="<image>", video_token="<video>", vision_aspect_ratio="anyres_max_9",
                 **kwargs):
        kwargs.pop("video_processor", None)
        super().__init__(image_processor, tokenizer, None, num_image_tokens=num_image_tokens,
                         vision_feature_select_strategy=vision_feature_select_strategy, chat_template=chat_template,
                         image_token=image_token, video_token=video_token, vision_aspect_ratio=vision_aspect_ratio,
                         **kwargs)


class Qwen2VLImageProcessor(Qwen2VLProcessor):
    """Qwen2VLProcessor for images only: placeholders from `image_grid_thw`, `mm_token_type_ids`
    for the model's M-RoPE index are transformers' own."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        kwargs.pop("video_processor", None)
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


class Qwen2_5_VLImageProcessor(Qwen2_5_VLProcessor):
    """Qwen2_5_VLProcessor for images only (as Qwen2VLImageProcessor)."""

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        kwargs.pop("video_processor", None)
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


# transformers processor class (Adapter.processor_class) -> its image-only variant
IMAGES_ONLY: dict[str, type] = {
    "LlavaOnevisionProcessor": LlavaOnevisionImageProcessor,
    "Qwen2VLProcessor": Qwen2VLImageProcessor,
    "Qwen2_5_VLProcessor": Qwen2_5_VLImageProcessor,
}


def images_only(processor_class: str) -> type:
    """The image-only variant of transformers' processor class `processor_class`."""
    try:
        return IMAGES_ONLY[processor_class]
    except KeyError:
        raise ValueError(f"no image-only variant of {processor_class}; have: {', '.join(sorted(IMAGES_ONLY))}") from None
