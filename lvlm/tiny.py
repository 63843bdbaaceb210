"""Tiny LLaVA-1.5 and LLaVA-NeXT models with RANDOM weights, built offline from configs.

They exist for tests and offline smoke runs: real architectures (`LlavaForConditionalGeneration`,
`LlavaNextForConditionalGeneration`: CLIP vision tower, projector, Llama with grouped-query
attention) at a few hundred thousand parameters, with a character-level tokenizer and PIL image
processors. Their text is gibberish by construction; the trained embedded model is "shapes".
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
RANDOM_7B = "random-llava-1.5-7b"  # benchmark model (GPU)
ALL = (*NAMES, RANDOM_7B)


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
