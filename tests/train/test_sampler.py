"""The order of training batches: pure function of the manifest, equal per rank, bucketed, mixable."""

from collections import Counter

import pytest

from train.sampler import Source, TrainOrder

SHAPES = [(256, 256, ((256, 256),)), (224, 288, ((224, 288),)), (288, 224, ((288, 224),))]


def _source(name: str, n: int, shapes=SHAPES, **kwargs) -> Source:
    return Source.from_shapes(
        name, tuple(f"{name}{i:03d}" for i in range(n)), tuple(shapes[i % len(shapes)] for i in range(n)), **kwargs
    )


def _ids(order: TrainOrder, sources, positions, rank: int) -> list[list[str]]:
    return [[sources[s.source].sample_ids[s.row] for s in order.rank_batch(p, rank)] for p in positions]


def test_ranks_together_see_each_sample_once_per_epoch_with_equal_batch_counts():
    sources = [_source("a", 24)]  # 8 per shape: divisible by the global batch of 4
    order = TrainOrder(sources, batch_size=2, world_size=2, seed=5)
    for epoch in range(2):
        positions = range(epoch * order.per_epoch, (epoch + 1) * order.per_epoch)
        per_rank = [_ids(order, sources, positions, rank) for rank in range(2)]
        assert len(per_rank[0]) == len(per_rank[1]) == order.per_epoch == 6
        seen = [i for batches in per_rank for batch in batches for i in batch]
        assert sorted(seen) == sorted(sources[0].sample_ids)


def test_global_sequence_is_the_same_for_any_split_of_the_global_batch():
    sources = [_source("a", 30)]
    sequences = []
    for batch_size, world in [(4, 1), (2, 2), (1, 4)]:
        order = TrainOrder(sources, batch_size, world, seed=1)
        steps = [[i for r in range(world) for i in _ids(order, sources, [p], r)[0]] for p in range(3 * order.per_epoch)]
        sequences.append(steps)
    assert sequences[0] == sequences[1] == sequences[2]


def test_batches_hold_one_shape_and_small_buckets_still_train():
    shapes = SHAPES + [(512, 128, ((512, 128),))]
    rows = [shapes[0]] * 9 + [shapes[1]] * 5 + [shapes[2]] * 4 + [shapes[3]]  # the last bucket: 1 sample
    source = Source.from_shapes("a", tuple(f"s{i}" for i in range(len(rows))), tuple(rows))
    order = TrainOrder([source], batch_size=4, world_size=1, seed=0)
    seen = Counter()
    for p in range(order.per_epoch):
        slots = order.rank_batch(p, 0)
        assert len(slots) == 4 and len({source.shape_ids[s.row] for s in slots}) == 1
        seen.update(source.sample_ids[s.row] for s in slots)
    # ceil(9/4) + ceil(5/4) + 1 + 1 batches; every sample at least once, short batches filled from their bucket
    assert order.per_epoch == 3 + 2 + 1 + 1
    assert set(seen) == set(source.sample_ids)


def test_order_is_seeded_and_changes_per_epoch():
    sources = [_source("a", 12)]
    a, b = TrainOrder(sources, 1, 1, seed=0), TrainOrder(sources, 1, 1, seed=0)
    first = _ids(a, sources, range(12), 0)
    assert first == _ids(b, sources, range(12), 0)
    assert first != _ids(a, sources, range(12, 24), 0)
    assert first != _ids(TrainOrder(sources, 1, 1, seed=1), sources, range(12), 0)


def test_datasets_mix_by_size_and_repeats_and_probability_only_interleaves_as_in_simpletuner():
    big, small = _source("big", 30), _source("small", 6)
    by_size = TrainOrder([big, small], 1, 1, seed=0)
    assert by_size.quotas == [30, 6]
    assert TrainOrder([big, _source("small", 6, repeats=2)], 1, 1, seed=0).quotas == [30, 18]

    # SimpleTuner's probability picks which dataset the next batch comes from; every sample is still seen
    # once per epoch (plus repeats).
    weighted = [_source("big", 30, probability=1.0), _source("small", 6, probability=20.0)]
    order = TrainOrder(weighted, 1, 1, seed=0)
    assert order.quotas == [30, 6]
    drawn = [s.source for p in range(order.per_epoch) for s in order.rank_batch(p, 0)]
    assert Counter(drawn) == {0: 30, 1: 6}
    small_ids = [
        weighted[1].sample_ids[s.row] for p in range(order.per_epoch) for s in order.rank_batch(p, 0) if s.source == 1
    ]
    assert sorted(small_ids) == sorted(weighted[1].sample_ids)
    # weight 20 against 1: the small dataset's batches come first, on average over seeds
    first_half = [
        sum(s.source == 1 for p in range(18) for s in TrainOrder(weighted, 1, 1, seed=k).rank_batch(p, 0))
        for k in range(20)
    ]
    assert sum(first_half) / 20 > 5
    plain = TrainOrder([big, small], 1, 1, seed=0)
    assert plain.signature != TrainOrder([_source("big", 30, probability=1.0), small], 1, 1, seed=0).signature


def test_signature_follows_what_changes_the_plan():
    sources = [_source("a", 12)]
    base = TrainOrder(sources, 2, 1, seed=0).signature
    assert TrainOrder(sources, 1, 2, seed=0).signature == base  # same global batch
    assert TrainOrder(sources, 2, 2, seed=0).signature != base
    assert TrainOrder([_source("a", 13)], 2, 1, seed=0).signature != base


def test_no_training_dataset_is_a_clear_error():
    from shared.errors import UserError

    with pytest.raises(UserError, match="no training dataset"):
        TrainOrder([], 1, 1, seed=0)
