"""The routing context slot: each calling thread keeps its own context; a thread that never set one sees the last."""

from __future__ import annotations

import copy
import pickle
import threading

import torch

from moa.layer import ContextSlot
from moa.routers import RoutingContext


def test_each_thread_sees_the_context_it_set_and_others_see_the_latest():
    slot = ContextSlot()
    mine, theirs = RoutingContext(task_ids=torch.tensor([0])), RoutingContext(task_ids=torch.tensor([1]))
    slot.current = mine
    both_set, seen = threading.Barrier(2), {}

    def other():
        slot.current = theirs
        both_set.wait()
        seen["other"] = slot.current

    thread = threading.Thread(target=other)
    thread.start()
    both_set.wait()  # both threads have set their context before either reads
    seen["main"] = slot.current
    thread.join()
    assert seen["main"] is mine and seen["other"] is theirs
    newcomer = []  # a thread that never set one (autograd's device thread re-running a checkpointed layer)
    thread = threading.Thread(target=lambda: newcomer.append(slot.current))
    thread.start()
    thread.join()
    assert newcomer[0] is theirs  # the latest set by any thread


def test_copies_and_pickles_carry_the_current_context():
    slot = ContextSlot()
    slot.current = RoutingContext(task_ids=torch.tensor([3]))
    for clone in (copy.deepcopy(slot), pickle.loads(pickle.dumps(slot))):
        assert torch.equal(clone.current.task_ids, torch.tensor([3]))
        clone.current = RoutingContext()
        assert slot.current.task_ids is not None  # the copy's slot is its own
