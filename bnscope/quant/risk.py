"""The data-free risk of each folded layer, from its BN's statistics, and the same measured on data.

A folded Conv's output channel ``c`` is distributed about ``N(beta_c, gamma_c^2)`` (its BN's output,
when the running statistics describe the data). From that alone, per layer:

* the predicted range of every chain tensor (the Conv output, then its activation chain, see
  :mod:`bnscope.quant.chains`): the chain evaluated on a grid over ``beta_c +- k |gamma_c|``;
* the int8 steps across the activation's knee: ``knee width / scale``;
* the predicted damage: ``SQNR(chain(y), chain_q(y))`` in dB, ``y`` drawn from the BN statistics
  (seeded), every chain tensor quantised to uint8 with its predicted range as onnxruntime's Q/DQ
  pairs do: the lower, the riskier;
* the weight's int8 SQNR per tensor and per channel, and the int32 bias channels that overflow.

The measured damage is the same SQNR with ``y`` the real tensor and the ranges onnxruntime calibrated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bnscope.numerics import quantmath as qm
from bnscope.onnxio.graph import GraphView
from bnscope.quant.chains import Chain, follow_chain, run_chain

K_SIGMA = 4.0  # predicted range: beta +- K_SIGMA |gamma| per channel
SAMPLES = 256  # draws per channel for the predicted damage
GRID = 33  # points per channel for the predicted ranges


@dataclass(frozen=True)
class BnStats:
    gamma: np.ndarray
    beta: np.ndarray


@dataclass(frozen=True)
class LayerRisk:
    """One folded layer: what the BN statistics predict, and (after measuring) what happened."""

    bn: str
    conv: str
    chain: Chain
    channels: int
    weight_sqnr_per_tensor_db: float | None
    weight_sqnr_per_channel_db: float | None
    predicted_range: tuple[float, float]
    median_channel_span: float
    knee_steps: float | None
    predicted_sqnr_db: float
    bias_overflow: int | None = None
    measured_range: tuple[float, float] | None = None
    measured_knee_steps: float | None = None
    measured_sqnr_db: float | None = None
    measured_output_sqnr_db: float | None = None


def predict_layer(view: GraphView, conv_index: int, bn_name: str, stats: BnStats, seed: int = 0) -> LayerRisk:
    """The data-free risk of the folded Conv ``view.nodes[conv_index]`` whose BN was ``bn_name``."""
    conv = view.nodes[conv_index]
    chain = follow_chain(view, conv.output[0])
    lo, hi = qm.bn_output_ranges(stats.gamma, stats.beta, K_SIGMA)
    ranges = predicted_ranges(view, chain, lo, hi)
    rng = np.random.default_rng(seed)
    draws = stats.beta[:, None] + np.abs(stats.gamma)[:, None] * rng.standard_normal((len(stats.beta), SAMPLES))
    weight = view.constant(conv.input[1]) if len(conv.input) > 1 else None
    w = None if weight is None else weight.value
    start_range = ranges[chain.start]
    return LayerRisk(
        bn=bn_name,
        conv=view.node_name(conv_index),
        chain=chain,
        channels=len(stats.beta),
        weight_sqnr_per_tensor_db=None if w is None else qm.weight_sqnr_db(w, per_channel=False),
        weight_sqnr_per_channel_db=None if w is None else qm.weight_sqnr_db(w, per_channel=True),
        predicted_range=start_range,
        median_channel_span=float(np.median(hi - lo)),
        knee_steps=knee_steps(chain, start_range),
        predicted_sqnr_db=chain_damage_db(view, chain, _as_nchw(draws), ranges),
    )


def predicted_ranges(view: GraphView, chain: Chain, lo: np.ndarray, hi: np.ndarray) -> dict[str, tuple[float, float]]:
    """Each chain tensor's range when the start's channel ``c`` spans ``[lo_c, hi_c]`` (a grid)."""
    grid = lo[:, None] + (hi - lo)[:, None] * np.linspace(0.0, 1.0, GRID)[None, :]
    seen: dict[str, tuple[float, float]] = {}

    def record(name, x):
        seen[name] = (float(np.min(x)), float(np.max(x)))
        return x

    run_chain(view, chain, _as_nchw(grid), record)
    return seen


def knee_steps(chain: Chain, start_range: tuple[float, float], bits: int = 8) -> float | None:
    """How many quantisation steps of the chain's start fall across its knee (None: no knee)."""
    if chain.knee is None:
        return None
    return (chain.knee[1] - chain.knee[0]) / qm.activation_scale(*start_range, bits)


def chain_damage_db(view: GraphView, chain: Chain, start: np.ndarray, ranges: dict, bits: int = 8) -> float:
    """SQNR of the chain's output with every chain tensor at ``bits`` with ``ranges``, against float."""
    exact = run_chain(view, chain, start)

    def quantise(name, x):
        lo, hi = ranges.get(name, (float(np.min(x)), float(np.max(x))))
        return qm.fake_quant_activation(x, lo, hi, bits)

    damaged = run_chain(view, chain, start, quantise)
    return qm.sqnr_db(float(np.sum(exact * exact)), float(np.sum((exact - damaged) ** 2)))


def _as_nchw(per_channel: np.ndarray) -> np.ndarray:
    """(C, S) samples as an NCHW tensor (1, C, S, 1), so per-channel constants broadcast as in the graph."""
    return per_channel[None, :, :, None]


def risk_order(layers: list[LayerRisk]) -> list[LayerRisk]:
    """Riskiest first: the lowest predicted SQNR."""
    return sorted(layers, key=lambda r: (r.predicted_sqnr_db, r.conv))


def spearman_predicted_measured(layers: list[LayerRisk], field: str = "measured_sqnr_db") -> float | None:
    """Rank correlation of predicted and measured damage (``field``) over layers measured on data."""
    pairs = [(r.predicted_sqnr_db, getattr(r, field)) for r in layers if getattr(r, field) is not None]
    if not pairs:
        return None
    a, b = zip(*pairs)
    return qm.spearman(np.array(a), np.array(b))
