"""The Qwen-Image VAE's causal 3D convolutions as 2D convolutions when they see one frame.

The VAE is a video VAE: each of its encoder's 3x3x3 convolutions pads the time axis with two
frames of zeros in front (causality), so on an image (one frame) the first two temporal taps of
every kernel multiply zeros. diffusers runs them anyway: each convolution first copies its input
into a padded tensor three frames deep, then does three times the useful work. Measured on an
H200 at ~1 MP, the VAE encoded at 17% of the card's bf16 peak counting those FLOPs, the slowest of
the three encoders per sample (bench/prep_throughput.py).

With one frame and nothing cached from an earlier chunk, such a convolution equals a 2D
convolution of that frame with the kernel's last temporal slice (same spatial padding, stride and
bias): that is what runs here. Any other input (several frames, a cache) takes diffusers' path.
The latents equal diffusers' up to the order in which the convolution sums its terms (tested
against the pipelines).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F


def use_single_frame_convs(vae: torch.nn.Module) -> int:
    """Make the causal convolutions of `vae`'s encoder take the 2D path on one frame; returns how many do."""
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d

    count = 0
    for module in vae.encoder.modules():
        if isinstance(module, QwenImageCausalConv3d) and _last_tap_alone(module):
            module.forward = types.MethodType(_forward, module)
            count += 1
    return count


def _last_tap_alone(conv) -> bool:
    """Whether, on one frame with no cache, only the kernel's last temporal tap meets data: all the time
    padding in front (kernel - 1 frames), temporal stride and dilation 1."""
    time_padding = conv._padding[4:]  # (front, back), set by diffusers' QwenImageCausalConv3d
    return (
        time_padding == (conv.kernel_size[0] - 1, 0)
        and conv.stride[0] == 1
        and conv.dilation[0] == 1
        and conv.groups == 1
        and conv.padding_mode == "zeros"
    )


def _forward(self, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
    """x: [B, C, T, H, W] -> [B, C', T, H', W']; for T == 1 without cache, one 2D convolution."""
    if x.shape[2] != 1 or cache_x is not None:
        return type(self).forward(self, x, cache_x)
    width_pad, _, height_pad, _ = self._padding[:4]  # F.pad order: (W left, W right, H top, H bottom), symmetric
    frame = F.conv2d(x[:, :, 0], self.weight[:, :, -1], self.bias, self.stride[1:], (height_pad, width_pad))
    return frame.unsqueeze(2)  # [B, C', 1, H', W']
