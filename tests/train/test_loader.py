from train.loader import epoch_batches, shape_key


class FakeReader:
    """Manifest rows only; epoch planning never opens a shard."""

    def __init__(self, rows):
        self.rows = rows


def _rows(n):
    sizes = [(256, 256), (224, 288), (288, 224)]
    return [
        {
            "sample_id": f"{i:04x}",
            "height": sizes[i % 3][0],
            "width": sizes[i % 3][1],
            "ref_sizes": [list(sizes[i % 3])],
        }
        for i in range(n)
    ]


def test_batches_hold_one_shape_and_ranks_get_equal_counts():
    readers = [FakeReader(_rows(20))]
    per_rank = [epoch_batches(readers, batch_size=2, seed=3, epoch=0, rank=r, world_size=2) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) > 0
    seen = []
    for batches in per_rank:
        for batch in batches:
            assert len(batch) == 2
            assert len({shape_key(row) for _, row in batch}) == 1
            seen += [row["sample_id"] for _, row in batch]
    assert len(seen) == len(set(seen)), "a sample was given to two ranks in one epoch"


def test_order_is_seeded_and_changes_per_epoch():
    readers = [FakeReader(_rows(12))]
    ids = [
        [row["sample_id"] for batch in epoch_batches(readers, 1, seed=s, epoch=e) for _, row in batch]
        for s, e in [(0, 0), (0, 0), (0, 1)]
    ]
    assert ids[0] == ids[1] and ids[0] != ids[2] and sorted(ids[0]) == sorted(ids[2])
