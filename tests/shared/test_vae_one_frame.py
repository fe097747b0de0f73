"""The VAE's one-frame paths (2D convolutions, the CPU norm) give diffusers' latents and pixels without the 3D work."""

import copy

import torch
import torch.nn.functional as F
from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d, QwenImageRMS_norm

from shared.models import load_vae
from shared.vae_one_frame import use_one_frame_paths


def conv3d_calls(monkeypatch) -> list:
    calls = []
    real = torch.nn.Conv3d._conv_forward
    monkeypatch.setattr(torch.nn.Conv3d, "_conv_forward", lambda self, *a: calls.append(1) or real(self, *a))
    return calls


def changed_layers(module: torch.nn.Module) -> tuple[int, int]:
    """(causal convolutions whose time padding is all in front, RMS norms) in `module`."""
    causal = [m for m in module.modules() if isinstance(m, QwenImageCausalConv3d)]
    convs = sum(m._padding[4] == m.kernel_size[0] - 1 for m in causal)
    return convs, sum(isinstance(m, QwenImageRMS_norm) for m in module.modules())


def test_one_frame_latents_equal_diffusers_3d_convolutions_with_the_3d_work_gone(tiny_models, monkeypatch):
    theirs = load_vae(str(tiny_models["edit-v1"]), torch.float32).eval()
    ours = copy.deepcopy(theirs)
    changed = use_one_frame_paths(ours.encoder)
    # every encoder convolution but the downsamplers' temporal ones (which never run on a first frame), every norm
    convs, norms = changed_layers(ours.encoder)
    assert changed == convs + norms and convs > 0 and norms > 0

    calls = conv3d_calls(monkeypatch)
    pixels = torch.rand(2, 3, 1, 96, 64) * 2 - 1  # [B, 3, 1 frame, H, W]
    with torch.no_grad():
        expected = theirs.encode(pixels).latent_dist.mode()
        n_theirs = len(calls)
        got = ours.encode(pixels).latent_dist.mode()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert len(calls) - n_theirs == n_theirs - convs  # each changed convolution ran in 2D instead

    video = torch.rand(1, 3, 5, 32, 32) * 2 - 1  # several frames keep diffusers' path (and its cache)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(video).latent_dist.mode(), theirs.encode(video).latent_dist.mode())


def test_one_frame_decode_equals_diffusers_in_bf16_as_previews_decode(tiny_models, monkeypatch):
    theirs = load_vae(str(tiny_models["edit-v1"]), torch.bfloat16).eval()
    ours = copy.deepcopy(theirs)
    convs, norms = changed_layers(ours.decoder)
    assert use_one_frame_paths(ours.decoder) == convs + norms and convs > 0 and norms > 0

    calls = conv3d_calls(monkeypatch)
    latents = torch.randn(1, 16, 1, 12, 8, dtype=torch.bfloat16)  # [B, z, 1 frame, h, w]
    with torch.no_grad():
        expected = theirs.decode(latents).sample
        n_theirs = len(calls)
        got = ours.decode(latents).sample
    assert got.shape == expected.shape == (1, 3, 1, 96, 64)
    torch.testing.assert_close(got.float(), expected.float(), rtol=0, atol=2 / 127.5)  # within a pixel level or two
    assert n_theirs > 1 and len(calls) - n_theirs == 1  # only post_quant_conv, outside the decoder, ran in 3D


def test_the_cpu_norm_is_f_normalize_over_the_channels():
    norm = QwenImageRMS_norm(8, images=False)
    torch.nn.init.normal_(norm.gamma)
    assert use_one_frame_paths(torch.nn.Sequential(norm)) == 1
    x = torch.randn(2, 8, 1, 40, 24) * 3
    expected = F.normalize(x, dim=1) * 8**0.5 * norm.gamma
    torch.testing.assert_close(norm(x), expected, rtol=1e-6, atol=1e-6)
    # half precision is normalised in float32, as diffusers does; the result differs by rounding only
    x16 = x.bfloat16()
    expected16 = F.normalize(x16.float(), dim=1).bfloat16() * 8**0.5 * norm.gamma.bfloat16()
    assert (norm.to(torch.bfloat16)(x16) != expected16).float().mean() < 1e-3
    torch.testing.assert_close(norm(x16).float(), expected16.float(), rtol=1e-2, atol=1e-2)
