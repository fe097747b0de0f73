"""Validation previews inside the training process: the edit the LoRA makes now, on each eval sample.

Everything a preview needs was cached by prep (prompt and negative embeddings, reference latents at
the preview resolution), so this adds only the VAE decoder to the training process: no text
encoder, no VAE encoder. The sampler is the one of diffusers' `QwenImageEditPipeline` /
`QwenImageEditPlusPipeline`: the model's FlowMatchEulerDiscreteScheduler with the pipelines'
σ schedule (linspace(1, 1/n, n), shifted by μ for the image's token count), true CFG with the
pipelines' norm rescaling, and the same initial noise for the same seed (tests compare latents).
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from shared.vae_one_frame import use_one_frame_paths
from train.evaluation.eval_set import EvalSample
from train.packing import pack_latents, token_grid, unpack_latents


def timesteps_for(scheduler, steps: int, image_tokens: int, device) -> torch.Tensor:
    """The pipelines' timesteps [steps] (σ·1000) for `image_tokens` target tokens; sets up `scheduler`."""
    from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import calculate_shift

    config = scheduler.config
    mu = calculate_shift(
        image_tokens,
        config.get("base_image_seq_len", 256),
        config.get("max_image_seq_len", 4096),
        config.get("base_shift", 0.5),
        config.get("max_shift", 1.15),
    )
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device=device, mu=mu)
    scheduler.set_begin_index(0)
    return scheduler.timesteps


@torch.no_grad()
def sample_latents(
    transformer: torch.nn.Module,
    scheduler,
    sample: EvalSample,
    steps: int,
    guidance: float,
    seed: int,
    device: torch.device,
    dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Generate the edit of `sample`: its denoised target latents [C, H/8, W/8] (normalised, as cached).

    `guidance` > 1 runs true CFG against the cached negative embedding; the noise is drawn on the
    CPU from `seed` in `dtype`, as the pipelines' `randn_tensor` does with a CPU generator.
    """
    scheduler = copy.deepcopy(scheduler)  # its step index is state: each preview starts fresh
    channels, height, width = sample.target.shape
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn((1, 1, channels, height, width), generator=generator, dtype=dtype)
    latents = pack_latents(noise.view(1, channels, height, width)).to(device)  # [1, N, 4C]
    references = torch.cat([pack_latents(r[None].to(device, dtype)) for r in sample.references], dim=1)
    img_shapes = [[token_grid(height, width), *[token_grid(*r.shape[-2:]) for r in sample.references]]]
    prompt = sample.prompt[None].to(device, dtype)  # [1, L, D]
    negative = sample.negative[None].to(device, dtype)
    guided = guidance > 1

    def predict(embeds: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        out = transformer(
            hidden_states=torch.cat([latents, references], dim=1),
            timestep=timestep / 1000,
            encoder_hidden_states=embeds,
            encoder_hidden_states_mask=None,  # one unpadded prompt: every token is real
            img_shapes=img_shapes,
            return_dict=False,
        )[0]
        return out[:, : latents.shape[1]]  # the target tokens' velocity

    for t in timesteps_for(scheduler, steps, latents.shape[1], device):
        timestep = t.expand(1).to(dtype)
        velocity = predict(prompt, timestep)
        if guided:
            negative_velocity = predict(negative, timestep)
            combined = negative_velocity + guidance * (velocity - negative_velocity)
            # The pipelines rescale the guided prediction to the conditional one's norm, per token.
            velocity = combined * (velocity.norm(dim=-1, keepdim=True) / combined.norm(dim=-1, keepdim=True))
        latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
    return unpack_latents(latents, height, width)[0]


class Decoder:
    """The VAE decoder alone, turning normalised latents into RGB pixels as the pipelines do."""

    def __init__(self, vae, device: torch.device, dtype: torch.dtype = torch.bfloat16, tiled: bool = False):
        """`vae`: an AutoencoderKLQwenImage whose decoder and post_quant_conv are on `device` in `dtype`
        (`load_vae_decoder` leaves the rest, the encoder, without weights). `tiled` decodes in overlapping
        256-pixel tiles (diffusers' VAE tiling): a few GiB less at 1024², for the small-card memory modes."""
        self.vae = vae
        use_one_frame_paths(vae.decoder)  # a preview is one frame: 2D convolutions, a CPU-fast norm
        if tiled:
            vae.enable_tiling()
        self.device, self.dtype = device, dtype
        z = self.vae.config.z_dim
        self.mean = torch.tensor(self.vae.config.latents_mean).view(1, z, 1, 1, 1)
        self.std = torch.tensor(self.vae.config.latents_std).view(1, z, 1, 1, 1)

    @torch.no_grad()
    def __call__(self, latents: torch.Tensor) -> np.ndarray:
        """[C, h, w] normalised latents -> [8h, 8w, 3] uint8 RGB."""
        z = latents[None, :, None].float().cpu() * self.std + self.mean  # [1, C, 1, h, w] the VAE's own scale
        image = self.vae.decode(z.to(self.device, self.dtype), return_dict=False)[0][:, :, 0]  # [1, 3, H, W]
        image = ((image[0].float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
        return image.permute(1, 2, 0).cpu().numpy()
