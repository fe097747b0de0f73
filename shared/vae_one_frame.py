"""The Qwen-Image VAE on one frame (an image), without the work that a video VAE spends on it.

Used on the encoder by `prep build-cache` (prep/encode.py) and on the decoder by training's previews
(train/evaluation/sampling.py). Two of diffusers' layers get a faster path; anything else takes theirs.

- **Causal 3D convolutions.** Each 3x3x3 convolution pads the time axis with two frames of zeros in
  front (causality), so on one frame the first two temporal taps of every kernel multiply zeros.
  diffusers runs them anyway: each convolution first copies its input into a padded tensor three
  frames deep, then does three times the useful work. Measured on an H200 at ~1 MP, the VAE encoded
  at 17% of the card's bf16 peak counting those FLOPs, the slowest of the three encoders per sample
  (bench/prep_throughput.py). With one frame and nothing cached from an earlier chunk, such a
  convolution equals a 2D convolution of that frame with the kernel's last temporal slice (same
  spatial padding, stride and bias): that is what runs here.
- **The channel RMS norm, on CPU.** `F.normalize` over the channel axis of [B, C, T, H, W] reduces
  over a strided axis, which PyTorch's CPU kernel does slowly: 122 ms for [1, 8, 1, 1024, 1024] on
  one core, against 35 ms for the same sum of squares written out (and 7 ms against 0.2 ms at 256²).
  It was a fifth of a 1024² encode or decode on CPU. On a GPU diffusers' path stays.

The results equal diffusers' up to the order in which a convolution or a norm sums its terms
(tests/shared/test_vae_one_frame.py, and the cache against the pipelines in tests/prep).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F


def use_one_frame_paths(module: torch.nn.Module) -> int:
    """Give the causal convolutions and RMS norms inside `module` (a VAE's `encoder` or `decoder`) the paths
    above; returns how many layers have one."""
    from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d, QwenImageRMS_norm

    count = 0
    for layer in module.modules():
        if isinstance(layer, QwenImageCausalConv3d) and _last_tap_alone(layer):
            layer.forward = types.MethodType(_conv_forward, layer)
            count += 1
        elif isinstance(layer, QwenImageRMS_norm):
            layer.forward = types.MethodType(_norm_forward, layer)
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


def _conv_forward(self, x: torch.Tensor, cache_x: torch.Tensor | None = None) -> torch.Tensor:
    """x: [B, C, T, H, W] -> [B, C', T, H', W']; for T == 1 without cache, one 2D convolution."""
    if x.shape[2] != 1 or cache_x is not None:
        return type(self).forward(self, x, cache_x)
    width_pad, _, height_pad, _ = self._padding[:4]  # F.pad order: (W left, W right, H top, H bottom), symmetric
    frame = F.conv2d(x[:, :, 0], self.weight[:, :, -1], self.bias, self.stride[1:], (height_pad, width_pad))
    return frame.unsqueeze(2)  # [B, C', 1, H', W']


def _norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    """x: [B, C, ...] (channel first) or [..., C] -> the same shape: diffusers' QwenImageRMS_norm, x / ‖x‖ over
    the channels (in float32 for any narrower input, as theirs), times √C, gamma (and bias)."""
    if x.device.type != "cpu":
        return type(self).forward(self, x)
    values = x if x.dtype in (torch.float32, torch.float64) else x.float()
    channels = 1 if self.channel_first else -1
    norm = values.square().sum(channels, keepdim=True).sqrt().clamp_min(1e-12)  # F.normalize's eps
    return (values / norm).to(x.dtype) * self.scale * self.gamma + self.bias
