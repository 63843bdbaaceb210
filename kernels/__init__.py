"""Attention kernels: the PyTorch reference (`kernels.reference`, CPU path and test oracle) and the
fused Triton kernels (`kernels.triton_attention`, CUDA path), both taking `AttentionEdits`.

`kernels.triton_attention` is not imported here so that importing the package never needs Triton.
"""

from lvlm_hallu.kernels.edits import KEY_DROP, KEY_SINK, KEY_VISUAL, AttentionEdits

__all__ = ["AttentionEdits", "KEY_DROP", "KEY_SINK", "KEY_VISUAL"]
