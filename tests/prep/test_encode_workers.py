import torch

from prep.encode_workers import ShapePool
from prep.sample_records import Prepared


def _prepared(name: str, height: int, width: int) -> Prepared:
    grid = torch.tensor([[1, height // 14, width // 14]])
    images = [{"image_grid_thw": grid}]
    texts = [{"images": 0}, {"images": 0}]  # a caption and the empty caption, both showing image set 0
    return Prepared(name, [torch.zeros(1, 3, 1, height, width)], images, texts, {}, {})


def test_pool_hands_out_full_batches_of_one_shape_and_loses_no_sample():
    shapes = [(64, 64), (64, 96), (96, 64)]
    stream = [_prepared(f"s{i}", *shapes[i % 3]) for i in range(20)]  # interleaved shapes, as folders are
    pool = ShapePool(batch_size=3, capacity=24)
    batches = [b for p in stream if (b := pool.add(p))] + pool.drain()

    assert [len(b) for b in batches[:6]] == [3] * 6  # full batches while samples arrive
    for batch in batches:
        assert len({p.batch_key for p in batch}) == 1
    assert sorted(p.sample for b in batches for p in b) == sorted(p.sample for p in stream)


def test_full_pool_releases_its_largest_group():
    pool = ShapePool(batch_size=4, capacity=5)
    out = [pool.add(_prepared(f"a{i}", 64, 64)) for i in range(3)]
    out += [pool.add(_prepared("b0", 64, 96))]
    assert out == [None] * 4
    batch = pool.add(_prepared("c0", 96, 64))  # 5 held: memory bound reached
    assert [p.sample for p in batch] == ["a0", "a1", "a2"]
    assert sorted(p.sample for b in pool.drain() for p in b) == ["b0", "c0"]


def test_a_prepared_sample_crosses_from_a_worker_in_one_buffer_and_comes_back_equal():
    """Each tensor a DataLoader worker returns costs the encoding thread a socket round trip: a sample's
    tensors travel in one buffer and come back as views of it, every value, dtype and shape as sent."""
    import io
    import pickle

    from prep.encode_workers import pack, unpack

    g = torch.Generator().manual_seed(0)
    prepared = Prepared(
        sample=None,
        vae_pixels=[torch.randint(0, 256, (1, 3, 1, 8, h), dtype=torch.uint8, generator=g) for h in (8, 5)],
        vl_images=[{"pixel_values": torch.randn(7, 3, generator=g), "image_grid_thw": torch.tensor([[1, 2, 3]])}],
        vl_texts=[
            {"input_ids": torch.arange(5)[None], "attention_mask": torch.ones(1, 5, dtype=torch.long), "images": 0}
        ],
        meta={"sample_id": "a"},
        row={"height": 8},
        cached_embeds=b"bytes",
    )
    packed = pack(prepared)
    sent_tensors = []

    class Counting(pickle.Pickler):
        def persistent_id(self, obj):
            if torch.is_tensor(obj):
                sent_tensors.append(obj)
            return None

    Counting(io.BytesIO()).dump(packed)
    assert len(sent_tensors) == 1 and sent_tensors[0] is packed.buffer  # what the worker sends: one tensor

    back = unpack(packed)
    sent = [*prepared.vae_pixels, *prepared.vl_images[0].values(), *list(prepared.vl_texts[0].values())[:2]]
    got = [*back.vae_pixels, *back.vl_images[0].values(), *list(back.vl_texts[0].values())[:2]]
    for a, b in zip(sent, got, strict=True):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        assert b.untyped_storage().data_ptr() == packed.buffer.untyped_storage().data_ptr()  # a view, not a copy
    assert (back.vl_texts[0]["images"], back.meta, back.row, back.cached_embeds) == (
        0,
        {"sample_id": "a"},
        {"height": 8},
        b"bytes",
    )
