"""Build the shapes model from configs alone: LLaVA-1.5 architecture at toy scale.

- Tokenizer: byte-level BPE trained with `tokenizers` on the world's own text (captions,
  descriptions, questions, chat template words), so every word is one token and decoding is
  exact; special tokens <unk> <s> </s> <pad> <image>; wrapped as PreTrainedTokenizerFast with
  left padding (the engine batches left-padded rows).
- Processor: LlavaProcessor = CLIPImageProcessorPil (96 px, no torchvision needed) + tokenizer
  + the LLaVA-1.5 chat template "USER: <image>\\n{prompt} ASSISTANT:".
- Model: LlavaForConditionalGeneration with a small CLIPVisionConfig (96 px, patch 12 -> 8x8 = 64
  patches + CLS; the "default" strategy drops CLS, so 64 image tokens), the standard 2-layer GELU
  projector, and a small LlamaConfig decoder.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from lvlm_hallu.lvlm.shapes import text, world

SPECIAL_TOKENS = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]  # ids 0..4 in this order
UNK_ID, BOS_ID, EOS_ID, PAD_ID, IMAGE_ID = range(5)
PATCH = 12

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}</s>"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@dataclass(frozen=True)
class Preset:
    """Sizes of one model variant; `from_name` gives the named presets."""

    vision_hidden: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    text_hidden: int = 192
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 4
    text_ffn: int = 512
    vocab_size: int = 512
    max_positions: int = 256  # context: 64 image tokens + prompt + answer

    @classmethod
    def from_name(cls, name: str) -> "Preset":
        presets = {
            # 8 layers of 8 heads: deep and wide enough for attention sinks and vision-aware
            # heads to have room to form (docs/shapes-model.md, "Why this size").
            "default": cls(text_hidden=256, text_layers=8, text_heads=8, text_kv_heads=8, text_ffn=704),
            # The detailed world's model (docs/shapes-world.md): the default sizes, a context for
            # 64 image tokens, a prompt and a 120-word answer (~150 tokens), and room for the
            # detailed world's words.
            "detail": cls(text_hidden=256, text_layers=8, text_heads=8, text_kv_heads=8, text_ffn=704,
                          vocab_size=640, max_positions=384),
            # The first shipped model (4 layers, 192 wide): no sinks, VHR band covered every layer.
            "v1": cls(),
            # For tests: trains a few steps in seconds.
            "tiny": cls(vision_hidden=32, vision_layers=1, vision_heads=2, text_hidden=64,
                        text_layers=1, text_heads=2, text_kv_heads=2, text_ffn=128),
        }
        if name not in presets:
            raise KeyError(f"unknown preset {name!r}; valid: {', '.join(presets)}")
        return presets[name]


def prompt_text(prompt: str) -> str:
    """The chat-formatted prompt (identical to apply_chat_template with one image)."""
    return f"USER: <image>\n{prompt} ASSISTANT:"


WORLDS = ("basic", "detail")  # world.py, detail.py


def corpus(n_scenes: int = 3000, seed: int = 0, world_name: str = "basic") -> list[str]:
    """Text the tokenizer is trained on. <image> is cut out (it is a special token).

    world_name "detail": the detailed world's scenes, with their detailed descriptions and prompts
    besides the short ones."""
    if world_name not in WORLDS:
        raise KeyError(f"unknown world {world_name!r}; valid: {', '.join(WORLDS)}")
    from lvlm_hallu.lvlm.shapes import detail, detail_text

    rng = random.Random(seed)
    lines = ["USER: ", "ASSISTANT:", " Yes", " No", text.POPE_SUFFIX]
    prompts = text.DESCRIBE_PROMPTS if world_name == "basic" else detail_text.DETAIL_PROMPTS + detail_text.SHORT_PROMPTS
    lines += [f"\n{p} ASSISTANT:" for p in prompts]
    for kind in world.CATEGORIES:
        lines += [f"\n{text.question(kind)}{text.POPE_SUFFIX} ASSISTANT: Yes"]
    for i in range(n_scenes):
        scene, _ = world.make_scene("train", i) if world_name == "basic" else detail.make_scene("train", i)
        lines.append("ASSISTANT: " + text.model_caption(scene))
        lines += text.human_captions(scene, rng)
        if world_name == "detail":
            lines.append("ASSISTANT: " + detail_text.describe(scene))
    return lines


def build_tokenizer(vocab_size: int = 512, n_scenes: int = 3000, world_name: str = "basic") -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(corpus(n_scenes, world_name=world_name), trainer=trainer)
    # A BOS in front of every sequence, as Llama tokenizers do; the chat template adds none.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", BOS_ID)]
    )
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == list(range(5))
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", padding_side="left", model_max_length=512,
        extra_special_tokens={"image_token": "<image>"},
    )


def build_image_processor() -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(
        size={"shortest_edge": world.IMAGE_SIZE},
        crop_size={"height": world.IMAGE_SIZE, "width": world.IMAGE_SIZE},
    )


def build_processor(tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    return LlavaProcessor(
        image_processor=build_image_processor(), tokenizer=tokenizer, patch_size=PATCH,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=CHAT_TEMPLATE,
    )


def build_config(preset: Preset, vocab_size: int) -> LlavaConfig:
    vision = CLIPVisionConfig(
        hidden_size=preset.vision_hidden, intermediate_size=4 * preset.vision_hidden,
        num_hidden_layers=preset.vision_layers, num_attention_heads=preset.vision_heads,
        image_size=world.IMAGE_SIZE, patch_size=PATCH, projection_dim=preset.vision_hidden,
    )
    textcfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=preset.text_hidden, intermediate_size=preset.text_ffn,
        num_hidden_layers=preset.text_layers, num_attention_heads=preset.text_heads,
        num_key_value_heads=preset.text_kv_heads, max_position_embeddings=preset.max_positions,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=True,
    )
    n_tokens = (world.IMAGE_SIZE // PATCH) ** 2
    return LlavaConfig(
        vision_config=vision, text_config=textcfg, image_token_index=IMAGE_ID,
        image_seq_length=n_tokens, vision_feature_select_strategy="default",
        vision_feature_layer=-1, tie_word_embeddings=True,
    )


def build_model(preset: Preset, tokenizer: PreTrainedTokenizerFast) -> LlavaForConditionalGeneration:
    model = LlavaForConditionalGeneration(build_config(preset, len(tokenizer)))
    gen = model.generation_config
    gen.bos_token_id, gen.eos_token_id, gen.pad_token_id = BOS_ID, EOS_ID, PAD_ID
    gen.do_sample = False
    return model
