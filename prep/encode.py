"""The encoders: VAE latents and Qwen2.5-VL prompt embeddings, computed as the diffusers pipelines do.

`encode_pixels` = `_encode_vae_image` (posterior mode, normalised by the VAE's latents_mean/std);
`encode_vl` = `_get_qwen_prompt_embeds` (last hidden state, first 64 template tokens dropped, no
padding). The pixels and processor inputs come from `prep.sample_records.SamplePreparer`, which prepares
them as the pipelines do; `encode_prepared` runs a batch of them through the encoders (grouped by shape
and image layout). Tests check the cache against `QwenImageEditPipeline` / `QwenImageEditPlusPipeline`.
"""

from __future__ import annotations

import functools
from typing import TYPE_CHECKING

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from prep.vision_attention import use_grouped_window_attention
from shared.flavours import Flavour
from shared.models import load_processor, load_text_encoder, load_vae, vae_scale_factor
from shared.vae_one_frame import use_one_frame_paths

if TYPE_CHECKING:
    from prep.sample_records import Prepared

# Attention kernels for encoding: all but cuDNN's. cuDNN's attention builds a graph for each new input
# shape (a new caption length, a new bucket), and a cache build meets new shapes all along: on an H200
# that made the first build in a process 12% slower than the encoders' own speed (bench/prep_throughput.py,
# edit-v1 at 1 MP: efficiency 0.85; without it 0.96). The others start at once; the encoders alone are
# within 5% of their speed with cuDNN's.
ENCODER_ATTENTION = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def encoding(method):
    """Run an encoder method without autograd and with ENCODER_ATTENTION's kernels."""

    @functools.wraps(method)
    def wrapper(*args, **kwargs):
        with torch.no_grad(), sdpa_kernel(ENCODER_ATTENTION):
            return method(*args, **kwargs)

    return wrapper


def to_signed_unit(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1], bit for bit as diffusers' VaeImageProcessor computes them
    (`pil_to_numpy`: / 255 in float32; `normalize`: 2x - 1)."""
    if pixels.dtype != torch.uint8:
        raise TypeError(f"VAE pixels must be uint8 0..255 (SamplePreparer.vae_pixels), not {pixels.dtype}")
    # A divisor on the pixels' device, not a Python number: CUDA divides by a host scalar as a multiplication
    # by its reciprocal, one bit off for some values; a tensor divisor is a true division everywhere.
    divisor = torch.full((), 255.0, dtype=torch.float32, device=pixels.device)
    return 2.0 * (pixels.to(torch.float32) / divisor) - 1.0


class Encoders:
    """Holds the VAE encoder and the VL encoder of one model on one device."""

    def __init__(self, model_path: str, flavour: Flavour, device: str = "cpu", dtype=torch.bfloat16, modules=None):
        """Load the encoders of `model_path`; `modules` = (vae, text_encoder, processor) gives them instead."""
        self.flavour = flavour
        self.device = torch.device(device)
        self.dtype = dtype
        if modules is None:
            modules = (load_vae(model_path, dtype), load_text_encoder(model_path, dtype), load_processor(model_path))
        vae, text_encoder, self.processor = modules
        self.vae = vae.to(self.device).eval().requires_grad_(False)  # already in `dtype`
        self.text_encoder = text_encoder.to(self.device).eval().requires_grad_(False)
        use_grouped_window_attention(self.text_encoder)  # the vision tower's windows batched (same embeddings)
        use_one_frame_paths(self.vae.encoder)  # images are one frame: 2D convolutions, a CPU-fast norm
        self.scale = vae_scale_factor(self.vae)  # 8 for the real VAE
        z = self.vae.config.z_dim
        # On the device once: a copy per batch from pageable memory would stall the GPU each time.
        self.latents_mean = torch.tensor(self.vae.config.latents_mean, device=self.device).view(1, z, 1, 1, 1)
        self.latents_std = torch.tensor(self.vae.config.latents_std, device=self.device).view(1, z, 1, 1, 1)

    def to_device(self, *parts: torch.Tensor) -> torch.Tensor:
        """`torch.cat(parts)` on the encoders' device, copied without stalling the GPU.

        A copy from pageable memory waits for the GPU to drain its queue first, leaving it idle
        while the next batch is staged; concatenating straight into pinned memory (cached by
        torch's host allocator) lets the copy queue behind the work already running.
        """
        if self.device.type != "cuda":
            return torch.cat(parts)
        shape = (sum(p.shape[0] for p in parts), *parts[0].shape[1:])
        staged = torch.cat(parts, out=torch.empty(shape, dtype=parts[0].dtype, pin_memory=True))
        return staged.to(self.device, non_blocking=True)

    @encoding
    def encode_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        """uint8 [B, 3, 1, H, W] pixels -> normalised latents [B, C, H/s, W/s] (posterior mode)."""
        pixels = to_signed_unit(pixels.to(self.device)).to(self.dtype)  # callers stage them with `to_device`
        latents = self.vae.encode(pixels).latent_dist.mode()  # [B, C, 1, h, w]
        mean = self.latents_mean.to(latents.dtype)
        std = self.latents_std.to(latents.dtype)
        return ((latents - mean) / std)[:, :, 0]

    @encoding
    def encode_images(self, image_sets: list[dict[str, torch.Tensor]]) -> list[tuple[torch.Tensor, ...]]:
        """The vision tower, once per set of images, all sets in one call.

        image_sets: the processor's image outputs, each `pixel_values` [patches, F] and `image_grid_thw`
        [n_images, 3]. Returns per set its images' embeddings, each [tokens, D] (the merged patches the
        language model reads in place of the image pad tokens). Each image attends only within itself.
        """
        pixels = self.to_device(*[s["pixel_values"] for s in image_sets])
        grids = torch.cat([s["image_grid_thw"] for s in image_sets])
        per_image = self.text_encoder.get_image_features(pixels, grids.to(self.device), return_dict=True).pooler_output
        remaining = iter(per_image)
        return [tuple(next(remaining) for _ in range(len(s["image_grid_thw"]))) for s in image_sets]

    @encoding
    def encode_vl(
        self, texts: list[dict[str, torch.Tensor]], images: list[tuple[torch.Tensor, ...]], grids: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Tokenised instructions (each `input_ids`, `attention_mask` [1, T]) -> one embedding [L, D] each.

        `images[i]` holds the vision tower's embeddings of the images text i shows (`encode_images`) and
        `grids[i]` their `image_grid_thw`, so texts that share images (a caption, the empty caption, the
        negative) share one pass of the vision tower. Texts of different lengths are right-padded:
        attention is causal, so padding after the last token changes no real token's hidden state. L
        counts the tokens after the system prefix: image tokens, instruction and chat tail.
        """
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        longest = max(t["input_ids"].shape[1] for t in texts)
        pad_id = self.processor.tokenizer.pad_token_id or 0

        def right_pad(t: torch.Tensor, value: int) -> torch.Tensor:
            return torch.nn.functional.pad(t, (0, longest - t.shape[1]), value=value)

        input_ids = self.to_device(*[right_pad(t["input_ids"], pad_id) for t in texts])
        mask = [right_pad(t["attention_mask"], 0) for t in texts]
        lengths = torch.cat(mask).sum(dim=1).tolist()  # on the host: no GPU sync
        vision = BaseModelOutputWithPooling(pooler_output=tuple(e for per_text in images for e in per_text))
        hidden = self.text_encoder(
            input_ids=input_ids,
            attention_mask=self.to_device(*mask),
            image_grid_thw=torch.cat(grids).to(self.device),
            mm_encoder_outputs={"image": vision},  # the image pads' embeddings, in order over the batch
            output_hidden_states=True,
        ).hidden_states[-1]  # [B, T, D]
        # Right padding: each text's tokens are its first `length` positions.
        return [h[self.flavour.drop_tokens : n].to(self.dtype) for h, n in zip(hidden, lengths, strict=True)]


