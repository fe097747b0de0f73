"""Garbage collection during a run: off between the set steps, cycles still freed, the collector restored after."""

import gc
import weakref

import torch

from train.garbage import StepGarbageCollection


class Node:
    def __init__(self):
        self.me = self  # a reference cycle: only the collector frees it


def test_cycles_are_freed_at_the_set_steps_and_only_there():
    was = gc.isenabled()
    gc.enable()
    try:
        with StepGarbageCollection(every=3) as garbage:
            assert not gc.isenabled()
            cycle = Node()
            alive = weakref.ref(cycle)
            del cycle
            for _ in range(5000):  # enough allocations to trigger an automatic collection were it on
                Node()
            garbage.after_step(2)
            assert alive() is not None
            garbage.after_step(3)
            assert alive() is None
        assert gc.isenabled()
    finally:
        gc.enable() if was else gc.disable()


def test_the_collector_stays_off_after_a_run_if_it_was_off():
    gc.disable()
    try:
        with StepGarbageCollection(every=1):
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


class _CollectorState(torch.utils.data.IterableDataset):
    def __iter__(self):
        yield gc.isenabled()


def test_dataloader_workers_collect_their_own_garbage_while_the_training_process_does_not():
    from train.garbage import collect_in_worker

    with StepGarbageCollection():
        loader = torch.utils.data.DataLoader(
            _CollectorState(), batch_size=None, num_workers=1, worker_init_fn=collect_in_worker
        )
        assert list(loader) == [True]
        assert not gc.isenabled()
