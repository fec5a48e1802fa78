"""Which BN layers feed which: the graph facts the diagnosis and ``recalibrate`` need.

One topological sweep carries, per tensor, the set of BNs it depends on as a bit mask (bit k: the
k-th BN in graph order), so a union is one integer OR: a chain of 10,000 BNs costs 10,000 small ORs
where sets of names cost 50 million insertions and gigabytes. Names are decoded only when a layer's
set is read.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import numpy as np

from bnscope.onnxio.bn import is_batchnorm
from bnscope.onnxio.graph import GraphView


class Upstream(Mapping):
    """BN name -> the set of names of the BNs its input depends on, decoded on each read."""

    def __init__(self, masks: dict[str, int], names: list[str]):
        self._masks, self._names = masks, names

    def __getitem__(self, name: str) -> set[str]:
        mask = self._masks[name]
        raw = np.frombuffer(mask.to_bytes((mask.bit_length() + 7) // 8, "little"), np.uint8)
        return {self._names[k] for k in np.flatnonzero(np.unpackbits(raw, bitorder="little"))}

    def __iter__(self) -> Iterator[str]:
        return iter(self._masks)

    def __len__(self) -> int:
        return len(self._masks)


def bn_upstream(view: GraphView) -> Upstream:
    """For every BN, the names of the BNs its input depends on (one topological sweep)."""
    ancestors: dict[str, int] = {}
    masks: dict[str, int] = {}
    names: list[str] = []
    for idx, node in enumerate(view.nodes):
        above = 0
        for tensor in node.input:
            above |= ancestors.get(tensor, 0) if tensor else 0
        if is_batchnorm(node):
            name = view.node_name(idx)
            masks[name] = ancestors.get(node.input[0], 0)
            above |= 1 << len(names)
            names.append(name)
        for out in node.output:
            ancestors[out] = above
    return Upstream(masks, names)
