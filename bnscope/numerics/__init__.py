"""Pure numpy maths for BatchNormalization: moments, fold formulas, drift, health, ranges, errors.

Everything here computes in float64; callers cast once to the model dtype at the end.
This package imports only numpy and the standard library; each module states its formulas:

- ``moments``: per-channel moments, merged with Chan et al.'s parallel formula;
- ``foldmath``: BN folded into the linear op before or after it;
- ``drift``: batch statistics against running statistics;
- ``health``: parameter health per channel; ``lint`` turns it into flags;
- ``ranges``: weight range growth and channel imbalance after a fold;
- ``compare``: output differences.
"""

from __future__ import annotations

from bnscope.numerics.compare import max_abs_rel_diff, relative_error
from bnscope.numerics.drift import DriftMetrics, drift_metrics
from bnscope.numerics.foldmath import (
    bn_scale_shift,
    fold_before_linear,
    fold_into_weight,
    fold_into_weight_grouped_transpose,
    scaled_along,
)
from bnscope.numerics.health import (
    collapsed_variance_channels,
    dead_channels,
    huge_scale_channels,
    negative_variance_channels,
    never_updated,
    nonfinite_channels,
)
from bnscope.numerics.moments import F64, BatchSpread, Moments, as_vector, merge_all
from bnscope.numerics.ranges import (
    channel_max_abs,
    channel_range_imbalance,
    scaled_range_metrics,
    weight_range_growth,
)

__all__ = [
    "BatchSpread",
    "DriftMetrics",
    "F64",
    "Moments",
    "as_vector",
    "bn_scale_shift",
    "channel_max_abs",
    "channel_range_imbalance",
    "collapsed_variance_channels",
    "dead_channels",
    "drift_metrics",
    "fold_before_linear",
    "fold_into_weight",
    "fold_into_weight_grouped_transpose",
    "huge_scale_channels",
    "max_abs_rel_diff",
    "merge_all",
    "negative_variance_channels",
    "never_updated",
    "nonfinite_channels",
    "relative_error",
    "scaled_along",
    "scaled_range_metrics",
    "weight_range_growth",
]
