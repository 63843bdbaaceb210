"""Tiny LLaVA-1.5, LLaVA-NeXT and LLaVA-OneVision models with RANDOM weights, built offline from configs.

They exist for tests and offline smoke runs: real architectures (`LlavaForConditionalGeneration`,
`LlavaNextForConditionalGeneration`: CLIP vision tower, projector, Llama with grouped-query
attention; `LlavaOnevisionForConditionalGeneration`: SigLIP tower, any-resolution tiles with
OneVision's `anyres_max` pooling, Qwen2 with 4 query heads per KV head, ChatML template;
`Qwen2VLForConditionalGeneration` / `Qwen2_5_VLForConditionalGeneration`: dynamic-resolution
tower (Qwen2.5-VL's windowed), M-RoPE, 4 query heads per KV head) at a few
hundred thousand parameters, with a character-level tokenizer and PIL image processors. Their
text is gibberish by construction; the trained embedded model is "shapes".
"""

from __future__ import annotations

import string

import torch
from tokenizers import Tokenizer, decoders, models, processors
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    " {% else %}ASSISTANT: "
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
IMAGE_SIZE, PATCH = 32, 8
NAMES = ("tiny-llava", "tiny-llava-next")  # test models
ONEVISION = "tiny-llava-onevision"  # test model of the OneVision family (tests/lvlm/test_llava_onevision.py)
QWEN = ("tiny-qwen2-vl", "tiny-qwen2.5-vl")  # Qwen2-VL families (tests/lvlm/test_qwen2_vl.py)
RANDOM_7B = "random-llava-1.5-7b"  # benchmark model (GPU)
ALL = (*NAMES, ONEVISION, *QWEN, RANDOM_7B)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """A character-level tokenizer (printable ASCII) with LLaVA's special tokens, left padding."""
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.add_special_tokens(SPECIALS)
    tok.decoder = decoders.Fuse()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens={"image_token": "<image>"},
        padding_side="left",
    )


def _text_config(vocab_size: int, tok: PreTrainedTokenizerFast) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        # Larger than Llama's 0.02 so that random attention is peaked rather than uniform and
        # the attention interventions visibly act on the tiny model.
        initializer_range=0.1,
    )


def _vision_config() -> CLIPVisionConfig:
    return CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH,
        projection_dim=32,
        initializer_range=0.1,
    )


def llava_15_7b_config(tok: PreTrainedTokenizerFast, text_layers: int = 32) -> LlavaConfig:
    """LLaVA-1.5-7B's shapes (Llama-2-7B text model, CLIP ViT-L/14-336 tower: 576 image tokens)
    with the character vocabulary: for benchmarks at real shapes without downloading weights."""
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=4096, intermediate_size=11008, num_hidden_layers=text_layers,
        num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096, rms_norm_eps=1e-5,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=336, patch_size=14, projection_dim=768)
    return LlavaConfig(text_config=text, vision_config=vision, image_token_id=tok.convert_tokens_to_ids("<image>"),
                       vision_feature_layer=-2, vision_feature_select_strategy="default")


