"""One sample -> one cache record: decode, place (bucket, crop), encode, serialise.

The sizes follow the pipelines: the target at its bucket; a strict reference with exactly the
target's placement; the VL encoder sees each reference at the flavour's VL area; the VAE sees
each reference at the size `reference_vae_size` gives.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace

import numpy as np
import torch
from diffusers.image_processor import VaeImageProcessor
from PIL import Image

from prep.buckets import bucket_size, calculate_dimensions, crop_seed, plan_placement
from prep.encode import vl_layout
from prep.file_records import file_sha256
from prep.images import ImageError, load_rgb
from prep.scan import Sample
from shared.cache import DROPOUT, EMBEDS, LATENTS, META, CacheStore, Embeddings, Latents
from shared.cache.writer import TarRecord, tar_record
from shared.config import DatasetConfig
from shared.flavours import Flavour


def reference_vae_size(
    flavour: Flavour, cond: DatasetConfig, ref_size: tuple[int, int], target_size: tuple[int, int], match_target: bool
) -> tuple[int, int]:
    """(width, height) the VAE encodes a reference at.

    The Plus flavours: ~1 MP whatever the datasets' resolution (`QwenImageEditPlusPipeline` encodes every
    picture at VAE_IMAGE_SIZE, the Qwen edit guide's "1 MP packing"), or the target's size with
    match_target_res. edit-v1 strict: the target's bucket; edit-v1 loose: its own bucket at its
    dataset's resolution. A strict reference is cropped with its target's box either way.
    """
    if flavour.plus:
        if match_target:
            return target_size
        return calculate_dimensions(flavour.reference_vae_area, ref_size[0] / ref_size[1])
    if cond.conditioning_type == "reference_strict":
        return target_size
    return bucket_size(ref_size[0], ref_size[1], cond.resolution, cond.resolution_type)


@dataclass
class Prepared:
    """One sample made ready for the encoders on the CPU (in a DataLoader worker): pixels, VL inputs, metadata."""

    sample: Sample
    vae_pixels: list[torch.Tensor]  # target first, then each reference: uint8 [1, 3, 1, H, W] (see `vae_pixels`)
    # The image sets the VL encoder sees, each processed once (`pixel_values`, `image_grid_thw`): all the
    # references; or, for train samples whose references are cached alone, each reference alone.
    vl_images: list[dict[str, torch.Tensor]]
    # Tokenised instructions (`input_ids`, `attention_mask`, and `images`: the index of their image set):
    # per caption, then the eval negative or the train dropout ("", when the build caches it), for image
    # set 0, then set 1, ...; for a dropout record alone, only the dropout per image set.
    vl_texts: list[dict]
    meta: dict  # the record's <id>.json, without tensors
    row: dict  # the manifest columns that do not depend on the tensors
    # A sample whose main record is cached and which needs only its dropout record: that record's
    # embeddings member (its dropout is stored after the rows it shares with their `prompt.0`).
    cached_embeds: bytes | None = None

    @property
    def batch_key(self) -> tuple:
        """Samples with equal keys encode in one batch: same pixel shapes, same VL image layouts."""
        shapes = tuple(tuple(p.shape) for p in self.vae_pixels)
        return shapes + tuple(vl_layout(x) for x in self.vl_images)


@dataclass
class CachedEmbeds:
    """The embeddings members of cached samples that need only a dropout record added: where each lies."""

    store: CacheStore
    spans: dict[str, tuple[str, int, int]]  # sample id -> (shard, offset, size) of its embeddings member

    def read(self, sample_id: str) -> bytes:
        shard, offset, size = self.spans[sample_id]
        return self.store.read_range(shard, offset, offset + size)


class SamplePreparer:
    """Decode, place and preprocess samples exactly as the pipelines do, with no model: runs in workers.

    `dropout`: train samples also get the empty instruction (their dropout record). Samples in
    `dropout_only` get only that: no VAE input, one instruction per image set.
    """

    def __init__(
        self,
        flavour: Flavour,
        processor,
        vae_scale_factor: int,
        match_target: bool,
        crop_seed: int,
        preview: dict,
        references_alone: bool = False,
        dropout: bool = True,
        dropout_only: CachedEmbeds | None = None,
    ):
        self.flavour = flavour
        self.dropout = dropout
        self.dropout_only = dropout_only
        self.references_alone = references_alone  # train samples: embeddings per reference (random sampling)
        self.preview = preview  # TrainConfig.preview_settings: eval samples' negative instruction and resolution
        self.processor = processor
        self.image_processor = VaeImageProcessor(vae_scale_factor=vae_scale_factor * 2)
        self.match_target = match_target
        self.seed = crop_seed  # random crops only

    def vae_pixels(self, image: Image.Image, height: int, width: int) -> torch.Tensor:
        """The VAE's input for `image`: resized to (width, height) as the pipelines' VaeImageProcessor resizes it,
        uint8 [1, 3, 1, H, W] (one frame). `prep.encode.to_signed_unit` then scales it to [-1, 1] exactly as
        that processor does, on the encoders' device: a quarter of the float32 bytes for the workers to hand
        over and for the GPU copy."""
        array = np.asarray(self.image_processor.resize(image, height, width))  # [H, W, 3]: `load_rgb` gave RGB
        return torch.from_numpy(array.transpose(2, 0, 1).copy())[None, :, None]

    def vl_images(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        """The processor's image part, once per image set: `pixel_values` [patches, F], `image_grid_thw` [n, 3].
        (edit-v1's pipeline hands the processor one image, edit-v2's a list; the output is the same.)"""
        return dict(self.processor.image_processor(images=images, return_tensors="pt"))

    def vl_text(self, instruction: str, images: dict[str, torch.Tensor], index: int) -> dict:
        """The processor's text part for `instruction` shown image set `images` (number `index`): each image
        pad expanded to that image's token count, as the processor does, then tokenised."""
        pad = self.processor.image_token
        parts = self.flavour.vl_text(instruction, len(images["image_grid_thw"])).split(pad)
        expanded = parts[0] + "".join(
            self.processor.replace_image_token(images, image_idx=i) + part for i, part in enumerate(parts[1:])
        )
        tokens = self.processor.tokenizer([expanded], padding=True, return_tensors="pt")
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"], "images": index}

    def __call__(self, sample: Sample, main: DatasetConfig, conds: list[DatasetConfig]) -> Prepared:
        if sample.split == "eval" and self.preview["resolution"]:
            # Eval samples are previewed at validation_resolution: target and references sized for it.
            main = replace(main, resolution=self.preview["resolution"], resolution_type="pixel_area")
            conds = [replace(c, resolution=self.preview["resolution"], resolution_type="pixel_area") for c in conds]
        only_dropout = self.dropout_only is not None and sample.sample_id in self.dropout_only.spans
        source = load_rgb(sample.image, main.max_image_pixels)
        placement = plan_placement(*source.size, main, self.seed, sample.sample_id)
        width, height = placement.size
        pixels = [] if only_dropout else [self.vae_pixels(placement.apply(source), height, width)]

        ref_sizes, ref_boxes, vl_images, ref_meta = [], [], [], []
        for cond, path in zip(conds, sample.references, strict=True):
            reference = load_rgb(path, cond.max_image_pixels)
            original = reference.size
            box = None
            if cond.conditioning_type == "reference_strict":
                # Exactly the target's resize and crop, so reference pixels line up with target pixels.
                reference = placement.apply(reference)
                box = list(placement.box)
            # A loose reference is not cropped: like the pipelines, it is resized to its own size.
            vae_w, vae_h = reference_vae_size(self.flavour, cond, reference.size, (width, height), self.match_target)
            vl_w, vl_h = calculate_dimensions(self.flavour.vl_area, reference.width / reference.height)
            if not only_dropout:
                pixels.append(self.vae_pixels(reference, vae_h, vae_w))
            vl_images.append(self.image_processor.resize(reference, vl_h, vl_w))
            ref_sizes.append([vae_h, vae_w])
            ref_boxes.append(box or [])
            ref_meta.append(
                {
                    "dataset_id": cond.id,
                    "conditioning_type": cond.conditioning_type,
                    "original_size": list(original),
                    "scaled_size": list(placement.scaled) if box else None,
                    "crop_box": box,
                    "vae_size": [vae_w, vae_h],
                    "vl_size": [vl_w, vl_h],
                    "sha256": file_sha256(path),
                }
            )
        # Eval samples get the true-CFG negative of previews (validation_negative_prompt, with the
        # references, as the pipelines encode negative_prompt); train samples the empty instruction (with
        # their references) when caption dropout needs it.
        extra = [self.preview["negative_prompt"]] if sample.split == "eval" else [""] if self.dropout else []
        instructions = [""] if only_dropout else sample.captions + extra
        if self.references_alone and sample.split == "train":
            # conditioning_multidataset_sampling random: each reference alone, as a pipeline given only it encodes.
            image_sets = [self.vl_images([image]) for image in vl_images]
        else:
            image_sets = [self.vl_images(vl_images)]
        texts = [self.vl_text(text, images, k) for k, images in enumerate(image_sets) for text in instructions]

        hashes = [file_sha256(sample.image)] + [m["sha256"] for m in ref_meta]
        source_sha = source_sha256(sample, hashes, self.preview)
        meta = {
            "sample_id": sample.sample_id,
            "dataset_id": sample.dataset_id,
            "relpath": sample.relpath,
            "split": sample.split,
            "captions": sample.captions,
            "target": {
                "original_size": list(source.size),
                "scaled_size": list(placement.scaled),
                "crop_box": list(placement.box),
                "size": [width, height],
                "sha256": hashes[0],
                "crop_style": main.crop_style if main.crop else "center",
                "crop_seed": crop_seed(self.seed, sample.sample_id, main.id),
            },
            "references": ref_meta,
            "source_sha256": source_sha,
        }
        row = {
            "dataset_id": sample.dataset_id,
            "relpath": sample.relpath,
            "split": sample.split,
            "height": height,
            "width": width,
            "original_size": list(source.size),
            "crop_box": list(placement.box),
            "ref_sizes": ref_sizes,
            "ref_crop_boxes": ref_boxes,
            "captions": sample.captions,
            "source_sha256": source_sha,
        }
        cached = self.dropout_only.read(sample.sample_id) if only_dropout else None
        return Prepared(sample, pixels, image_sets, texts, meta, row, cached)


