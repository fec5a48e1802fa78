"""onnxruntime's own static QDQ quantisation, calibrated once, then quantised per precision plan.

``quantize_static(QDQ, MinMax, QUInt8 activations, QInt8 weights)``; a 16-bit tensor is an entry
``{name: [{"quant_type": QUInt16}]}`` in ``extra_options["TensorQuantOverrides"]``, so every plan is a
standard QDQ model that any onnxruntime execution provider loads. The calibrated ranges are computed
once (``calibration_cache_path`` where this onnxruntime has it, 1.32+) and reused by every plan tried.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx

from bnscope.errors import BnscopeError

log = logging.getLogger(__name__)

SIXTEEN_BIT_TYPES = (onnx.TensorProto.UINT16, onnx.TensorProto.INT16)
RENAMED_OUTPUT = "_QuantizeLinear_Input"


@contextlib.contextmanager
def _quiet_root_logger():
    """onnxruntime.quantization logs advice through the root logger ("Please consider pre-processing",
    the opset bump for 16-bit types) on every call; bnscope reports what it did itself."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


class _Reader:
    """A CalibrationDataReader over feed dicts (onnxruntime duck-types it: ``get_next``)."""

    def __init__(self, feeds: list[Mapping[str, np.ndarray]]):
        self.feeds = list(feeds)
        self.position = 0

    def get_next(self):
        if self.position >= len(self.feeds):
            return None
        self.position += 1
        return dict(self.feeds[self.position - 1])

    def __len__(self) -> int:
        return len(self.feeds)

    def set_range(self, start_index: int, end_index: int) -> None:
        self.position = start_index


@dataclass
class Quantizer:
    """Quantises ``float_path`` with the calibration feeds; every call reuses the first calibration."""

    float_path: Path
    feeds: list[Mapping[str, np.ndarray]]
    work_dir: Path
    per_channel: bool = True

    def __post_init__(self) -> None:
        from onnxruntime import quantization

        self.q = quantization
        self.cache = self.work_dir / "calibration.json"
        self.cached = "calibration_cache_path" in inspect.signature(quantization.quantize_static).parameters

    def quantize(self, out: Path, sixteen_bit: Iterable[str] = (), ranges: Mapping | None = None) -> Path:
        """Writes the QDQ model with ``sixteen_bit`` activation tensors at uint16 to ``out``; ``ranges``
        (name: (rmin, rmax)) replace the calibrated range of those tensors."""
        q = self.q
        overrides: dict[str, list[dict]] = {name: [{"quant_type": q.QuantType.QUInt16}] for name in sixteen_bit}
        for name, (lo, hi) in (ranges or {}).items():
            entry = overrides.setdefault(name, [{}])[0]
            entry.update(rmin=np.array(lo, np.float32), rmax=np.array(hi, np.float32))
        extra = {"TensorQuantOverrides": overrides} if overrides else {}
        kwargs = {"calibration_cache_path": str(self.cache)} if self.cached else {}
        try:
            with _quiet_root_logger():
                q.quantize_static(
                    str(self.float_path),
                    str(out),
                    _Reader(self.feeds),
                    quant_format=q.QuantFormat.QDQ,
                    per_channel=self.per_channel,
                    activation_type=q.QuantType.QUInt8,
                    weight_type=q.QuantType.QInt8,
                    calibrate_method=q.CalibrationMethod.MinMax,
                    extra_options=extra,
                    **kwargs,
                )
        except (ValueError, RuntimeError, KeyError, TypeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise BnscopeError(
                f"onnxruntime.quantization could not quantise the model ({first}). "
                "Hint: check that the model runs with onnxruntime and the data fits its inputs"
            ) from exc
        return out

    def calibrated_ranges(self) -> dict[str, tuple[float, float]]:
        """The MinMax range of every calibrated tensor (after a first :meth:`quantize`), from onnxruntime's
        own cache reader; empty where this onnxruntime has no calibration cache."""
        if not self.cached or not self.cache.exists():
            return {}
        from onnxruntime.quantization.calibrate import load_tensors_data

        ranges = {}
        for name, data in load_tensors_data(self.cache).data.items():
            lo, hi = (float(np.asarray(v, dtype=np.float64).reshape(-1)[0]) for v in data.range_value)
            ranges[name] = (lo, hi)
        return ranges


@dataclass(frozen=True)
class ActivationBits:
    int8: tuple[str, ...]
    int16: tuple[str, ...]


def activation_bits(model: onnx.ModelProto) -> ActivationBits:
    """The activation tensors a QDQ model quantises (QuantizeLinear on a non-constant), by bit width."""
    graph = model.graph
    constants = {t.name for t in graph.initializer} | {
        o for n in graph.node if n.op_type == "Constant" for o in n.output
    }
    zero_types = {t.name: t.data_type for t in graph.initializer}
    eight, sixteen = set(), set()
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] in constants:
            continue
        kind = zero_types.get(node.input[2]) if len(node.input) > 2 else onnx.TensorProto.UINT8
        name = node.input[0].removesuffix(RENAMED_OUTPUT)  # a quantised graph output keeps its name downstream
        (sixteen if kind in SIXTEEN_BIT_TYPES else eight).add(name)
    return ActivationBits(tuple(sorted(eight - sixteen)), tuple(sorted(sixteen)))
