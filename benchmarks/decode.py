"""Decode-step cost vs position, and the engine's decode throughput vs transformers' `generate`.

Two measurements in one run, on one model:
1. Flatness: one request with one image (576 image tokens at LLaVA-1.5 shapes) decodes
   `--new-tokens` tokens (EOS ignored); every decode step is timed and the table gives the mean
   step time in windows around tokens 16, 128, 256 and 512, with the ratio to the first window.
   A KV cache that grows by `torch.cat` makes the step cost grow with the cache (O(n) copies per
   layer and step); the preallocated cache (lvlm/cache.py) keeps it flat up to attention's own
   O(n) term.
2. Throughput: decode tokens/s of `Pipeline.generate` and of transformers' `generate` on the same
   model object (same weights, same attention), greedy, EOS ignored, at batch 1 and 8: batch x
   (N - 1) tokens over the time from the first to the last token choice (prefill excluded).

    python benchmarks/decode.py                        # 576-image-token small model, CPU
    python benchmarks/decode.py --model random-llava-1.5-7b --text-layers 4 --device cuda --dtype float16

The default model ("small-576") has LLaVA-1.5's vision geometry (336 px, patch 14: 576 image
tokens) with a small random text model (`--width`, `--layers`), so a CPU run takes minutes.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lvlm_hallu import lvlm  # noqa: E402
from lvlm_hallu.lvlm.engine import Engine  # noqa: E402

WINDOWS = (16, 128, 256, 512)


def small_576(width: int, layers: int, device: str):
    """A LLaVA-1.5-geometry model (576 image tokens) with a small random text model."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from lvlm_hallu.kernels.dispatch import register
    from lvlm_hallu.lvlm import tiny
    from lvlm_hallu.lvlm.adapters import adapter_for
    from lvlm_hallu.lvlm.pipeline import Pipeline

    tok = tiny.char_tokenizer()
    heads = max(1, width // 64)
    text = LlamaConfig(vocab_size=len(tok), hidden_size=width, intermediate_size=int(2.75 * width),
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=4096, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                       pad_token_id=tok.pad_token_id)
    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                              image_size=336, patch_size=14, projection_dim=64)
    config = LlavaConfig(text_config=text, vision_config=vision, image_token_id=tok.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=-2, vision_feature_select_strategy="default")
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(config).eval()
    model.set_attn_implementation({"text_config": register(), "vision_config": "sdpa"})
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.pad_token_id = tok.pad_token_id
    crop = {"height": 336, "width": 336}
    processor = LlavaProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 336}, crop_size=crop),
                               tokenizer=tok, patch_size=14, vision_feature_select_strategy="default",
                               num_additional_image_tokens=1, chat_template=tiny.CHAT_TEMPLATE)
    model = model.to(device)
    return Pipeline(model, processor, adapter_for(model.config), f"small-576 (width {width}, {layers} layers)")


def machine(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    return f"{platform.processor() or platform.machine()} CPU, {torch.get_num_threads()} threads"


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def requests(n: int, new_tokens: int) -> list:
    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 255, (336, 336, 3), dtype=np.uint8)) for _ in range(n)]
    return [lvlm.Request("Please describe this image in detail.", im, max_new_tokens=new_tokens, ignore_eos=True)
            for im in images]


def step_times(pipe, new_tokens: int, device: str) -> list[float]:
    """Milliseconds of every decode step of one request."""
    times: list[float] = []
    original = Engine.decode_one_token

    def timed_step(self, tokens, state):
        sync(device)
        t0 = time.perf_counter()
        out = original(self, tokens, state)
        sync(device)
        times.append(1000.0 * (time.perf_counter() - t0))
        return out

    Engine.decode_one_token = timed_step
    try:
        pipe.generate(requests(1, new_tokens))
    finally:
        Engine.decode_one_token = original
    return times


def flatness(times: list[float], width: int = 16) -> dict[int, float]:
    """Mean time of the `width` decode steps that produce tokens t, t+1, ... for each window t the
    run reached (token 1 comes from the prefill, token t from decode step t - 1, index t - 2);
    the last window ends at the last step."""
    out = {}
    for t in WINDOWS:
        if t - 2 < len(times):
            start = max(0, min(t - 2, len(times) - width))
            out[t] = statistics.mean(times[start : start + width])
    return out