def to_record(
    prepared: Prepared, latents: list[torch.Tensor], embeds: list[torch.Tensor]
) -> tuple[dict | None, dict | None, tuple[bytes, dict] | None]:
    """The record members and manifest row of a sample, from its encodings (target latent first), and its
    dropout record: (member bytes, row) or None when none was encoded. For a sample that needed only its
    dropout record (`cached_embeds`): no members, no row, and that record.

    A dropout record's row names the embeddings member its rows are shared with (`embeds_sha256`): only
    joined to that one (`attach_dropout`), never to a re-encoding of the sample."""
    n_sets = len(prepared.vl_images)  # several: train samples whose references are cached alone
    per_set = len(embeds) // n_sets
    groups = [embeds[i : i + per_set] for i in range(0, len(embeds), per_set)]
    if prepared.cached_embeds is not None:  # each group is its dropout; it shares rows with the cached prompt.0
        cached = Embeddings.from_bytes(prepared.cached_embeds)
        firsts = [c.prompts[:1] for c in cached.alone] if cached.alone else [cached.prompts[:1]]
        subs = [Embeddings(first, dropout=group[0]) for first, group in zip(firsts, groups, strict=True)]
        typed = Embeddings([], alone=subs) if cached.alone else subs[0]
        return None, None, (typed.stored()[2], _dropout_row(prepared, prepared.cached_embeds))
    n_captions = len(prepared.sample.captions)
    extra = per_set > n_captions  # the eval negative, or the train dropout
    eval_sample = prepared.sample.split == "eval"
    if n_sets > 1:  # references alone: (captions, dropout) per reference
        subs = [Embeddings(g[:n_captions], dropout=g[n_captions] if extra else None) for g in groups]
        typed = Embeddings([], alone=subs)
        prompt_lens = [max(g[k].shape[0] for g in groups) for k in range(n_captions)]  # the longest per caption
    else:
        typed = Embeddings(
            embeds[:n_captions],
            dropout=embeds[n_captions] if extra and not eval_sample else None,
            negative=embeds[n_captions] if extra and eval_sample else None,
        )
        prompt_lens = [e.shape[0] for e in embeds[:n_captions]]
    embeds_bytes, embeds_form, dropout = typed.stored()
    members = {
        LATENTS: Latents(latents[0], latents[1:]).to_bytes(),
        EMBEDS: embeds_bytes,
        META: json.dumps(prepared.meta, sort_keys=True, ensure_ascii=False).encode(),
    }
    row = dict(prepared.row, prompt_lens=prompt_lens, embeds_form=embeds_form)
    return members, row, None if dropout is None else (dropout, _dropout_row(prepared, embeds_bytes))


