"""The HBM manager serves a neuron asked for at a lower precision from a copy it already holds at a
higher one: no bytes moved, and the ids stay unique per precision."""
from __future__ import annotations

import numpy as np
import torch

from m2cache.actors.hbm import HBMManager
from m2cache.trace.recorder import NullRecorder


def manager(upgrade: bool = True) -> HBMManager:
    return HBMManager(num_layers=2, num_neurons=16, slots={"fp16": 8, "int8": 8, "int4": 8},
                      bundle_bytes={"fp16": 4, "int8": 4, "int4": 4}, device=torch.device("cpu"), dram=None,
                      recorder=NullRecorder(), upgrade=upgrade)


def ids(*values: int) -> np.ndarray:
    return np.array(values, dtype=np.int64)


def test_lower_precision_requests_are_served_from_higher_precision_copies() -> None:
    hbm = manager()
    hbm.cache.plan(0, 1, {"fp16": ids(1, 2, 3), "int8": ids(5, 6)})
    got = hbm._upgrade(0, {"fp16": ids(9), "int8": ids(2, 5, 10), "int4": ids(3, 6, 11)})
    assert {p: v.tolist() for p, v in got.items()} == {"fp16": [2, 3, 9], "int8": [5, 6, 10], "int4": [11]}
    assert hbm.upgraded == 3


def test_copies_of_another_layer_or_a_lower_precision_do_not_count() -> None:
    hbm = manager()
    hbm.cache.plan(1, 1, {"fp16": ids(4)})
    hbm.cache.plan(0, 1, {"int4": ids(7)})
    got = hbm._upgrade(0, {"fp16": ids(7), "int8": ids(4)})
    assert {p: v.tolist() for p, v in got.items()} == {"fp16": [7], "int8": [4]}
    assert hbm.upgraded == 0
