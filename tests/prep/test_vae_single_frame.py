"""The VAE encoder's causal 3D convolutions, run as 2D convolutions on one frame, give diffusers' latents."""

import copy

import torch
from diffusers.models.autoencoders.autoencoder_kl_qwenimage import QwenImageCausalConv3d

from prep.vae_single_frame import use_single_frame_convs
from shared.models import load_vae


def test_one_frame_latents_equal_diffusers_3d_convolutions_with_the_3d_work_gone(tiny_models, monkeypatch):
    theirs = load_vae(str(tiny_models["edit-v1"]), torch.float32).eval()
    ours = copy.deepcopy(theirs)
    changed = use_single_frame_convs(ours)
    # every encoder convolution but the downsamplers' temporal ones (which never run on a first frame)
    causal = [m for m in ours.encoder.modules() if isinstance(m, QwenImageCausalConv3d)]
    assert changed == sum(m._padding[4] == m.kernel_size[0] - 1 for m in causal) > 0

    conv3d_calls = []
    real = torch.nn.Conv3d._conv_forward
    monkeypatch.setattr(torch.nn.Conv3d, "_conv_forward", lambda self, *a: conv3d_calls.append(1) or real(self, *a))
    pixels = torch.rand(2, 3, 1, 96, 64) * 2 - 1  # [B, 3, 1 frame, H, W]
    with torch.no_grad():
        expected = theirs.encode(pixels).latent_dist.mode()
        n_theirs = len(conv3d_calls)
        got = ours.encode(pixels).latent_dist.mode()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert len(conv3d_calls) - n_theirs == n_theirs - changed  # each changed convolution ran in 2D instead

    video = torch.rand(1, 3, 5, 32, 32) * 2 - 1  # several frames keep diffusers' path (and its cache)
    with torch.no_grad():
        torch.testing.assert_close(ours.encode(video).latent_dist.mode(), theirs.encode(video).latent_dist.mode())