def build(name: str = "tiny-llava", seed: int = 0, device: str | None = None, text_layers: int | None = None):
    """Return (model, processor) of a random-weight model; same seed, same weights.

    `device` builds the weights there directly (the 7B-shaped model is only practical on a GPU).
    """
    tok = char_tokenizer()
    if name == RANDOM_7B:
        torch.manual_seed(seed)
        with torch.device(device or "cpu"):
            model = LlavaForConditionalGeneration(llava_15_7b_config(tok, text_layers or 32))
        crop = {"height": 336, "width": 336}
        processor = LlavaProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size=crop),
                                   tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                                   num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)
        model.generation_config.eos_token_id = tok.eos_token_id
        model.generation_config.pad_token_id = tok.pad_token_id
        return model.eval(), processor
    if name == ONEVISION:
        return _onevision(tok, seed)
    if name in QWEN:
        return _qwen(name, seed)
    image_token_id = tok.convert_tokens_to_ids("<image>")
    common = dict(
        text_config=_text_config(len(tok), tok),
        vision_config=_vision_config(),
        image_token_id=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    size = {"shortest_edge": IMAGE_SIZE}
    crop = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    torch.manual_seed(seed)
    if name == "tiny-llava":
        model = LlavaForConditionalGeneration(LlavaConfig(**common))
        image_processor = CLIPImageProcessorPil(size=size, crop_size=crop)
        processor_cls = LlavaProcessor
    elif name == "tiny-llava-next":
        pinpoints = [[IMAGE_SIZE, IMAGE_SIZE], [IMAGE_SIZE, 2 * IMAGE_SIZE], [2 * IMAGE_SIZE, IMAGE_SIZE]]
        model = LlavaNextForConditionalGeneration(LlavaNextConfig(**common, image_grid_pinpoints=pinpoints))
        image_processor = LlavaNextImageProcessorPil(size=size, crop_size=crop, image_grid_pinpoints=pinpoints)
        processor_cls = LlavaNextProcessor
    else:
        raise ValueError(f"unknown tiny model {name!r}; choose from {', '.join(ALL)}")
    processor = processor_cls(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.eval(), processor


CHATML_TEMPLATE = (  # LLaVA-OneVision's (Qwen2's) turn format, images first in the user turn
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Base tile 32 px; up to 3x3 tiles. "anyres_max_4" makes OneVision's pooling act on the tiny model:
# a 3x3-tile image (12x12 patches) is bilinearly pooled to fit 4 base tiles' worth of patches.
ONEVISION_PINPOINTS = [[IMAGE_SIZE * h, IMAGE_SIZE * w] for h, w in ((1, 1), (1, 2), (2, 1), (2, 2), (1, 3), (3, 1), (3, 3))]
ONEVISION_ASPECT = "anyres_max_4"


def _onevision(tok: PreTrainedTokenizerFast, seed: int):
    """LLaVA-OneVision at tiny shapes: SigLIP tower ("full" features, no CLS), Qwen2 text model
    with 4 query heads per KV head, ChatML turns ending in <|im_end|> (its EOS, as in the real model)."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, Qwen2Config, SiglipVisionConfig
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    from lvlm_hallu.lvlm.processors import images_only

    tok.add_tokens(["<|im_start|>", "<|im_end|>"], special_tokens=True)
    tok.eos_token = "<|im_end|>"
    text = Qwen2Config(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, initializer_range=0.1,
    )
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                image_size=IMAGE_SIZE, patch_size=PATCH, vision_use_head=False, initializer_range=0.1)
    config = LlavaOnevisionConfig(
        text_config=text, vision_config=vision, image_token_id=tok.convert_tokens_to_ids("<image>"),
        video_token_id=tok.unk_token_id, vision_feature_layer=-1, vision_feature_select_strategy="full",
        image_grid_pinpoints=ONEVISION_PINPOINTS, vision_aspect_ratio=ONEVISION_ASPECT,
    )
    torch.manual_seed(seed)
    model = LlavaOnevisionForConditionalGeneration(config)
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
                                                      image_grid_pinpoints=ONEVISION_PINPOINTS)
    processor = images_only("LlavaOnevisionProcessor")(
        image_processor=image_processor, tokenizer=tok, num_image_tokens=(IMAGE_SIZE // PATCH) ** 2,
        vision_feature_select_strategy="full", vision_aspect_ratio=ONEVISION_ASPECT, chat_template=CHATML_TEMPLATE,
    )
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.eval(), processor


# -- Qwen2-VL / Qwen2.5-VL (arXiv 2409.12191, 2502.13923) ----------------------------------------
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
QWEN_TEMPLATE = (  # Qwen2-VL's ChatML turns: an image is <|vision_start|><|image_pad|><|vision_end|>
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN_PATCH = 4  # 4-px patches, 2x2 merged: one image token per 8x8 pixels; a 32x48 image gives 4x6 tokens
QWEN_PIXELS = {"shortest_edge": 16 * 16, "longest_edge": 64 * 64}  # smart_resize bounds (min, max pixels)


def qwen_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer with Qwen2-VL's special tokens; EOS <|im_end|>, left padding."""
    vocab = {tok: i for i, tok in enumerate(QWEN_SPECIALS)}
    for ch in string.printable:
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.add_special_tokens(QWEN_SPECIALS)
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>", padding_side="left",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )


def _qwen(name: str, seed: int):
    """Qwen2-VL or Qwen2.5-VL at tiny shapes: 2-block vision tower (Qwen2.5-VL: windowed attention
    in block 0, full in block 1), 4-layer Qwen2 text model with 4 query heads per KV head and
    M-RoPE sections (2, 3, 3) of the 16-dim heads."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from lvlm_hallu.lvlm.adapters import ADAPTERS
    from lvlm_hallu.lvlm.processors import images_only

    tok = qwen_tokenizer()
    ids = {t: tok.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
                bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, initializer_range=0.1)
    common = dict(image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                  vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    vision = dict(depth=2, num_heads=4, patch_size=QWEN_PATCH, spatial_merge_size=2, temporal_patch_size=2,
                  initializer_range=0.1)
    torch.manual_seed(seed)
    if name == "tiny-qwen2-vl":
        from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

        config = Qwen2VLConfig(text_config=text, vision_config={**vision, "embed_dim": 32, "hidden_size": 64, "mlp_ratio": 2},
                               **common)
        model, family = Qwen2VLForConditionalGeneration(config), "qwen2_vl"
    else:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        # window 16 px = 2x2 merged tokens: a 32x32 image's 4x4 token grid splits into 4 windows
        vision = {**vision, "hidden_size": 32, "intermediate_size": 64, "out_hidden_size": 64,
                  "window_size": 16, "fullatt_block_indexes": [1]}
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **common)
        model, family = Qwen2_5_VLForConditionalGeneration(config), "qwen2_5_vl"
    image_processor = Qwen2VLImageProcessorPil(size=dict(QWEN_PIXELS), patch_size=QWEN_PATCH, temporal_patch_size=2,
                                               merge_size=2)
    processor_class = ADAPTERS[family].processor_class
    processor = images_only(processor_class)(image_processor=image_processor, tokenizer=tok, chat_template=QWEN_TEMPLATE)
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    return model.eval(), processor
