"""Parameter health of one BatchNormalization layer: the static lint behind ``inspect`` and ``check``.

Each rule looks at the stored parameters only (no data) and returns :class:`Flag` records with
the channel indices it concerns. Thresholds are module constants so reports can quote them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from bnscope.numerics import health

PLACEHOLDER_MIN_CHANNELS = 8  # a layer this wide with one value in every channel holds placeholders
PLACEHOLDER_HINT = (
    "re-export from the trained checkpoint, or re-estimate the statistics on your data: "
    "bnscope recalibrate MODEL --data DATA -o OUT"
)
HUGE_SCALE = 100.0  # |gamma| / sqrt(var + eps) above this blows up folded weight ranges
COLLAPSED_FACTOR = 1e-3  # var < 1e-3 * eps: the variance carries no information
# Epsilons that exporters write by default (PyTorch/Paddle 1e-5, Keras 1e-3 and 1.001e-5, MXNet 2e-5).
KNOWN_EPSILONS = (1e-5, 1e-3, 1.001e-5, 2e-5, 1e-4, 1e-6)


@dataclass(frozen=True)
class Flag:
    """One health finding. ``severity`` is "error", "warning" or "info"."""

    code: str
    severity: str
    message: str
    channels: tuple[int, ...] = ()

    def to_dict(self) -> dict:
        return {"code": self.code, "severity": self.severity, "channels": list(self.channels), "message": self.message}


SEVERITY_RANK = {"info": 0, "warning": 1, "error": 2}


def lint_parameters(
    gamma,
    beta,
    mean,
    var,
    epsilon: float,
    momentum: float,
    training_mode: str | None,
    filled: dict[str, str] | None = None,
) -> list[Flag]:
    """All health flags for one BN's parameters (any may be None when not constant).

    ``training_mode`` is what puts the layer in training mode (``"training_mode=1"``, an opset-9 BN
    with 5 outputs), None when it is an inference BN (:func:`bnscope.onnxio.bn.training_mode`).
    ``filled`` names the parameters the graph makes by filling one value into every channel
    (parameter -> the op, e.g. ``{"input_mean": "ConstantOfShape"}``)."""
    flags: list[Flag] = []
    if filled:
        flags.append(_filled_flag(filled, gamma, beta, mean, var))
    if training_mode:
        flags.append(
            Flag(
                "training_mode",
                "error",
                f"{training_mode} left in: the layer uses batch statistics at inference "
                "(bnscope recalibrate makes it an inference BN with re-estimated statistics)",
            )
        )
    flags.extend(_epsilon_flags(epsilon))
    if momentum == 0.1:
        flags.append(
            Flag(
                "momentum_convention",
                "info",
                "momentum 0.1 looks like PyTorch's convention; ONNX's is complementary (0.9)",
            )
        )
    if any(p is None for p in (gamma, beta, mean, var)):
        return flags
    values = [np.asarray(p, dtype=np.float64).reshape(-1) for p in (gamma, beta, mean, var)]
    flags.extend(_value_flags(*values, epsilon))
    if not (filled and {"input_mean", "input_var"} & set(filled)):
        flags.extend(_uniform_flags(values[2], values[3]))
    return flags


def _uniform_flags(mean, var) -> list[Flag]:
    """One running mean and variance in every channel of a wide layer (0 and 1 are never_updated's)."""
    if health.never_updated(mean, var) or not health.uniform_statistics(mean, var, PLACEHOLDER_MIN_CHANNELS):
        return []
    message = (
        f"running mean {mean[0]:g} and variance {var[0]:g} in every one of the {mean.size} channels: "
        f"placeholder statistics, not measured in training ({PLACEHOLDER_HINT})"
    )
    return [Flag("placeholder_statistics", "warning", message, tuple(range(mean.size)))]


def _filled_flag(filled: dict[str, str], *params) -> Flag:
    by_name = dict(zip(("scale", "B", "input_mean", "input_var"), params))
    channels = max((np.asarray(p).size for p in params if p is not None), default=0)
    made = ", ".join(
        f"{name} {float(np.asarray(by_name[name]).reshape(-1)[0]):g} by {op}"
        if by_name.get(name) is not None
        else f"{name} by {op}"
        for name, op in filled.items()
    )
    return Flag(
        "placeholder_parameters",
        "warning",
        f"the graph fills one value into every one of the {channels} channels ({made}): placeholder "
        f"parameters, not trained ones ({PLACEHOLDER_HINT})",
        tuple(range(channels)),
    )


def _epsilon_flags(epsilon: float) -> list[Flag]:
    if not np.isfinite(epsilon):
        return [
            Flag(
                "nonfinite_epsilon", "error", f"epsilon {epsilon:g} is not finite: every output of the layer is NaN/Inf"
            )
        ]
    if epsilon <= 0:
        return [Flag("epsilon", "error", f"epsilon {epsilon:g} is not positive: a zero variance divides by zero")]
    if not any(np.isclose(epsilon, e, rtol=1e-3, atol=0) for e in KNOWN_EPSILONS):
        return [Flag("epsilon", "info", f"epsilon {epsilon:g} is unusual (exporters write 1e-5 or 1e-3)")]
    return []


def _value_flags(gamma, beta, mean, var, eps) -> list[Flag]:
    flags = []
    bad = health.nonfinite_channels(gamma, beta, mean, var)
    if bad.size:
        flags.append(Flag("nonfinite", "error", f"NaN/Inf in parameters of {bad.size} channel(s)", _ids(bad)))
    negative = health.negative_variance_channels(var)
    if negative.size:
        flags.append(
            Flag(
                "negative_variance", "error", f"negative running variance in {negative.size} channel(s)", _ids(negative)
            )
        )
    if health.never_updated(mean, var):
        flags.append(
            Flag(
                "never_updated",
                "warning",
                "running statistics were never updated (all means 0, all variances 1): the layer was not trained or was re-initialised",
            )
        )
    dead = health.dead_channels(gamma)
    if dead.size:
        flags.append(
            Flag("dead_channels", "warning", f"{dead.size} channel(s) with gamma ~ 0 output a constant", _ids(dead))
        )
    collapsed = health.collapsed_variance_channels(var, eps, COLLAPSED_FACTOR)
    if collapsed.size:
        flags.append(
            Flag(
                "collapsed_variance",
                "warning",
                f"{collapsed.size} channel(s) with running variance below {COLLAPSED_FACTOR:g} x epsilon",
                _ids(collapsed),
            )
        )
    huge = health.huge_scale_channels(gamma, var, eps, HUGE_SCALE)
    if huge.size:
        flags.append(
            Flag(
                "huge_scale",
                "warning",
                f"{huge.size} channel(s) with |gamma|/sqrt(var+eps) > {HUGE_SCALE:g}: folding widens the weight range (int8 quantisation risk)",
                _ids(huge),
            )
        )
    return flags


def _ids(indices: np.ndarray) -> tuple[int, ...]:
    return tuple(int(i) for i in indices)


def worst_severity(flags) -> str | None:
    ranked = [SEVERITY_RANK[f.severity] for f in flags]
    if not ranked:
        return None
    return {v: k for k, v in SEVERITY_RANK.items()}[max(ranked)]