@dataclass
class Unreadable:
    """A sample whose files could not be read when it came to be encoded (changed or gone since validation):
    it is left out of the cache and named, and the other samples go on."""

    sample: Sample
    reason: str  # names the file and what is wrong with it


def prepare_or_skip(
    preparer: SamplePreparer, sample: Sample, main: DatasetConfig, conds: list[DatasetConfig]
) -> Prepared | Unreadable:
    """`preparer(sample, ...)`, or what made one of its files unreadable."""
    try:
        return preparer(sample, main, conds)
    except ImageError as err:  # decode_image's message names the file and what to do
        return Unreadable(sample, str(err))
    except OSError as err:  # gone, or no longer readable
        return Unreadable(sample, f"{err.filename or sample.image}: {err.strerror or err}")


@dataclass
class BuiltRecords:
    """A sample's records ready for the shards: (record, manifest row) of its main record and of its dropout
    record, each None where the sample has none (see `to_record`)."""

    main: tuple[TarRecord, dict] | None
    dropout: tuple[TarRecord, dict] | None


def build_records(prepared: Prepared, latents: list[torch.Tensor], embeds: list[torch.Tensor]) -> BuiltRecords:
    """`to_record`'s members framed and hashed as tar records (`tar_record`): all the work of writing a record
    but appending it to a shard."""
    members, row, dropout = to_record(prepared, latents, embeds)
    key = prepared.sample.sample_id
    return BuiltRecords(
        None if members is None else (tar_record(key, members), row),
        None if dropout is None else (tar_record(key, {DROPOUT: dropout[0]}), dropout[1]),
    )


def _dropout_row(prepared: Prepared, embeds_member: bytes) -> dict:
    return {"source_sha256": prepared.row["source_sha256"], "embeds_sha256": hashlib.sha256(embeds_member).digest()}


def source_sha256(sample: Sample, file_hashes: list[str] | None, preview: dict) -> str:
    """Hash of everything a record is made from: the image, its references, its captions and split (and, for
    eval samples, the preview settings: so changing them re-encodes the eval samples only)."""
    hashes = file_hashes or [file_sha256(p) for p in [sample.image, *sample.references]]
    parts = [hashes, sample.captions, sample.split]
    if sample.split == "eval":
        parts.append(preview)
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
