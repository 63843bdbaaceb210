"""Attention speed: the fused Triton kernels (no flag, each flag, all flags) against torch SDPA
and an eager implementation (the PyTorch reference computed in the inputs' dtype: fp16 on the
GPU, not the fp32 oracle), side by side in one run.

GPU (default): LLaVA-1.5-7B attention shapes (32 heads, head_dim 128, fp16). Prefill over
N = 600 ... 2900 prompt tokens reports TFLOP/s (causal: 2·2·B·H·D·N²/2 FLOPs); decode over
contexts of 600 ... 4k reports the share of the GPU's peak HBM bandwidth used to read K and V.
Ratios are speed ratios (time of the other path / time of Triton).
Targets: prefill all flags >= 0.9x SDPA-flash and >= 3x eager; decode all flags >= 0.95x SDPA.

    python benchmarks/attention.py                 # GPU table
    python benchmarks/attention.py --quick         # GPU: the shapes `make gpu-check` runs
    python benchmarks/attention.py --cpu-small     # CPU: tiny shapes, SDPA vs reference
    python benchmarks/attention.py --cpu-small --interpret   # ... plus Triton on the interpreter
    python benchmarks/attention.py --sm90-resources  # compile for H100 offline: registers, spills
    python benchmarks/attention.py --host-overhead   # host cost per call, launches stubbed (CPU)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if "--interpret" in sys.argv:
    os.environ["TRITON_INTERPRET"] = "1"  # must precede the kernels' definition

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lvlm_hallu.kernels import reference  # noqa: E402
from lvlm_hallu.kernels.edits import KEY_DROP, KEY_SINK, KEY_VISUAL, AttentionEdits  # noqa: E402

# Peak HBM bandwidth in TB/s by a substring of torch.cuda.get_device_name().
PEAK_TBPS = {"H200": 4.8, "H100 SXM": 3.35, "H100 80GB HBM3": 3.35, "H100 PCIe": 2.0, "H100": 3.35,
             "A100-SXM4-80GB": 2.04, "A100": 1.56, "L40S": 0.864, "RTX 4090": 1.01}
FLAG_SETS = {
    "plain": (),
    "head_scale": ("head_scale",),
    "logit_boost": ("logit_boost",),
    "sink_redist": ("sink_redist",),
    "key_drop": ("key_drop",),
    "readout": ("readout",),
    "all": ("head_scale", "logit_boost", "sink_redist", "key_drop", "readout"),
}
IMAGE_START, IMAGE_TOKENS = 35, 576  # LLaVA-1.5 prompt: system text, then 576 image tokens


def llava_edits(flags, B, H, Tk, device) -> AttentionEdits | None:
    """Per-row edits like the interventions' defaults: VHR alpha 2 on half the heads, PAI
    alpha 0.2, VAR p 0.4 / rho 0.5 with BOS and 4 visual sinks, one dropped text key."""
    if not flags:
        return None
    n_img = min(IMAGE_TOKENS, max(Tk - IMAGE_START - 2, 1))
    key_class = torch.zeros(B, Tk, dtype=torch.uint8, device=device)
    key_class[:, IMAGE_START : IMAGE_START + n_img] = KEY_VISUAL
    key_class[:, 0] = KEY_SINK
    key_class[:, IMAGE_START + torch.arange(4, device=device) * (n_img // 4)] |= KEY_SINK
    key_class[:, min(IMAGE_START + n_img + 1, Tk - 1)] |= KEY_DROP
    fields = dict(key_class=key_class)
    if "head_scale" in flags:
        fields["head_scale"] = torch.where(torch.arange(H, device=device) % 2 == 0, 2.0, 1.0).repeat(B, 1)
    if "logit_boost" in flags:
        fields["boost_alpha"] = torch.full((B, H), 0.2, device=device)
    if "sink_redist" in flags:
        fields.update(
            sink_p=torch.full((B, H), 0.4, device=device),
            sink_rho=torch.full((B,), 0.5, device=device),
            sink_min_visual=torch.full((B,), 0.2, device=device),
            sink_query_start=torch.full((B,), IMAGE_START + n_img, dtype=torch.int32, device=device),
        )
    fields["key_drop"] = "key_drop" in flags
    fields["readout"] = "readout" in flags
    return AttentionEdits(**fields)


def bench(fn, device) -> float:
    """Milliseconds per call: triton.testing.do_bench (mean) on the GPU; on the CPU the minimum
    over >= 10 calls and >= 0.3 s, which is the figure least disturbed by other processes."""
    if device.type == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=25, rep=100)
    fn()
    times, start = [], time.perf_counter()
    while len(times) < 10 or time.perf_counter() - start < 0.3:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * min(times)


def sdpa(q, k, v, causal, device):
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal)


def run(shapes, device, dtype, with_triton, variants, decode):
    kernels = None
    if with_triton:
        from lvlm_hallu.kernels import triton_attention as kernels
    peak = next((tbps for name, tbps in PEAK_TBPS.items() if device.type == "cuda" and name in torch.cuda.get_device_name()), None)
    unit = "%HBM" if decode else "TFLOP/s"
    print(f"\n{'decode' if decode else 'prefill'}  {dtype}  {device}"
          f"{'  ' + torch.cuda.get_device_name() if device.type == 'cuda' else ''}")
    print(f"{'B':>3} {'H':>3} {'D':>4} {'N':>5}  {'path':<20} {'ms':>9} {unit:>8} {'xSDPA':>6} {'xeager':>7}")
    for B, H, D, N in shapes:
        Tq = 1 if decode else N
        g = torch.Generator(device=device).manual_seed(0)
        q = torch.randn(B, H, Tq, D, device=device, dtype=dtype, generator=g)
        k = torch.randn(B, H, N, D, device=device, dtype=dtype, generator=g)
        v = torch.randn(B, H, N, D, device=device, dtype=dtype, generator=g)
        kv_start = torch.zeros(B, dtype=torch.int32, device=device)
        scale = D**-0.5
        flops = 4 * B * H * D * N * N / 2
        kv_bytes = 2 * B * H * N * D * q.element_size()

        def metric(ms):
            if decode:
                return f"{100 * kv_bytes / (ms * 1e-3) / (peak * 1e12):8.1f}" if peak else f"{'-':>8}"
            return f"{flops / (ms * 1e-3) / 1e12:8.2f}"

        t_sdpa = bench(lambda: sdpa(q, k, v, not decode, device), device)
        rows = [("sdpa", t_sdpa)]
        eager = {}
        for name in variants:
            e = llava_edits(FLAG_SETS[name], B, H, N, device)
            eager[name] = bench(lambda: reference.attention(q, k, v, kv_start, scale=scale, edits=e,
                                                            compute_dtype=dtype), device)
            rows.append((f"eager {name}", eager[name]))
            if kernels is not None:
                t = bench(lambda: kernels.attention(q, k, v, kv_start, scale=scale, edits=e), device)
                rows.append((f"triton {name}", t))
        for path, ms in rows:
            variant = path.split(" ", 1)[-1]
            vs_eager = f"{eager[variant] / ms:7.2f}" if path.startswith("triton") else f"{'-':>7}"
            print(f"{B:>3} {H:>3} {D:>4} {N:>5}  {path:<20} {ms:9.3f} {metric(ms)} {t_sdpa / ms:6.2f} {vs_eager}")
        del q, k, v


def sm90_resources():
    """Compile every kernel variant for sm_90 without a GPU and print registers / spill stack per
    thread, whether the tensor-core dots became wgmma, and the shared memory per program."""
    import subprocess
    import tempfile

    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from lvlm_hallu.kernels import triton_attention as ta

    cuobjdump = Path(triton.__file__).parent / "backends/nvidia/bin/cuobjdump"
    D = 128
    flags = dict(USE_HEAD_SCALE=True, USE_LOGIT_BOOST=True, USE_SINK_REDIST=True, USE_KEY_DROP=True, USE_READOUT=True)
    none = dict.fromkeys(flags, False)
    main, var = ta._PREFILL_TILES[D], ta._PREFILL_TILES_REDIST[D]
    prefill = dict(HEAD_DIM=D, SINK_BLOCK_M=var[0], UPCAST=False, DOT_PRECISION="tf32")
    decode = dict(HEAD_DIM=D, BLOCK_N=ta._DECODE_BLOCK_N[D], GROUP_PAD=1)
    cases = [  # (label, kernel, constexprs, warps, stages)
        ("prefill plain", ta._attn_prefill_kernel,
         dict(prefill, **none, BLOCK_M=main[0], BLOCK_N=main[1], SKIP_SINK_ROWS=False, SPLIT_KV=False), *main[2:]),
        ("prefill all, rows w/o VAR", ta._attn_prefill_kernel,
         dict(prefill, **flags, BLOCK_M=main[0], BLOCK_N=main[1], SKIP_SINK_ROWS=True, SPLIT_KV=False)
         | dict(USE_SINK_REDIST=False), *main[2:]),
        ("prefill all, VAR rows", ta._attn_prefill_kernel,
         dict(prefill, **flags, BLOCK_M=var[0], BLOCK_N=var[1], SKIP_SINK_ROWS=False, SPLIT_KV=False), *var[2:]),
        ("prefill all, VAR rows split", ta._attn_prefill_kernel,
         dict(prefill, **flags, BLOCK_M=var[0], BLOCK_N=var[1], SKIP_SINK_ROWS=False, SPLIT_KV=True), *var[2:]),
        ("decode all, one split", ta._attn_decode_kernel, dict(decode, **flags, DIRECT=True), ta._DECODE_WARPS, 3),
        ("decode all, split", ta._attn_decode_kernel, dict(decode, **flags, DIRECT=False), ta._DECODE_WARPS, 3),
        ("reduce all", ta._attn_reduce_kernel,
         dict(HEAD_DIM=D, BLOCK_S=16, SINK_BLOCK_M=var[0], USE_HEAD_SCALE=True, USE_SINK_REDIST=True,
              USE_READOUT=True, SINK_ROWS_ONLY=True), 4, 3),
        ("readout", ta._readout_kernel,
         dict(HEAD_DIM=D, BLOCK_N=ta._READOUT_BLOCK_N, USE_LOGIT_BOOST=True, USE_KEY_DROP=True), 4, 3),
    ]
    ints = {"H", "HKV", "GROUP", "Tq", "Tk", "ROW_BASE", "R", "NUM_SPLITS", "PARTS", "keys_per_split"}
    pointers = dict(Q="*fp16", K="*fp16", V="*fp16", O="*fp16", KvStart="*i32", SinkQueryStart="*i32", KeyClass="*u8")
    print(f"offline sm_90 compile, Triton {triton.__version__}, head_dim {D}, fp16")
    for label, fn, consts, warps, stages in cases:
        consts = dict(consts)
        consts.update({n: 1 for n in fn.arg_names if n.startswith("stride_") and n.endswith("d")})  # contiguous D
        sig = {}
        for n in fn.arg_names:
            if n in consts:
                sig[n] = "constexpr"
            elif n == "qk_scale":
                sig[n] = "fp32"
            elif n in ints or n.startswith("stride_"):
                sig[n] = "i32"
            else:
                sig[n] = pointers.get(n, "*fp32")
        aligned = [n for n in fn.arg_names if sig[n].startswith("*") or (n.startswith("stride_") and sig[n] == "i32")]
        attrs = {(fn.arg_names.index(n),): [["tt.divisibility", 16]] for n in aligned}
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, num_stages=stages))
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(k.asm["cubin"])
            f.flush()
            usage = subprocess.run([str(cuobjdump), "-res-usage", f.name], capture_output=True, text=True).stdout
        line = next((s.strip() for s in usage.splitlines() if "REG:" in s), usage.strip())
        fields = dict(item.split(":") for item in line.split() if ":" in item)
        tile = f"tile {consts['BLOCK_M']}x{consts['BLOCK_N']}" if "BLOCK_M" in consts else "row kernel"
        print(f"{label:<28} {tile:<13} warps {warps} stages {stages}: registers {fields.get('REG')}, "
              f"spill stack {fields.get('STACK')} B, wgmma {'wgmma.mma_async' in k.asm['ptx']}, "
              f"shared {k.metadata.shared} B")


class _NoLaunch:
    """Stands in for a @triton.jit kernel: `kernel[grid](...)` does nothing."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def host_overhead(calls: int = 3000, sms: int = 132):
    """Host cost of one attention call with edits, with the kernel launches stubbed (so it runs
    on a CPU and measures our Python only: argument checks, parameter conversion, split choice,
    allocations, the dispatcher's layout handling). LLaVA-1.5-7B shapes, fp16 tensors on the CPU,
    the split choice of an H100 (`sms` SMs). Prints the median microseconds per call."""
    import types

    from lvlm_hallu.kernels import dispatch
    from lvlm_hallu.kernels import triton_attention as ta

    for name in ("_attn_prefill_kernel", "_attn_decode_kernel", "_attn_reduce_kernel", "_readout_kernel"):
        setattr(ta, name, _NoLaunch())
    ta._sms = lambda device: sms
    B, H, D, N = 1, 32, 128, 621

    class Ctx:  # the engine's AttentionContext, reduced to handing over prebuilt edits
        def __init__(self, edits, kv_start):
            self._edits, self._kv_start = edits, kv_start

        def edits(self, layer):
            return self._edits

        def kv_start(self, layer):
            return self._kv_start

        def key_layout(self, layer):
            return "causal"

        def after_attention(self, layer, out, readout):
            return out

    module = types.SimpleNamespace(layer_idx=0, num_key_value_groups=1, is_causal=True, training=False)
    dispatch.backend_for.cache_clear()
    dispatch.backend_for = lambda device_type: "triton"  # the CUDA path, on CPU tensors
    print(f"host cost per attention call, launches stubbed, B={B} H={H} D={D}, fp16, split choice for {sms} SMs "
          f"(best of {calls // 100} batches of 100 calls; target <= 25 us for the dispatcher call with edits)")
    print(f"{'phase':<8} {'flags':<12} {'kernels us':>11} {'dispatch us':>12}")
    for phase, tq, tk in (("prefill", N, N), ("decode", 1, N + 1)):
        # the layer's q is a transposed view of (B, Tq, H, D), as transformers passes it
        q = torch.randn(B, tq, H, D, dtype=torch.float16).transpose(1, 2)
        k = torch.randn(B, H, tk, D, dtype=torch.float16)
        v = torch.randn(B, H, tk, D, dtype=torch.float16)
        kv_start = torch.zeros(B, dtype=torch.int32)
        for name in ("plain", "all"):
            e = llava_edits(FLAG_SETS[name], B, H, tk, torch.device("cpu"))
            ctx = Ctx(e, kv_start)

            def kernels_call():
                ta.attention(q, k, v, kv_start, scale=D**-0.5, edits=e)

            def dispatch_call():
                dispatch.lvlm_attention(module, q, k, v, None, scaling=D**-0.5, lvlm_ctx=ctx)

            row = []
            for fn in (kernels_call, dispatch_call):
                if name == "plain" and fn is dispatch_call:
                    row.append(float("nan"))  # no edits: the dispatcher calls SDPA, not the kernels
                    continue
                for _ in range(50):
                    fn()
                per = []
                for _ in range(calls // 100):
                    t = time.perf_counter()
                    for _ in range(100):
                        fn()
                    per.append((time.perf_counter() - t) / 100 * 1e6)
                row.append(min(per))  # the least disturbed batch (a shared CPU)
            print(f"{phase:<8} {name:<12} {row[0]:11.1f} {row[1]:12.1f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu-small", action="store_true", help="tiny shapes on the CPU (no GPU needed)")
    ap.add_argument("--interpret", action="store_true", help="with --cpu-small: also Triton on the interpreter")
    ap.add_argument("--sm90-resources", action="store_true", help="offline sm_90 compile: registers, spills")
    ap.add_argument("--only", choices=["prefill", "decode"], help="run one of the two tables")
    ap.add_argument("--quick", action="store_true",
                    help="GPU: fewer shapes (batch 1 and 8; 600, 2048, 2900 keys), plain / each flag / all")
    ap.add_argument("--host-overhead", action="store_true",
                    help="host cost per call with the launches stubbed (CPU is enough)")
    args = ap.parse_args()
    if args.host_overhead:
        return host_overhead()
    if args.sm90_resources:
        return sm90_resources()
    if args.cpu_small or not torch.cuda.is_available():
        device, dtype = torch.device("cpu"), torch.float32
        torch.set_num_threads(1)  # steadier on a shared machine; both paths get the same thread
        print(f"CPU: {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
        if args.interpret:  # interpreter timings are not speeds: one tiny shape to show it runs
            prefill, decode, variants = [(1, 2, 16, 64)], [(1, 2, 16, 256)], ["plain", "all"]
        else:
            prefill = [(1, 8, 64, 128), (1, 8, 64, 256), (2, 8, 64, 512)]
            decode = [(1, 8, 64, 600), (8, 8, 64, 600), (8, 8, 64, 2048)]
            variants = list(FLAG_SETS)
        with_triton = args.interpret
    else:
        device, dtype = torch.device("cuda"), torch.float16
        prefill = [(B, 32, 128, N) for N in (600, 1200, 2400, 2900) for B in (1, 4, 8)]
        decode = [(B, 32, 128, N) for N in (600, 1200, 2400, 4096) for B in (1, 8, 64)]
        variants, with_triton = list(FLAG_SETS), True
        if args.quick:
            prefill = [(1, 32, 128, 600), (1, 32, 128, 2048), (8, 32, 128, 2048), (1, 32, 128, 2900)]
            decode = [(1, 32, 128, 600), (1, 32, 128, 2900), (8, 32, 128, 2048), (64, 32, 128, 600)]
    if args.only != "decode":
        run(prefill, device, dtype, with_triton, variants, decode=False)
    if args.only != "prefill":
        run(decode, device, dtype, with_triton, variants, decode=True)


if __name__ == "__main__":
    main()
