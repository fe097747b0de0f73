"""A fixture builder: one edit-v2 project holding every kind of bad input users bring.

`write_bad_project(root)` returns (config.json path, {case name: the file the report must name}).
Datasets: main `edits` (images/, textfile captions, minimum_image_size 48, a pixel limit),
`reference` (strict, same relative path) and `style` (loose, `"match": "stem"`: style/<stem>.jpg),
plus a second main dataset `empty-set` whose folders hold no images.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

MAX_PIXELS = 300 * 300


def _rgb(width: int, height: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8))


def _jpeg_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def write_bad_project(root: Path, model: str = "unused") -> tuple[Path, dict[str, Path]]:
    images, reference, style = root / "images", root / "reference", root / "style"
    for folder in (images, reference, style, root / "empty" / "images", root / "empty" / "reference"):
        folder.mkdir(parents=True, exist_ok=True)
    cases: dict[str, Path] = {}

    def pair(relpath: str, size=(96, 64), caption: str | None = "make it red", ref: bool = True, seed: int = 0):
        """A good pair at `relpath` (target, strict reference, stem-matched style, caption) unless told otherwise."""
        target = images / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        _rgb(*size, seed).save(target)
        if ref:
            (reference / relpath).parent.mkdir(parents=True, exist_ok=True)
            _rgb(*size, seed + 1).save(reference / relpath)
        style_file = (style / relpath).with_suffix(".jpg")
        style_file.parent.mkdir(parents=True, exist_ok=True)
        _rgb(48, 48, seed + 2).save(style_file)
        if caption is not None:
            target.with_suffix(".txt").write_text(caption + "\n", encoding="utf-8")
        return target

    pair("good.png")
    cases["missing reference"] = pair("missing_ref.png", ref=False)
    _rgb(96, 64, 5).save(reference / "orphan.png")
    cases["extra reference"] = reference / "orphan.png"
    cases["empty folder"] = root / "empty" / "images"

    cases["truncated JPEG"] = pair("truncated.jpg")
    data = _jpeg_bytes(_rgb(96, 64, 7))
    cases["truncated JPEG"].write_bytes(data[: len(data) // 2])

    cases["zero-byte file"] = pair("zero.png")
    cases["zero-byte file"].write_bytes(b"")

    cases["CMYK JPEG"] = pair("cmyk.jpg")
    _rgb(96, 64, 8).convert("CMYK").save(cases["CMYK JPEG"], format="JPEG")

    cases["16-bit PNG"] = pair("deep.png")
    deep = (np.random.default_rng(9).integers(0, 65535, (64, 96))).astype(np.uint16)
    Image.fromarray(deep, mode="I;16").save(cases["16-bit PNG"])

    cases["RGBA PNG"] = pair("alpha.png")
    rgba = _rgb(96, 64, 10).convert("RGBA")
    rgba.putalpha(128)
    rgba.save(cases["RGBA PNG"])

    # Stored 96x64 with EXIF orientation 6 (rotate 90°): upright it is 64x96, like its reference.
    cases["EXIF-rotated photo"] = pair("rotated.jpg", size=(64, 96))
    stored = _rgb(96, 64, 11)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored.save(cases["EXIF-rotated photo"], format="JPEG", exif=exif.tobytes())

    cases["BOM+CRLF caption"] = pair("bom.png", caption=None)
    cases["BOM+CRLF caption"].with_suffix(".txt").write_bytes("\ufeffmake the sky red\r\n".encode())
    cases["multi-line caption"] = pair("multi.png", caption="first instruction\n\nsecond instruction")
    cases["missing caption"] = pair("nocap.png", caption=None)
    cases["nested and unicode path"] = pair("sub/dir/ünïcode 猫.png")

    cases["stem collision"] = pair("collide.png")
    _rgb(48, 48, 12).save(style / "collide.png")  # beside style/collide.jpg: two files, one stem

    cases["strict aspect mismatch"] = pair("aspect.png")
    _rgb(64, 64, 13).save(reference / "aspect.png")
    cases["below minimum size"] = pair("tiny.png", size=(32, 32))
    cases["over the pixel limit"] = pair("huge.png", size=(400, 400))
    cases["case-only name difference"] = pair("Case.png", ref=False)
    _rgb(96, 64, 14).save(reference / "case.png")

    backend = [
        {
            "id": "edits",
            "instance_data_dir": str(images),
            "caption_strategy": "textfile",
            "resolution": 128,
            "minimum_image_size": 48,
            "max_image_pixels": MAX_PIXELS,
            "conditioning_data": ["reference", "style"],
            "cache_dir": str(root / "cache"),
        },
        {
            "id": "reference",
            "dataset_type": "conditioning",
            "instance_data_dir": str(reference),
            "conditioning_type": "reference_strict",
            "resolution": 128,
        },
        {
            "id": "style",
            "dataset_type": "conditioning",
            "instance_data_dir": str(style),
            "conditioning_type": "reference_loose",
            "match": "stem",
            "resolution": 128,
        },
        {"id": "empty-set", "instance_data_dir": str(root / "empty" / "images"), "conditioning_data": ["empty-ref"]},
        {"id": "empty-ref", "dataset_type": "conditioning", "instance_data_dir": str(root / "empty" / "reference")},
    ]
    (root / "multidatabackend.json").write_text(json.dumps(backend, indent=1, ensure_ascii=False), encoding="utf-8")
    config = {
        "model_flavour": "edit-v2",
        "pretrained_model_name_or_path": model,
        "data_backend_config": str(root / "multidatabackend.json"),
    }
    (root / "config.json").write_text(json.dumps(config, indent=1))
    return root / "config.json", cases