def encode_prepared(batch: list[Prepared], encoders: Encoders, max_batch: int = 4) -> list[tuple[list, list]]:
    """Encode prepared samples: VAE inputs grouped by shape; each VL image set through the vision tower
    once (sets grouped by layout); instructions through the language model grouped by layout (padded).

    Returns, per sample, (latents [target, refs...] each [C, h, w], embeds per instruction each [L, D]).
    """
    latents: dict[tuple[int, int], torch.Tensor] = {}  # (sample, image) -> [C, h, w]; image 0 is the target
    pixels = ((tuple(x.shape), (i, j)) for i, p in enumerate(batch) for j, x in enumerate(p.vae_pixels))
    for chunk in _grouped_chunks(pixels, max_batch):
        out = encoders.encode_pixels(encoders.to_device(*[batch[i].vae_pixels[j] for i, j in chunk]))
        latents.update({key: out[n] for n, key in enumerate(chunk)})

    images: dict[tuple[int, int], tuple[torch.Tensor, ...]] = {}  # (sample, image set) -> per-image embeddings
    sets = ((vl_layout(x), (i, k)) for i, p in enumerate(batch) for k, x in enumerate(p.vl_images))
    for chunk in _grouped_chunks(sets, max_batch):
        out = encoders.encode_images([batch[i].vl_images[k] for i, k in chunk])
        images.update({key: out[n] for n, key in enumerate(chunk)})

    embeds: dict[tuple[int, int], torch.Tensor] = {}  # (sample, instruction) -> [L, D]
    texts = (
        (vl_layout(p.vl_images[t["images"]]), (i, j)) for i, p in enumerate(batch) for j, t in enumerate(p.vl_texts)
    )
    for chunk in _grouped_chunks(texts, max_batch):
        shown = [(i, batch[i].vl_texts[j]["images"]) for i, j in chunk]  # the image set each text shows
        grids = [batch[i].vl_images[k]["image_grid_thw"] for i, k in shown]
        out = encoders.encode_vl([batch[i].vl_texts[j] for i, j in chunk], [images[key] for key in shown], grids)
        embeds.update({key: out[n] for n, key in enumerate(chunk)})
    return [
        ([latents[(i, j)] for j in range(len(p.vae_pixels))], [embeds[(i, j)] for j in range(len(p.vl_texts))])
        for i, p in enumerate(batch)
    ]


def vl_layout(images: dict[str, torch.Tensor]) -> tuple:
    """The image grids of one VL image set: sets (and the texts showing them) with equal layouts batch together."""
    return tuple(images["image_grid_thw"].flatten().tolist())


def _grouped_chunks(keyed, size: int) -> list[list]:
    """(group, key) pairs -> the keys of each group (a shape, an image layout) in chunks of at most `size`."""
    groups: dict = {}
    for group, key in keyed:
        groups.setdefault(group, []).append(key)
    return [chunk for keys in groups.values() for chunk in _chunks(keys, size)]


def _chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]
