"""A model's own float floor, and the one judgement of a transformed model against its original.

The floor of an output is how far the *original* moves when its weights are rounded differently:
every float weight (initializers and Constant node values of the top graph) is nudged by one unit
in its last place, up or down at random per element (about ``w * (1 +- 2^-23)`` in float32), the
original reruns unoptimised (``ORT_DISABLE_ALL``) on the same inputs, and the floor
is the largest ``|y_nudged - y|`` over ``SEEDS`` draws (sharing the batches out) and the elements. The nudged
values replace the weights through ``SessionOptions.add_initializer``: the model is not copied.

A fold computes ``W' = W * gamma / sqrt(var + eps)`` in float64 and rounds once, so every folded
weight is within half a unit of its exact value, and it reorders a few float32 operations: the same
kind of change, whose effect the network amplifies just as much. A fixed ``atol`` cannot know that
amplification (a MobileNetV3 moves 2e-2 under a one-ulp nudge, an EfficientNet-B0 on random data
2e3); the floor measures it on the inputs at hand. A verification passes when each output's
difference is at most ``FLOOR_MULTIPLE`` floors (:func:`bnscope.numerics.compare.floor_ratio`);
explicit ``atol``/``rtol`` judge instead when given. Non-finite outputs never pass.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import numpy as np
import onnx

from bnscope.errors import BnscopeError
from bnscope.numerics.compare import FLOOR_MULTIPLE, floor_ratio, nudge
from bnscope.onnxio.constants import constant_node_value
from bnscope.runtime.measure import OutputDiff, compare_outputs, merge_diffs
from bnscope.runtime.sessions import create_session

SEEDS = 3
"""Nudged runs of the original; the floor is their largest difference."""

_SHAPE_INPUTS = {"Resize": (1, 2), "Upsample": (1,), "Range": (0, 1, 2)}
"""Float inputs that act as sizes or counts, not weights: a nudge could change a shape."""

Outputs = Mapping[str, np.ndarray]


def float_weights(model: onnx.ModelProto, read) -> dict[str, np.ndarray]:
    """Every float initializer and Constant node value of the top graph, by name, except inputs
    that act as sizes (Resize scales, Range bounds) and tensors stored coarser than the model's
    outputs (an fp16 weight Cast to float32: one fp16 ulp is 8192 float32 ulps, and the fold
    rewrites it in float32). ``read`` turns a TensorProto into an array."""
    graph = model.graph
    sizes = {n for node in graph.node for i, n in enumerate(node.input) if i in _SHAPE_INPUTS.get(node.op_type, ())}
    out_eps = [e for o in graph.output if (e := _eps(o.type.tensor_type.elem_type)) is not None]
    finest = min(out_eps, default=float("inf"))

    def wanted(name: str, eps: float | None) -> bool:
        return name not in sizes and eps is not None and eps <= finest

    found = {t.name: read(t) for t in graph.initializer if wanted(t.name, _eps(t.data_type))}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            value = constant_node_value(node, read)
            if value is not None and wanted(node.output[0], _eps(value.dtype)):
                found[node.output[0]] = value
    return found


def measure_floor(
    model: str | os.PathLike | bytes,
    weights: Mapping[str, np.ndarray],
    batches: list[dict],
    expected: list[Outputs],
    seeds: int = SEEDS,
    first_seed: int = 0,
) -> dict[str, float] | None:
    """Each output's floor: its largest difference (elements finite in both) between the original's
    ``expected`` outputs and its runs with ``weights`` nudged.

    The draws share the batches out (draw ``k`` of ``seeds`` runs batches ``k``, ``k + seeds``, ...;
    every draw runs at least one), so the floor costs ``max(batches, seeds)`` runs of the original,
    about one more pass over the verification data, plus ``seeds`` session creations. Random seeds
    ``first_seed`` on (defaults to 0). Returns None when a nudged original cannot run (the
    judgement then falls back to tolerances).
    """
    floor = dict.fromkeys(expected[0], 0.0) if expected else {}
    try:
        for k in range(seeds if batches else 0):
            rng = np.random.default_rng(first_seed + k)
            nudged = {name: nudge(w, rng) for name, w in weights.items()}
            session = create_session(
                model, "cpu", opt_level="disable", initializers=nudged, label="the nudged original"
            )
            for i in range(k, len(batches), seeds) if k < len(batches) else [k % len(batches)]:
                for name, y in zip(session.output_names, session.run(batches[i])):
                    floor[name] = max(floor[name], _finite_max_diff(y, expected[i][name]))
            del session, nudged
    except BnscopeError:
        return None
    return floor


def judge_outputs(
    got: list[Outputs],
    expected: list[Outputs],
    floors: Mapping[str, float] | None,
    atol: float | None = None,
    rtol: float | None = None,
    multiple: float = FLOOR_MULTIPLE,
    other_kernels: bool = False,
) -> list[OutputDiff]:
    """Judge a transformed model's outputs (``got``, per batch) against the original's.

    A float output passes when its largest difference is at most ``multiple`` floors, or, when
    ``atol`` or ``rtol`` is given (or no floor could be measured), when every element is within
    ``atol + rtol * |ref|`` (``compare_outputs``). A NaN/inf in either never passes: where the
    original's outputs are not finite, the comparison proves nothing. Other dtypes must be equal.
    ``other_kernels``: ``got`` ran on another execution provider than the floor (the CPU), whose
    kernels round differently (cuDNN's Winograd and FFT convolutions, fused kernels): an output
    then also passes within the dtype's default tolerances, the judgement before the floor.
    """
    diffs = merge_diffs([compare_outputs(g, e, atol, rtol) for g, e in zip(got, expected)])
    explicit = atol is not None or rtol is not None
    return [
        _judge_one(
            d, [g[d.name] for g in got], [e[d.name] for e in expected], floors, explicit, multiple, other_kernels
        )
        for d in diffs
    ]


def _judge_one(d: OutputDiff, got, ref, floors, explicit: bool, multiple: float, other_kernels: bool) -> OutputDiff:
    eps = _eps(ref[0].dtype) if ref else None
    if eps is None or (d.reason or "").startswith("shape"):
        return _with(d, d.passed, d.reason, None, None, "tolerance")
    ref_max = max((_finite_abs_max(r) for r in ref), default=0.0)
    floor, ratio = floor_ratio(d.max_abs, floors[d.name], ref_max, eps) if floors is not None else (None, None)
    bad_ref, bad_got = sum(_nonfinite(r) for r in ref), sum(_nonfinite(g) for g in got)
    if bad_ref:
        reason = (
            f"the original's outputs hold {bad_ref} NaN/inf value(s) on these inputs (this model's: {bad_got}), "
            "so the comparison proves nothing; find the layer with `bnscope stats MODEL --data ...`"
        )
        return _with(d, False, reason, floor, ratio, "finite")
    if bad_got:
        return _with(d, False, f"{bad_got} NaN/inf value(s) where the original's are finite", floor, ratio, "finite")
    if explicit or ratio is None:
        return _with(d, d.passed, d.reason, floor, ratio, "tolerance")
    if ratio > multiple and other_kernels and d.passed:
        return _with(d, True, None, floor, ratio, "tolerance")
    passed = ratio <= multiple
    reason = None if passed else f"{ratio:.3g}x the original's float floor (at most {multiple:g}x passes)"
    return _with(d, passed, reason, floor, ratio, "floor")


def _with(d: OutputDiff, passed: bool, reason, floor, ratio, judged_by: str) -> OutputDiff:
    fields = {**d.__dict__, "passed": bool(passed), "reason": reason, "floor": floor, "ratio": ratio}
    return OutputDiff(**{**fields, "judged_by": judged_by})


def _eps(dtype) -> float | None:
    """Machine epsilon of a float dtype (numpy, ml_dtypes or an ONNX TensorProto type), else None."""
    try:
        if isinstance(dtype, int):
            dtype = onnx.helper.tensor_dtype_to_np_dtype(dtype)
        return float(np.finfo(dtype).eps)
    except (TypeError, ValueError, KeyError):
        return None


def _finite_max_diff(a: np.ndarray, b: np.ndarray) -> float:
    if np.shape(a) != np.shape(b) or _eps(np.asarray(b).dtype) is None:
        return 0.0
    a64, b64 = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    finite = np.isfinite(a64) & np.isfinite(b64)
    return float(np.abs(a64 - b64, where=finite, out=np.zeros_like(a64)).max(initial=0.0))


def _finite_abs_max(a: np.ndarray) -> float:
    a64 = np.abs(np.asarray(a, dtype=np.float64))
    finite = a64[np.isfinite(a64)]
    return float(finite.max()) if finite.size else 0.0


def _nonfinite(a: np.ndarray) -> int:
    return int(np.size(a) - np.count_nonzero(np.isfinite(np.asarray(a, dtype=np.float64))))
