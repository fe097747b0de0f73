import torch

from prep.pipeline import ShapePool
from prep.record import Prepared


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
