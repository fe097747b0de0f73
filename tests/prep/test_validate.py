"""prep validate finds every bad input in one run and says what to do; good data passes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from prep.cli import app
from prep.images import decode_image
from prep.validate import validate
from shared.config import load_config
from tests.prep.bad_data import write_bad_project

ERRORS = {
    "missing reference": "edit image without reference",
    "extra reference": "reference without edit image",
    "empty folder": "empty folder",
    "truncated JPEG": "unreadable image",
    "zero-byte file": "unreadable image",
    "missing caption": "missing caption",
    "stem collision": "ambiguous name",
    "strict aspect mismatch": "reference aspect differs from its target (reference_strict)",
    "below minimum size": "image below minimum size",
    "over the pixel limit": "unreadable image",
    "case-only name difference": "edit image without reference",
}
HANDLED = ["CMYK JPEG", "16-bit PNG", "RGBA PNG", "EXIF-rotated photo"]  # converted: warnings, still trainable
GOOD = ["BOM+CRLF caption", "multi-line caption", "nested and unicode path"]


@pytest.fixture
def bad_project(tmp_path):
    return write_bad_project(tmp_path)


def test_every_bad_case_is_reported_in_one_run(bad_project, tmp_path):
    config_path, cases = bad_project
    report_path = tmp_path / "report.json"
    result = CliRunner().invoke(app, ["validate", "--config", str(config_path), "--json", str(report_path)])
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert "NOT TRAINABLE" in result.output
    findings = json.loads(report_path.read_text(encoding="utf-8"))["findings"]
    by_path = {}
    for finding in findings:
        by_path.setdefault(finding["path"], []).append(finding)
    for case, kind in ERRORS.items():
        path = str(cases[case]) if case != "stem collision" else str(cases[case].parent.parent / "style" / "collide")
        if case == "strict aspect mismatch":
            path = str(cases[case].parent.parent / "reference" / "aspect.png")
        assert any(f["kind"] == kind and f["severity"] == "error" for f in by_path.get(path, [])), (case, path)
        assert path in result.output, f"{case}: {path} is not in the printed report"
    for case in HANDLED:
        (finding,) = by_path[str(cases[case])]
        assert finding["severity"] == "warning" and finding["kind"] == "converted on load"
    for case in GOOD:
        assert str(cases[case]) not in by_path, case
    # Every error says what to do after the "<file>: <what>;".
    assert all(";" in f["message"] for f in findings if f["severity"] == "error")


def test_counts_come_first_and_good_samples_survive(bad_project):
    config_path, cases = bad_project
    report = validate(load_config(config_path))
    text = report.render()
    assert text.index("edit images") < text.index("errors:")
    assert "reference 'reference'" in text and "2 edit image(s) without a reference, 2 reference(s)" in text
    kept = {s.relpath: s for s in report.samples["edits"]}
    assert set(kept) == {
        "good.png",
        "bom.png",
        "multi.png",
        "sub/dir/ünïcode 猫.png",
        "cmyk.jpg",
        "deep.png",
        "alpha.png",
        "rotated.jpg",
    }
    assert kept["bom.png"].captions == ["make the sky red"]  # no BOM, no CR
    assert kept["multi.png"].captions == ["first instruction", "second instruction"]
    assert kept["good.png"].references[1].name == "good.jpg"  # "match": "stem" pairs .png with .jpg
    assert not report.trainable


def test_long_lists_are_summarised(bad_project):
    config_path, _ = bad_project
    text = validate(load_config(config_path)).render(limit=1)
    assert "... and 1 more (--json REPORT lists every one)" in text


def test_images_are_decoded_upright_in_8_bit_rgb(bad_project):
    _, cases = bad_project
    rotated = decode_image(cases["EXIF-rotated photo"])
    assert rotated.size == (64, 96) and rotated.image.mode == "RGB"
    deep = decode_image(cases["16-bit PNG"])
    values = np.asarray(deep.image)
    assert deep.image.mode == "RGB" and values.max() > 200 and values.min() < 50, "16-bit values were clipped"
    alpha = np.asarray(decode_image(cases["RGBA PNG"]).image).astype(int)
    assert alpha.min() >= 127, "half-transparent pixels must be blended with white"


def test_demo_data_is_trainable(demo_project):
    result = CliRunner().invoke(app, ["validate", "--config", str(demo_project("edit-v2", n_samples=3))])
    assert result.exit_code == 0, result.output
    assert "TRAINABLE: 3 sample(s)" in result.output


def test_a_symlinked_folder_is_followed_a_loop_is_reported_and_a_broken_link_is_an_error(demo_project, tmp_path):
    import os

    from prep.validate import validate
    from shared.config import load_config

    config_path = demo_project("edit-v1", n_samples=2)
    data = tmp_path / "data"
    extra = tmp_path / "elsewhere"
    for sub in ("images", "reference"):
        (extra / sub).mkdir(parents=True)
        os.rename(data / sub / "pair_0001.png", extra / sub / "pair_0001.png")
        os.symlink(extra / sub, data / sub / "linked")  # a folder kept on another disk, linked in
    os.rename(data / "images" / "pair_0001.txt", extra / "images" / "pair_0001.txt")
    os.symlink(data / "images", data / "images" / "linked" / "back")  # a loop
    report = validate(load_config(config_path))
    assert not report.trainable  # links out of the dataset folders are not followed unless allowed
    linked = {f.path for f in report.errors if f.kind == "link outside the dataset folder"}
    assert linked == {str(data / "images" / "linked"), str(data / "reference" / "linked")}
    assert {f.kind for f in report.errors} == {"link outside the dataset folder"}  # not again as missing pairs
    backend_path = tmp_path / "multidatabackend.json"
    backend = json.loads(backend_path.read_text())
    backend_path.write_text(json.dumps([dict(entry, allow_links_outside=True) for entry in backend]))
    report = validate(load_config(config_path))
    assert report.trainable, report.render()
    assert sorted(s.relpath for s in report.samples["edits"]) == ["linked/pair_0001.png", "pair_0000.png"]
    assert any(f.kind == "symlink loop" and f.path.endswith("linked/back") for f in report.warnings)

    os.symlink(tmp_path / "gone.png", data / "images" / "dangling.png")
    report = validate(load_config(config_path))
    assert not report.trainable
    assert any(f.kind == "broken symlink" and f.path.endswith("dangling.png") for f in report.errors)


def test_a_file_name_that_is_not_utf8_is_reported_by_validate_not_a_crash_in_the_build(demo_project, tmp_path):
    import os
    import shutil

    from typer.testing import CliRunner

    from prep.cli import app

    config_path = demo_project("edit-v1", n_samples=2)
    data = os.fsencode(str(tmp_path / "data"))
    for sub, ext in (("images", b"png"), ("images", b"txt"), ("reference", b"png")):
        shutil.copy(data + f"/{sub}/pair_0000.".encode() + ext, data + f"/{sub}/caf\xe9.".encode("latin-1") + ext)
    for command in ("validate", "build-cache"):
        result = CliRunner().invoke(app, [command, "--config", str(config_path)])
        assert result.exit_code == 1 and "Traceback" not in result.output, result.output
        assert "images/caf\\xe9.png: this file name is not valid UTF-8" in result.output


def test_a_1000x1_loose_reference_is_an_error_before_anything_is_encoded(demo_project, tmp_path):
    from PIL import Image

    from prep.validate import validate
    from shared.config import load_config

    config_path = demo_project("edit-v2", n_samples=2)  # its second reference is reference_loose
    Image.new("RGB", (1000, 1), "red").save(tmp_path / "data" / "reference2" / "pair_0001.png")
    report = validate(load_config(config_path))
    assert not report.trainable
    (error,) = [f for f in report.errors if f.kind == "reference the VL encoder cannot take"]
    assert "1000x1: its aspect ratio 1000:1 is beyond the 200:1 the VL encoder accepts" in error.message


@pytest.mark.parametrize(
    ("flags", "says"),
    [
        (["--batch-size", "0"], "--batch-size 0: use 1 or more"),
        (["--workers", "-1"], "--workers -1: use 0"),
        (["--device", "tpu"], "--device 'tpu': use cpu, cuda or cuda:N"),
    ],
)
def test_build_flags_out_of_range_are_refused_in_one_line(demo_project, flags, says):
    from typer.testing import CliRunner

    from prep.cli import app

    result = CliRunner().invoke(app, ["build-cache", "--config", str(demo_project("edit-v1", n_samples=1)), *flags])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert says in result.output


def test_a_cache_dir_that_is_a_file_is_refused_naming_the_dataset(demo_project, tmp_path):
    from shared.config import load_config
    from shared.errors import UserError

    config_path = demo_project("edit-v1", n_samples=1)
    (tmp_path / "cache").write_text("oops")
    with pytest.raises(UserError, match=r"dataset 'edits': its cache dir .*cache is a file"):
        load_config(config_path)


def test_a_caption_table_line_that_is_not_an_object_is_reported_with_its_line(demo_project, tmp_path):
    import json

    from prep.validate import validate
    from shared.config import load_config

    config_path = demo_project("edit-v1", n_samples=2)
    table = tmp_path / "captions.jsonl"
    table.write_text('{"filename": "pair_0000.png", "caption": "make it red"}\n["pair_0001.png", "oops"]\n')
    backend_path = tmp_path / "multidatabackend.json"
    backend = json.loads(backend_path.read_text())
    backend[0].update(caption_strategy="parquet", parquet={"path": str(table)})
    backend_path.write_text(json.dumps(backend))
    report = validate(load_config(config_path))
    assert not report.trainable
    assert any("line 2 is a JSON list, not an object" in f.message for f in report.errors), report.render()


def test_unreadable_files_beside_pairing_and_caption_problems_are_all_reported_in_one_pass(demo_project, tmp_path):
    """A truncated PNG, a 0-byte reference, a text file named .png and a broken link must not hide the pairing and
    caption problems in the same folders: each of the ten is named in one report."""
    import os
    import shutil

    config_path = demo_project("edit-v1", n_samples=10)
    images, refs = tmp_path / "data" / "images", tmp_path / "data" / "reference"
    (images / "pair_0000.png").write_bytes((images / "pair_0000.png").read_bytes()[:200])
    (refs / "pair_0001.png").write_bytes(b"")
    (images / "pair_0002.png").write_text("not an image")
    (refs / "pair_0003.png").unlink()
    os.symlink(tmp_path / "gone.png", refs / "pair_0003.png")
    (refs / "pair_0004.png").unlink()
    shutil.copy(refs / "pair_0005.png", refs / "pair_9999.png")
    (images / "pair_0006.txt").write_text("")
    (images / "pair_0007.txt").write_text("  \n")
    (images / "pair_0008.txt").unlink()

    report = validate(load_config(config_path))
    named = {(f.kind, os.path.basename(f.path)) for f in report.errors}
    assert named == {
        ("unreadable image", "pair_0000.png"),
        ("unreadable image", "pair_0001.png"),
        ("unreadable image", "pair_0002.png"),
        ("broken symlink", "pair_0003.png"),
        ("edit image without reference", "pair_0004.png"),
        ("reference without edit image", "pair_9999.png"),
        ("missing caption", "pair_0006.png"),
        ("missing caption", "pair_0007.png"),
        ("missing caption", "pair_0008.png"),
    }
    assert [s.relpath for s in report.samples["edits"]] == ["pair_0005.png", "pair_0009.png"]
    assert "10 edit images, 2 usable" in report.render()


def _png_16bit_rgb(path, pixels: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG (PIL cannot write one), [H, W, 3] uint16."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    height, width, _ = pixels.shape
    raw = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(height))
    header = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def test_animation_16_bit_rgb_and_float_images_are_converted_by_their_real_range_and_noted(tmp_path):
    from PIL import Image

    from prep.images import ImageError

    frames = [Image.new("RGB", (32, 32), colour) for colour in ("red", "blue")]
    for suffix in ("gif", "webp"):
        frames[0].save(tmp_path / f"moving.{suffix}", save_all=True, append_images=frames[1:])
        decoded = decode_image(tmp_path / f"moving.{suffix}")
        assert decoded.notes == ["animated (2 frames): its first frame is used"]
        assert np.asarray(decoded.image)[..., 0].mean() > 240  # the red first frame
    _png_16bit_rgb(tmp_path / "deep.png", np.full((8, 8, 3), 65535, dtype=np.uint16))
    assert decode_image(tmp_path / "deep.png").notes == ["16-bit RGB reduced to 8 bits per channel"]

    for values, top, named in ((0.5, 1.0, "[0, 1]"), (100.0, 255.0, "[0, 255]"), (30000.0, 65535.0, "[0, 65535]")):
        Image.fromarray(np.full((8, 8), values, dtype=np.float32), mode="F").save(tmp_path / "float.tif")
        decoded = decode_image(tmp_path / "float.tif")
        assert decoded.notes == [f"32-bit float grayscale (F, values in {named}) converted to 8-bit RGB"]
        assert np.asarray(decoded.image).mean() == pytest.approx(values / top * 255, abs=1)  # never black
    for unclear in (-2.0, 1.5, 1000.0):  # negative; [0, 1] with highlights or a dark [0, 255]; 12-bit or depth data
        Image.fromarray(np.full((8, 8), unclear, dtype=np.float32), mode="F").save(tmp_path / "float.tif")
        with pytest.raises(ImageError, match=f"float image with values from {unclear:g} to {unclear:g}"):
            decode_image(tmp_path / "float.tif")


def test_gif_pairs_train_and_formats_not_read_are_named(demo_project, tmp_path):
    from PIL import Image

    config_path = demo_project("edit-v1", n_samples=2)
    images, refs = tmp_path / "data" / "images", tmp_path / "data" / "reference"
    for folder in (images, refs):
        Image.open(folder / "pair_0001.png").save(folder / "pair_0001.gif")
        (folder / "pair_0001.png").unlink()
    (images / "photo.heic").write_bytes(b"\x00" * 64)
    report = validate(load_config(config_path))
    assert sorted(s.relpath for s in report.samples["edits"]) == ["pair_0000.png", "pair_0001.gif"]
    (warning,) = [f for f in report.warnings if f.kind == "image format not read"]
    assert warning.path == str(images / "photo.heic") and "convert it to PNG or JPEG" in warning.message


def test_a_crop_that_cuts_away_more_than_half_is_warned_with_what_stays(demo_project, tmp_path):
    from PIL import Image

    config_path = demo_project("edit-v1", n_samples=2, resolution=64)
    for folder in ("images", "reference"):
        Image.new("RGB", (4000, 64), "white").save(tmp_path / "data" / folder / "pair_0001.png")
    report = validate(load_config(config_path))
    assert report.trainable
    (warning,) = [f for f in report.warnings if f.kind == "more than half of the image cropped away"]
    assert (
        warning.path.endswith("pair_0001.png")
        and "4000x64 keeps 26% of its area in its 512x32 bucket" in warning.message
    )
    assert "more than half of the image cropped away (1)" in report.render()


def test_two_caption_rows_for_one_image_and_an_eval_dataset_over_the_training_folder_are_named(demo_project, tmp_path):
    config_path = demo_project("edit-v1", n_samples=3)
    table = tmp_path / "captions.jsonl"
    rows = [("pair_0000.png", "make it red"), ("pair_0001.png", "make it blue"), ("pair_0001.png", "make it green")]
    rows += [("pair_0002.png", "make it pink"), ("pair_0002", "make it grey")]  # one image, two spellings
    table.write_text("".join(json.dumps({"filename": f, "caption": c}) + "\n" for f, c in rows))
    backend_path = tmp_path / "multidatabackend.json"
    backend = json.loads(backend_path.read_text())
    backend[0].update(caption_strategy="parquet", parquet={"path": str(table)})
    backend_path.write_text(json.dumps(backend))
    report = validate(load_config(config_path))
    assert any("'pair_0001.png' has 2 rows" in f.message for f in report.errors), report.render()
    assert any("rows 'pair_0002.png', 'pair_0002' all name pair_0002.png" in f.message for f in report.errors)

    held_out = dict(backend[0], id="held-out", conditioning_data=backend[0]["conditioning_data"])
    held_out["cache_dir_vae"] = str(tmp_path / "eval-cache")
    backend_path.write_text(json.dumps([*backend, held_out]))
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(dict(config, eval_dataset_id="held-out")))
    report = validate(load_config(config_path))
    (overlap,) = [f for f in report.warnings if f.kind == "eval data overlaps training data"]
    assert "shares its folder with training dataset 'edits'" in overlap.message


def test_a_caption_file_linking_outside_the_dataset_is_not_read(demo_project, tmp_path):
    import os

    config_path = demo_project("edit-v1", n_samples=2)
    secret = tmp_path / "elsewhere" / "secret.txt"
    secret.parent.mkdir()
    secret.write_text("a private note that must not end up in a cache")
    caption = tmp_path / "data" / "images" / "pair_0001.txt"
    caption.unlink()
    os.symlink(secret, caption)
    report = validate(load_config(config_path))
    (error,) = [f for f in report.errors if f.kind == "link outside the dataset folder"]
    assert error.path == str(caption) and str(secret) in error.message
    assert [s.relpath for s in report.samples["edits"]] == ["pair_0000.png"]
    assert not any("private note" in c for s in report.samples["edits"] for c in s.captions)


def test_eval_images_copied_from_the_training_images_are_named(demo_project, tmp_path):
    import shutil

    config_path = demo_project("edit-v1", n_samples=3)
    backend_path = tmp_path / "multidatabackend.json"
    backend = json.loads(backend_path.read_text())
    shutil.copytree(tmp_path / "data" / "images", tmp_path / "eval-images")  # the same files, another folder
    held_out = dict(backend[0], id="held-out", instance_data_dir=str(tmp_path / "eval-images"))
    held_out["cache_dir_vae"] = str(tmp_path / "eval-cache")
    backend_path.write_text(json.dumps([*backend, held_out]))
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps(dict(config, eval_dataset_id="held-out")))
    report = validate(load_config(config_path))
    copied = [f for f in report.warnings if f.kind == "eval data overlaps training data"]
    assert len(copied) == 1, report.render()
    (copied,) = copied
    assert "3 edit image(s) of the eval dataset 'held-out' are byte-identical to training images" in copied.message


def test_a_broken_reference_link_matched_by_stem_is_reported_once(demo_project, tmp_path):
    """With `match: stem`, the reference `x.jpg` that is a broken link is named as such, not again as the
    edit image `x.png` lacking its reference."""
    import os

    config_path = demo_project("edit-v1", n_samples=2)
    backend_path = tmp_path / "multidatabackend.json"
    backend = json.loads(backend_path.read_text())
    backend_path.write_text(json.dumps([dict(e, match="stem") if e["id"] == "ref0" else e for e in backend]))
    reference = tmp_path / "data" / "reference"
    (reference / "pair_0001.png").unlink()
    os.symlink(tmp_path / "gone.jpg", reference / "pair_0001.jpg")
    report = validate(load_config(config_path))
    assert [(f.kind, os.path.basename(f.path)) for f in report.errors] == [("broken symlink", "pair_0001.jpg")]