def throughput(pipe, batch: int, new_tokens: int, device: str, repeats: int) -> dict[str, float]:
    """Decode tokens/s of the engine and of transformers' generate: batch x (N - 1) tokens over the
    time from the first to the last token choice (prefill excluded, per-step overheads included:
    the engine's sampling, detokenization and stop checks; generate's logits processing)."""
    from transformers import LogitsProcessor, LogitsProcessorList

    from lvlm_hallu.lvlm.pipeline import RunningBatch

    reqs = requests(batch, new_tokens)
    inputs = pipe.prepare(reqs)
    marks: list[float] = []

    class Mark(LogitsProcessor):
        def __call__(self, input_ids, scores):
            sync(device)
            marks.append(time.perf_counter())
            return scores

    original = RunningBatch._advance

    def advance(self, rows, logits):
        original(self, rows, logits)
        sync(device)
        marks.append(time.perf_counter())

    def engine():
        RunningBatch._advance = advance
        try:
            pipe.generate(reqs)
        finally:
            RunningBatch._advance = original

    def hf():
        with torch.inference_mode():
            pipe.model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                logits_processor=LogitsProcessorList([Mark()]))

    rates = {}
    for name, fn in (("engine_tok_s", engine), ("generate_tok_s", hf)):
        best = 0.0
        for _ in range(repeats):
            marks.clear()
            fn()
            assert len(marks) == new_tokens, f"{name}: {len(marks)} token steps, expected {new_tokens}"
            best = max(best, batch * (new_tokens - 1) / (marks[-1] - marks[0]))
        rates[name] = best
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="small-576", help="small-576, or any lvlm.load name")
    ap.add_argument("--width", type=int, default=512, help="small-576: text hidden size")
    ap.add_argument("--layers", type=int, default=4, help="small-576: text layers")
    ap.add_argument("--text-layers", type=int, default=None, help="random-llava-1.5-7b: keep this many layers")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--new-tokens", type=int, default=512, help="flatness: tokens to decode")
    ap.add_argument("--throughput-tokens", type=int, default=32, help="throughput: tokens per request")
    ap.add_argument("--batches", default="1,8")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (1 on a shared, loaded machine: OpenMP spinning there costs 50x)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.model == "small-576":
        pipe = small_576(args.width, args.layers, args.device)
    else:
        pipe = lvlm.load(args.model, device=args.device, dtype=args.dtype, text_layers=args.text_layers)
    prompt_tokens = int(pipe.prepare(requests(1, 1))["attention_mask"].sum())
    print(f"machine: {machine(args.device)}; model {pipe.model_id}; prompt {prompt_tokens} tokens "
          f"({pipe.facts.vision_grid ** 2} image tokens); torch {torch.__version__}")

    step_times(pipe, 8, args.device)  # warm-up
    times = step_times(pipe, args.new_tokens, args.device)
    flat = flatness(times)
    first = flat[min(flat)]
    print("\ndecode step time by position (mean of 16 steps from token t)")
    for t, ms in flat.items():
        print(f"  token {t:>4}: {ms:7.2f} ms  ({ms / first:.2f}x token {min(flat)})")

    rows = {}
    print(f"\ndecode throughput, {args.throughput_tokens} tokens per request, EOS ignored (best of {args.repeats})")
    for b in (int(x) for x in args.batches.split(",")):
        rows[b] = throughput(pipe, b, args.throughput_tokens, args.device, args.repeats)
        r = rows[b]
        print(f"  batch {b}: engine {r['engine_tok_s']:8.1f} tok/s   transformers generate {r['generate_tok_s']:8.1f} tok/s"
              f"   ratio {r['engine_tok_s'] / r['generate_tok_s']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(args.device), "model": pipe.model_id,
                                         "prompt_tokens": prompt_tokens, "step_ms": times,
                                         "flatness_ms": flat, "throughput": rows}, indent=2))


if __name__ == "__main__":
    main()
