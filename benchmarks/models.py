"""Benchmark models built in memory: ResNet-18, MobileNetV3-small, ResNet-50 and a > 2 GB model.

Public functions (all deterministic, onnx.helper + numpy only; onnxruntime is used by the
verification helpers alone)::

    resnet18_like(size=64, classes=100)              -> onnx.ModelProto  (20 BN)
    mobilenetv3_small_like(size=64, classes=100)     -> onnx.ModelProto  (34 BN)
    resnet50_like(size=224, classes=1000)            -> onnx.ModelProto  (53 BN, 25.6M params)
    big_external_model(out_dir, target_bytes=2.3e9)  -> Path of model.onnx (+ weights.bin)
    calibration_batches(model_name, batch=16, batches=10, size=64, seed=0) -> iterator of feeds
    bn_stat_check(model, feeds)                      -> per-BN |d| and variance ratios (onnxruntime)

Every model is opset 17, IR 8, float32, with one input ``"input"`` whose batch dimension is the
symbolic ``"N"``, and one output ``"logits"`` (``"output"`` for the big model). Convs have no bias
(as PyTorch exports them before a BN), weights are He-initialised, BN gamma ~ U(0.5, 1.5), beta ~
N(0, 0.1), epsilon 1e-5, momentum 0.9 (the ONNX convention; PyTorch's 0.1).

Running statistics are *real*: while a model is built, a float64 numpy forward pass carries a
"training" set of ``stats_samples`` images from :func:`calibration_batches`' distribution (a draw
separate from every calibration seed) through the layers already built, and each BN gets the
population mean and biased variance (over N, H, W) of its own input, with every earlier BN already
holding its statistics. So the calibration batches' statistics sit near the running statistics:
d = (mean - running mean) / sqrt(running var) is sampling error. Measured with
:func:`bn_stat_check` over 10 calibration batches of 16 (seed 0): ResNet-18 median |d| 0.04,
worst channel 0.27; MobileNetV3-small median 0.05, worst 0.38. Variances: median |log(var /
running var)| 0.11 (ResNet-18) and 0.19 (MobileNetV3-small); in MobileNetV3's last blocks
(2x2 maps after squeeze-excite products) channels are heavy-tailed across samples (one image
carries up to ~20% of a channel's variance), so two independent 256-image draws differ there by
a median |log var ratio| of 0.4-0.8 too: that is the distribution, not the statistics. ``resnet50_like`` computes its statistics the same way from 16
images (pass ``stats_samples=0`` for random statistics).

The input distribution is image-like and structured, not iid noise: per-sample plane waves and
Gaussian blobs mixed into the 3 channels with channel loadings, a per-sample brightness and
contrast, pixel noise, 8-bit quantisation and ImageNet mean/std normalisation (so channel means
are not zero). Built models are cached per argument set; each call returns a fresh copy.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 8
EPSILON = 1e-5
MOMENTUM = 0.9
PRODUCER = "bnscope-benchmarks"
INPUT = "input"
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])
MODEL_NAMES = ("resnet18", "mobilenetv3_small", "resnet50", "big_external")

_DIST_SEED = 20240601
_STATS_DRAW = 10**6  # the training draw; calibration seeds are small non-negative integers
_IM2COL_BYTES = 96 * 2**20  # chunk the float64 im2col matrix to about this size
_REFERENCE: dict[int, np.ndarray] = {}  # id(cached model) -> builder logits of 8 train images


# ---------------------------------------------------------------------------------------------
# The synthetic input distribution
# ---------------------------------------------------------------------------------------------


def _image_samples(n: int, size: int, draw: int, channels: int = 3) -> np.ndarray:
    """``n`` images [n, channels, size, size] float32, ImageNet-normalised; ``draw`` picks a stream.

    The channel profile (mean colour, contrast, loadings) is fixed; each sample draws 4 plane
    waves (1-4 cycles per image, random direction and phase), 3 Gaussian blobs, a brightness
    offset and a contrast factor, plus pixel noise; pixels are clipped to [0, 1] and 8-bit
    quantised.
    """
    prof = np.random.default_rng([_DIST_SEED, 0])
    base_mu = prof.uniform(0.38, 0.58, channels)
    base_sd = prof.uniform(0.16, 0.24, channels)
    k_w, k_b = 4, 3
    load_w = prof.normal(0.0, 1.0, (channels, k_w))
    load_b = prof.normal(0.0, 1.0, (channels, k_b))
    rng = np.random.default_rng([_DIST_SEED, 1, draw])
    grid = (np.arange(size) + 0.5) / size
    yy, xx = np.meshgrid(grid, grid, indexing="ij")  # [size, size]
    # plane waves [n, k_w, size, size]
    freq = rng.uniform(1.0, 4.0, (n, k_w))
    theta = rng.uniform(0.0, 2 * np.pi, (n, k_w))
    phase = rng.uniform(0.0, 2 * np.pi, (n, k_w))
    fx = (freq * np.cos(theta))[..., None, None]
    fy = (freq * np.sin(theta))[..., None, None]
    waves = np.cos(2 * np.pi * (fx * xx + fy * yy) + phase[..., None, None])
    waves *= (rng.uniform(0.5, 1.5, (n, k_w)) / math.sqrt(k_w))[..., None, None]
    # Gaussian blobs [n, k_b, size, size], amplitude +-, radius 5-25% of the image
    cy, cx = rng.uniform(0.0, 1.0, (2, n, k_b))
    rad = rng.uniform(0.05, 0.25, (n, k_b))
    amp = rng.normal(0.0, 1.2, (n, k_b))
    d2 = (yy - cy[..., None, None]) ** 2 + (xx - cx[..., None, None]) ** 2
    blobs = amp[..., None, None] * np.exp(-d2 / (2 * rad[..., None, None] ** 2))
    lw = load_w[None] + 0.3 * rng.normal(0.0, 1.0, (n, channels, k_w))
    lb = load_b[None] + 0.3 * rng.normal(0.0, 1.0, (n, channels, k_b))
    pattern = np.einsum("nck,nkhw->nchw", lw, waves) + np.einsum("nck,nkhw->nchw", lb, blobs)
    contrast = rng.uniform(0.7, 1.3, (n, 1, 1, 1))
    bright = rng.normal(0.0, 0.08, (n, 1, 1, 1)) + rng.normal(0.0, 0.03, (n, channels, 1, 1))
    c4 = (1, channels, 1, 1)
    pixels = base_mu.reshape(c4) + bright + base_sd.reshape(c4) * contrast * 0.6 * pattern
    pixels += 0.03 * rng.normal(0.0, 1.0, pixels.shape)
    pixels = np.round(np.clip(pixels, 0.0, 1.0) * 255.0) / 255.0
    mean = np.resize(IMAGENET_MEAN, channels).reshape(c4)
    std = np.resize(IMAGENET_STD, channels).reshape(c4)
    return ((pixels - mean) / std).astype(np.float32)


def _vector_samples(n: int, channels: int, spatial: tuple[int, ...], draw: int) -> np.ndarray:
    """Per-channel Gaussian data with low-rank correlation: [n, channels, *spatial] float32."""
    prof = np.random.default_rng([_DIST_SEED, 2, channels])
    mu = prof.normal(0.0, 1.0, channels)
    sd = prof.uniform(0.5, 2.0, channels)
    load = prof.normal(0.0, 1.0, (channels, 8)) / math.sqrt(8)
    rng = np.random.default_rng([_DIST_SEED, 3, draw])
    shape = (n, *spatial)
    z = rng.normal(0.0, 1.0, (*shape, 8)) @ load.T + 0.7 * rng.normal(0.0, 1.0, (*shape, channels))
    x = mu + sd * z  # [n, *spatial, channels]
    return np.moveaxis(x, -1, 1).astype(np.float32)


def calibration_batches(
    model_name: str, batch: int = 16, batches: int = 10, size: int = 64, seed: int = 0, *, channels: int = 2048
) -> Iterator[dict[str, np.ndarray]]:
    """Yields ``batches`` feed dicts ``{"input": float32 array}`` from the models' distribution.

    ``model_name`` is one of ``MODEL_NAMES``. The image models ("resnet18", "mobilenetv3_small",
    "resnet50") get [batch, 3, size, size] images; "big_external" gets [batch, channels, 1, 1]
    (``size`` is ignored; ``channels`` must match :func:`big_external_model`'s). Batch ``i`` of
    seed ``s`` is the same array on every call, and no seed overlaps the draw that set the
    running statistics.
    """
    if model_name not in MODEL_NAMES:
        raise ValueError(f"unknown model {model_name!r}; expected one of {MODEL_NAMES}")
    if seed < 0 or seed >= _STATS_DRAW:
        raise ValueError(f"seed must be in [0, {_STATS_DRAW})")
    for i in range(batches):
        draw = seed * 100_003 + i + 1
        if model_name == "big_external":
            yield {INPUT: _vector_samples(batch, channels, (1, 1), draw)}
        else:
            yield {INPUT: _image_samples(batch, size, draw)}


# ---------------------------------------------------------------------------------------------
# float64 numpy reference ops (NHWC internally)
# ---------------------------------------------------------------------------------------------


def _windows(xp: np.ndarray, kh: int, kw: int, s: int, ho: int, wo: int):
    for i in range(kh):
        for j in range(kw):
            yield i, j, xp[:, i : i + s * (ho - 1) + 1 : s, j : j + s * (wo - 1) + 1 : s, :]


def _np_conv(x: np.ndarray, w: np.ndarray, b: np.ndarray | None, stride: int, pad: int, group: int) -> np.ndarray:
    """ONNX Conv (symmetric pads, dilation 1) on NHWC float64; ``w`` is [M, C/group, kh, kw]."""
    n, h, wd, c = x.shape
    m, cg, kh, kw = w.shape
    ho, wo = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0))) if pad else x
    if group == 1:
        wm = w.transpose(2, 3, 1, 0).reshape(kh * kw * c, m)
        y = np.empty((n, ho, wo, m))
        step = max(1, _IM2COL_BYTES // (ho * wo * kh * kw * c * 8))
        for a in range(0, n, step):
            part = xp[a : a + step]
            cols = np.concatenate([win for _, _, win in _windows(part, kh, kw, stride, ho, wo)], axis=-1)
            y[a : a + step] = (cols.reshape(-1, kh * kw * c) @ wm).reshape(-1, ho, wo, m)
    elif group == c == m and cg == 1:  # depthwise
        y = np.zeros((n, ho, wo, m))
        for i, j, win in _windows(xp, kh, kw, stride, ho, wo):
            y += win * w[:, 0, i, j]
    else:
        raise NotImplementedError("grouped conv other than depthwise")
    if b is not None:
        y += b
    return y


def _np_maxpool(x: np.ndarray, k: int, stride: int, pad: int) -> np.ndarray:
    n, h, wd, c = x.shape
    ho, wo = (h + 2 * pad - k) // stride + 1, (wd + 2 * pad - k) // stride + 1
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-np.inf)
    y = np.full((n, ho, wo, c), -np.inf)
    for _, _, win in _windows(xp, k, k, stride, ho, wo):
        np.maximum(y, win, out=y)
    return y


def _hardsigmoid(x: np.ndarray) -> np.ndarray:
    return np.clip(x / 6.0 + 0.5, 0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Graph builder with an optional float64 forward pass
# ---------------------------------------------------------------------------------------------


@dataclass
class _T:
    """A tensor being built: its ONNX name, channel count and float64 NHWC value (or None)."""

    name: str
    c: int
    v: np.ndarray | None = None


class _Builder:
    def __init__(self, name: str, seed: int, forward: bool):
        self.name = name
        self.forward = forward
        self.rng = np.random.default_rng([_DIST_SEED, 7, seed])
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.n_bn = 0

    # plumbing
    def _init(self, name: str, arr: np.ndarray, dtype=np.float32) -> tuple[str, np.ndarray]:
        a = np.asarray(arr).astype(dtype)
        self.inits.append(numpy_helper.from_array(a, name))
        return name, a.astype(np.float64) if a.dtype.kind == "f" else a

    def _node(self, op: str, name: str, inputs: list[str], c: int, v, **attrs) -> _T:
        out = f"{name}_out"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        return _T(out, c, v if self.forward else None)

    def input(self, x_nchw: np.ndarray | None, channels: int, spatial) -> _T:
        self.input_info = helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, ["N", channels, *spatial])
        v = None
        if x_nchw is not None:
            v = np.moveaxis(np.asarray(x_nchw, np.float32).astype(np.float64), 1, -1)
        return _T(INPUT, channels, v)

    def model(self, out: _T, out_shape: list, doc: str, out_name: str = "logits") -> onnx.ModelProto:
        for node in self.nodes:
            node.output[:] = [out_name if o == out.name else o for o in node.output]
        graph = helper.make_graph(
            self.nodes,
            self.name,
            [self.input_info],
            [helper.make_tensor_value_info(out_name, TensorProto.FLOAT, out_shape)],
            self.inits,
        )
        model = helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", OPSET)],
            producer_name=PRODUCER,
            producer_version="1",
            doc_string=doc,
        )
        model.ir_version = IR_VERSION
        if out.v is not None:
            _REFERENCE[id(model)] = out.v[:8].copy()
        return model

    # layers
    def conv(
        self,
        name: str,
        x: _T,
        out: int,
        k: int,
        *,
        stride: int = 1,
        pad: int | None = None,
        group: int = 1,
        bias: bool = False,
    ) -> _T:
        pad = k // 2 if pad is None else pad
        fan_in = x.c // group * k * k
        wname, w = self._init(
            f"{name}.weight", self.rng.normal(0.0, math.sqrt(2.0 / fan_in), (out, x.c // group, k, k))
        )
        inputs, b = [x.name, wname], None
        if bias:
            bname, b = self._init(f"{name}.bias", self.rng.uniform(-0.2, 0.2, out))
            inputs.append(bname)
        v = _np_conv(x.v, w, b, stride, pad, group) if self.forward else None
        return self._node(
            "Conv",
            name,
            inputs,
            out,
            v,
            kernel_shape=[k, k],
            strides=[stride] * 2,
            pads=[pad] * 4,
            dilations=[1, 1],
            group=group,
        )

    def bn(self, name: str, x: _T) -> _T:
        c = x.c
        if self.forward:
            axes = tuple(range(x.v.ndim - 1))
            mean, var = x.v.mean(axis=axes), x.v.var(axis=axes)
        else:
            mean = self.rng.normal(0.0, 0.5, c)
            var = self.rng.uniform(0.3, 3.0, c)
        params = [
            self._init(f"{name}.weight", self.rng.uniform(0.5, 1.5, c)),
            self._init(f"{name}.bias", self.rng.normal(0.0, 0.1, c)),
            self._init(f"{name}.running_mean", mean),
            self._init(f"{name}.running_var", var),
        ]
        v = None
        if self.forward:
            (_, g), (_, b), (_, m), (_, s2) = params
            v = g * (x.v - m) / np.sqrt(s2 + EPSILON) + b
        self.n_bn += 1
        return self._node(
            "BatchNormalization", name, [x.name] + [p[0] for p in params], c, v, epsilon=EPSILON, momentum=MOMENTUM
        )

    def act(self, kind: str, name: str, x: _T) -> _T:
        f = {
            "Relu": lambda a: np.maximum(a, 0.0),
            "HardSwish": lambda a: a * _hardsigmoid(a),
            "HardSigmoid": _hardsigmoid,
        }[kind]
        attrs = {"alpha": 1.0 / 6.0, "beta": 0.5} if kind == "HardSigmoid" else {}
        return self._node(kind, name, [x.name], x.c, f(x.v) if self.forward else None, **attrs)

    def conv_bn(
        self,
        name: str,
        x: _T,
        out: int,
        k: int,
        act: str | None = None,
        *,
        stride: int = 1,
        pad: int | None = None,
        group: int = 1,
        bn_name: str | None = None,
    ) -> _T:
        h = self.bn(bn_name or f"{name}_bn", self.conv(name, x, out, k, stride=stride, pad=pad, group=group))
        return self.act(act, f"{name}_{act.lower()}", h) if act else h

    def add(self, name: str, a: _T, b: _T) -> _T:
        return self._node("Add", name, [a.name, b.name], a.c, a.v + b.v if self.forward else None)

    def mul(self, name: str, a: _T, b: _T) -> _T:
        return self._node("Mul", name, [a.name, b.name], a.c, a.v * b.v if self.forward else None)

    def maxpool(self, name: str, x: _T, k: int, stride: int, pad: int) -> _T:
        v = _np_maxpool(x.v, k, stride, pad) if self.forward else None
        return self._node("MaxPool", name, [x.name], x.c, v, kernel_shape=[k, k], strides=[stride] * 2, pads=[pad] * 4)

    def gap(self, name: str, x: _T) -> _T:
        v = x.v.mean(axis=(1, 2), keepdims=True) if self.forward else None
        return self._node("GlobalAveragePool", name, [x.name], x.c, v)

    def flatten(self, name: str, x: _T) -> _T:
        v = x.v.reshape(x.v.shape[0], -1) if self.forward else None
        return self._node("Flatten", name, [x.name], x.c, v, axis=1)

    def gemm(self, name: str, x: _T, out: int) -> _T:
        wname, w = self._init(f"{name}.weight", self.rng.normal(0.0, math.sqrt(1.0 / x.c), (out, x.c)))
        bname, b = self._init(f"{name}.bias", self.rng.uniform(-0.1, 0.1, out))
        v = x.v @ w.T + b if self.forward else None
        return self._node("Gemm", name, [x.name, wname, bname], out, v, transB=1)


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    return m


def _train_images(stats_samples: int, size: int) -> np.ndarray | None:
    return _image_samples(stats_samples, size, _STATS_DRAW) if stats_samples > 0 else None


# ---------------------------------------------------------------------------------------------
# ResNet-18 / ResNet-50
# ---------------------------------------------------------------------------------------------


def _basic_block(b: _Builder, name: str, x: _T, out: int, stride: int) -> _T:
    h = b.conv_bn(f"{name}.conv1", x, out, 3, "Relu", stride=stride, bn_name=f"{name}.bn1")
    h = b.conv_bn(f"{name}.conv2", h, out, 3, bn_name=f"{name}.bn2")
    skip = x
    if stride != 1 or x.c != out:
        skip = b.conv_bn(f"{name}.downsample.0", x, out, 1, stride=stride, pad=0, bn_name=f"{name}.downsample.1")
    return b.act("Relu", f"{name}.relu", b.add(f"{name}.add", h, skip))


def _bottleneck(b: _Builder, name: str, x: _T, width: int, stride: int) -> _T:
    out = width * 4
    h = b.conv_bn(f"{name}.conv1", x, width, 1, "Relu", pad=0, bn_name=f"{name}.bn1")
    h = b.conv_bn(f"{name}.conv2", h, width, 3, "Relu", stride=stride, bn_name=f"{name}.bn2")
    h = b.conv_bn(f"{name}.conv3", h, out, 1, pad=0, bn_name=f"{name}.bn3")
    skip = x
    if stride != 1 or x.c != out:
        skip = b.conv_bn(f"{name}.downsample.0", x, out, 1, stride=stride, pad=0, bn_name=f"{name}.downsample.1")
    return b.act("Relu", f"{name}.relu", b.add(f"{name}.add", h, skip))


def _resnet(
    name: str,
    size: int,
    classes: int,
    blocks: tuple[int, ...],
    bottleneck: bool,
    stats_samples: int,
    stats_size: int,
    seed: int,
    doc: str,
) -> onnx.ModelProto:
    b = _Builder(name, seed, forward=stats_samples > 0)
    x = b.input(_train_images(stats_samples, stats_size), 3, [size, size])
    h = b.conv_bn("conv1", x, 64, 7, "Relu", stride=2, pad=3, bn_name="bn1")
    h = b.maxpool("maxpool", h, 3, 2, 1)
    for stage, (width, n) in enumerate(zip((64, 128, 256, 512), blocks), start=1):
        for i in range(n):
            stride = 2 if stage > 1 and i == 0 else 1
            block = _bottleneck if bottleneck else _basic_block
            h = block(b, f"layer{stage}.{i}", h, width, stride)
    logits = b.gemm("fc", b.flatten("flatten", b.gap("avgpool", h)), classes)
    return b.model(logits, ["N", classes], doc)


@functools.lru_cache(maxsize=8)
def _resnet18_cached(size: int, classes: int, stats_samples: int) -> onnx.ModelProto:
    doc = (
        "ResNet-18 (torchvision layout) with He-init weights and BN running statistics equal "
        f"to the population statistics of {stats_samples} synthetic {size}x{size} images "
        "(bnscope benchmarks/models.py)."
    )
    return _resnet("resnet18_like", size, classes, (2, 2, 2, 2), False, stats_samples, size, 18, doc)


def resnet18_like(size: int = 64, classes: int = 100, *, stats_samples: int = 256) -> onnx.ModelProto:
    """ResNet-18: 7x7/2 stem Conv-BN-ReLU, 3x3/2 MaxPool, 4 stages x 2 BasicBlocks (64, 128,
    256, 512 channels; 1x1/2 Conv-BN downsample shortcuts), GAP, Flatten, Gemm. 20 BN, ~11.2M
    parameters (at 100 classes). Running stats from ``stats_samples`` images at ``size``."""
    return _copy(_resnet18_cached(size, classes, stats_samples))


@functools.lru_cache(maxsize=4)
def _resnet50_cached(size: int, classes: int, stats_samples: int, stats_size: int) -> onnx.ModelProto:
    how = (
        f"the population statistics of {stats_samples} synthetic {stats_size}x{stats_size} images"
        if stats_samples
        else "random (mean N(0, 0.5), var U(0.3, 3))"
    )
    doc = (
        f"ResNet-50 v1.5 (torchvision layout), He-init weights, BN running statistics {how} "
        "(bnscope benchmarks/models.py)."
    )
    return _resnet("resnet50_like", size, classes, (3, 4, 6, 3), True, stats_samples, stats_size, 50, doc)


def resnet50_like(
    size: int = 224, classes: int = 1000, *, stats_samples: int = 16, stats_size: int | None = None
) -> onnx.ModelProto:
    """ResNet-50 v1.5 (stride on the 3x3 conv): 53 BN, 25.6M parameters at 1000 classes.

    Meant for fold timing. Running statistics come from a float64 forward pass of
    ``stats_samples`` images at ``stats_size`` (default ``size``; about 5 s at 224 and 16
    samples, cached), or are random with ``stats_samples=0`` (instant; outputs stay finite).
    """
    return _copy(_resnet50_cached(size, classes, stats_samples, stats_size or size))


# ---------------------------------------------------------------------------------------------
# MobileNetV3-small
# ---------------------------------------------------------------------------------------------


def _make_divisible(v: float, divisor: int = 8) -> int:
    new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
    return new_v + divisor if new_v < 0.9 * v else new_v


# torchvision's mobilenet_v3_small: kernel, expanded, out, squeeze-excite, activation, stride
_MBV3_SMALL = (
    (3, 16, 16, True, "Relu", 2),
    (3, 72, 24, False, "Relu", 2),
    (3, 88, 24, False, "Relu", 1),
    (5, 96, 40, True, "HardSwish", 2),
    (5, 240, 40, True, "HardSwish", 1),
    (5, 240, 40, True, "HardSwish", 1),
    (5, 120, 48, True, "HardSwish", 1),
    (5, 144, 48, True, "HardSwish", 1),
    (5, 288, 96, True, "HardSwish", 2),
    (5, 576, 96, True, "HardSwish", 1),
    (5, 576, 96, True, "HardSwish", 1),
)


def _squeeze_excite(b: _Builder, name: str, x: _T) -> _T:
    s = b.gap(f"{name}.avgpool", x)
    s = b.act("Relu", f"{name}.relu", b.conv(f"{name}.fc1", s, _make_divisible(x.c // 4), 1, pad=0, bias=True))
    s = b.act("HardSigmoid", f"{name}.hardsigmoid", b.conv(f"{name}.fc2", s, x.c, 1, pad=0, bias=True))
    return b.mul(f"{name}.mul", x, s)


@functools.lru_cache(maxsize=8)
def _mobilenetv3_cached(size: int, classes: int, stats_samples: int) -> onnx.ModelProto:
    b = _Builder("mobilenetv3_small_like", 3, forward=stats_samples > 0)
    x = b.input(_train_images(stats_samples, size), 3, [size, size])
    h = b.conv_bn("features.0.0", x, 16, 3, "HardSwish", stride=2, bn_name="features.0.1")
    for i, (k, exp, out, se, act, stride) in enumerate(_MBV3_SMALL, start=1):
        p = f"features.{i}.block"
        inp, j = h, 0
        if exp != h.c:
            h = b.conv_bn(f"{p}.{j}.0", h, exp, 1, act, pad=0, bn_name=f"{p}.{j}.1")
            j += 1
        h = b.conv_bn(f"{p}.{j}.0", h, exp, k, act, stride=stride, group=exp, bn_name=f"{p}.{j}.1")
        j += 1
        if se:
            h = _squeeze_excite(b, f"{p}.{j}", h)
            j += 1
        h = b.conv_bn(f"{p}.{j}.0", h, out, 1, pad=0, bn_name=f"{p}.{j}.1")
        if stride == 1 and inp.c == out:
            h = b.add(f"features.{i}.add", h, inp)
    h = b.conv_bn("features.12.0", h, 576, 1, "HardSwish", pad=0, bn_name="features.12.1")
    h = b.flatten("flatten", b.gap("avgpool", h))
    h = b.act("HardSwish", "classifier.1", b.gemm("classifier.0", h, 1024))
    logits = b.gemm("classifier.3", h, classes)
    doc = (
        "MobileNetV3-small (torchvision layout, no dropout) with He-init weights and BN "
        f"running statistics equal to the population statistics of {stats_samples} synthetic "
        f"{size}x{size} images (bnscope benchmarks/models.py)."
    )
    return b.model(logits, ["N", classes], doc)


def mobilenetv3_small_like(size: int = 64, classes: int = 100, *, stats_samples: int = 256) -> onnx.ModelProto:
    """MobileNetV3-small: 3x3/2 stem Conv-BN-HardSwish, 11 inverted residual blocks (expand 1x1
    Conv-BN-act unless the expansion equals the input width, depthwise kxk Conv-BN-act, optional
    squeeze-excite GAP-Conv-ReLU-Conv-HardSigmoid-Mul, project 1x1 Conv-BN, Add when shapes
    match), 1x1 Conv-BN-HardSwish to 576, GAP, Gemm-HardSwish-Gemm. 34 BN."""
    return _copy(_mobilenetv3_cached(size, classes, stats_samples))


# ---------------------------------------------------------------------------------------------
# A > 2 GB model with external data, written tensor by tensor
# ---------------------------------------------------------------------------------------------

_BIG_FORMAT = "3"  # bump when the layout below changes (invalidates reuse of an existing file)


def big_external_model(
    out_dir: str | os.PathLike,
    target_bytes: float = 2.3e9,
    *,
    channels: int = 2048,
    kind: str = "conv",
    depth: int | None = 4,
    seed: int = 0,
    reuse: bool = True,
) -> Path:
    """Writes ``out_dir/model.onnx`` + ``out_dir/weights.bin`` (2.32 GB, 138 BN at the default)
    and returns the model path.

    Layers are ``channels``-wide, each weight [C, C] float32 (16.8 MB at 2048):
    ``kind="conv"``: 1x1 Conv (no bias) -> BN -> ReLU on [N, C, H, W] (H, W symbolic;
    :func:`calibration_batches` ("big_external") feeds 1x1); ``kind="gemm"``: Gemm (transB, no
    bias) -> BN -> ReLU on [N, C]. Layers are added until the weights reach ``target_bytes``.
    They form parallel chains of ``depth`` layers, each chain reading ``"input"``, summed by
    one ``Sum`` into ``"output"``; ``depth=None`` makes one chain of every layer.

    Why chains: with BN at fixed statistics, a Conv/Gemm-BN-ReLU layer never contracts a
    perturbation (Gaussian Poincare: Var f(z) <= E f'(z)^2), so a random deep stack amplifies
    the sampling error of its own running statistics by about 1.2x per layer; past ~30 layers
    unseen inputs drift far from the statistics (|d| ~ 1e5 at 138 layers), chains of 4 keep
    |d| at the sampling-noise level.

    Nothing large is ever held as one protobuf: each tensor's bytes are appended to
    ``weights.bin`` as they are drawn (offsets aligned to 4096) and its TensorProto only carries
    ``external_data`` (location, offset, length) with ``data_location=EXTERNAL``; tensors under
    1 KiB stay inline, as ``onnx.save(..., size_threshold=1024)`` would. Running statistics are
    real: 128 samples of the "big_external" distribution are propagated (float32) as the layers
    are written. With ``reuse`` an existing model written with the same arguments is returned
    as is (checked by metadata and the bin file's size). Takes ~30 s at 2.3 GB.
    """
    if kind not in ("conv", "gemm"):
        raise ValueError("kind must be 'conv' or 'gemm'")
    if depth is not None and depth < 1:
        raise ValueError("depth must be >= 1 or None")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model_path, bin_path = out / "model.onnx", out / "weights.bin"
    stamp = f"{_BIG_FORMAT}:{int(target_bytes)}:{channels}:{kind}:{depth}:{seed}"
    if reuse and model_path.exists() and bin_path.exists():
        try:
            m = onnx.load(str(model_path), load_external_data=False)
            props = {p.key: p.value for p in m.metadata_props}
            if props.get("bnscope_bench") == stamp and int(props.get("weights_bytes", -1)) == bin_path.stat().st_size:
                return model_path
        except Exception:
            pass

    c = channels
    layers = max(1, math.ceil(target_bytes / (c * c * 4)))
    depth = depth or layers
    rng = np.random.default_rng([_DIST_SEED, 11, seed])
    spatial = (1, 1) if kind == "conv" else ()
    x0 = _vector_samples(128, c, spatial, _STATS_DRAW).reshape(128, c)  # rows (float32)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    ends: list[str] = []
    offset = 0

    def put(f, name: str, arr: np.ndarray) -> None:
        nonlocal offset
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        if arr.nbytes < 1024:
            inits.append(numpy_helper.from_array(arr, name))
            return
        pad = (-offset) % 4096
        if pad:
            f.write(b"\0" * pad)
            offset += pad
        f.write(arr.tobytes())
        t = TensorProto(
            name=name, data_type=TensorProto.FLOAT, dims=list(arr.shape), data_location=TensorProto.EXTERNAL
        )
        for key, value in (("location", bin_path.name), ("offset", str(offset)), ("length", str(arr.nbytes))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        inits.append(t)
        offset += arr.nbytes

    tmp_bin = bin_path.with_suffix(".bin.tmp")
    with open(tmp_bin, "wb") as f:
        for i in range(layers):
            if i % depth == 0:
                cur, x = INPUT, x0
            p = f"layer{i}"
            w = rng.standard_normal((c, c), dtype=np.float32)
            w *= np.float32(math.sqrt(2.0 / c))
            y = x @ w.T  # both kinds: out[n, o] = sum_i x[n, i] w[o, i]
            mean = y.astype(np.float64).mean(axis=0)
            var = y.astype(np.float64).var(axis=0)
            gamma = rng.uniform(0.5, 1.5, c)
            beta = rng.normal(0.0, 0.1, c)
            if kind == "conv":
                put(f, f"{p}.conv.weight", w.reshape(c, c, 1, 1))
                nodes.append(
                    helper.make_node(
                        "Conv", [cur, f"{p}.conv.weight"], [f"{p}.conv_out"], name=f"{p}.conv", kernel_shape=[1, 1]
                    )
                )
                lin = f"{p}.conv_out"
            else:
                put(f, f"{p}.fc.weight", w)
                nodes.append(
                    helper.make_node("Gemm", [cur, f"{p}.fc.weight"], [f"{p}.fc_out"], name=f"{p}.fc", transB=1)
                )
                lin = f"{p}.fc_out"
            bn = [f"{p}.bn.{q}" for q in ("weight", "bias", "running_mean", "running_var")]
            for name, arr in zip(bn, (gamma, beta, mean, var)):
                put(f, name, arr)
            nodes.append(
                helper.make_node(
                    "BatchNormalization",
                    [lin, *bn],
                    [f"{p}.bn_out"],
                    name=f"{p}.bn",
                    epsilon=EPSILON,
                    momentum=MOMENTUM,
                )
            )
            cur = f"{p}.relu_out"
            nodes.append(helper.make_node("Relu", [f"{p}.bn_out"], [cur], name=f"{p}.relu"))
            if i % depth == depth - 1 or i == layers - 1:
                ends.append(cur)
            g32, b32 = gamma.astype(np.float32), beta.astype(np.float32)
            m32, v32 = mean.astype(np.float32), var.astype(np.float32)
            x = np.maximum(g32 * (y - m32) / np.sqrt(v32 + np.float32(EPSILON)) + b32, 0.0)
    if len(ends) == 1:
        for node in nodes:
            node.output[:] = ["output" if o == ends[0] else o for o in node.output]
    else:
        nodes.append(helper.make_node("Sum", ends, ["output"], name="sum"))
    shape = ["N", c, "H", "W"] if kind == "conv" else ["N", c]
    graph = helper.make_graph(
        nodes,
        f"big_external_{kind}",
        [helper.make_tensor_value_info(INPUT, TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("output", TensorProto.FLOAT, shape)],
        inits,
    )
    what = "1x1 Conv" if kind == "conv" else "Gemm"
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name=PRODUCER,
        producer_version="1",
        doc_string=f"{layers} x ({what} {c}x{c} -> BN -> ReLU) in {len(ends)} parallel chains of "
        f"{depth}, summed; external data in weights.bin (bnscope benchmarks/models.py)",
    )
    model.ir_version = IR_VERSION
    onnx.helper.set_model_props(model, {"bnscope_bench": stamp, "weights_bytes": str(offset)})
    tmp_bin.replace(bin_path)
    tmp_model = model_path.with_suffix(".onnx.tmp")
    tmp_model.write_bytes(model.SerializeToString())
    tmp_model.replace(model_path)
    return model_path


# ---------------------------------------------------------------------------------------------
# Verification helpers (onnxruntime)
# ---------------------------------------------------------------------------------------------


def bn_inputs(model: onnx.ModelProto) -> list[tuple[str, str]]:
    """(BN node name, its input tensor) for every BatchNormalization, in graph order."""
    return [(n.name, n.input[0]) for n in model.graph.node if n.op_type == "BatchNormalization"]


def bn_stat_check(model: onnx.ModelProto, feeds) -> dict[str, dict[str, float]]:
    """Compares each BN's running stats with the population stats of its input over ``feeds``.

    Runs onnxruntime at ``ORT_DISABLE_ALL`` with every BN input as an extra output, accumulates
    float64 per-channel moments over all feeds, and returns per BN:
    ``max_abs_d`` / ``median_abs_d`` with d = (mean - running_mean) / sqrt(running_var + eps),
    and ``max_abs_log_var_ratio`` / ``median_abs_log_var_ratio`` of var / running_var.
    """
    import onnxruntime as ort

    m = _copy(model)
    taps = bn_inputs(m)
    existing = {o.name for o in m.graph.output}
    for _, t in taps:
        if t not in existing:
            m.graph.output.append(helper.make_empty_tensor_value_info(t))
            existing.add(t)
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    so.log_severity_level = 3
    sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
    names = [t for _, t in taps]
    acc: dict[str, list] = {t: [0, 0.0, 0.0] for t in names}
    for feed in feeds:
        for t, y in zip(names, sess.run(names, dict(feed))):
            y = np.moveaxis(np.asarray(y, np.float64), 1, -1).reshape(-1, y.shape[1])
            a = acc[t]
            a[0] += y.shape[0]
            a[1] = a[1] + y.sum(axis=0)
            a[2] = a[2] + (y * y).sum(axis=0)
    inits = {i.name: i for i in m.graph.initializer}
    by_node = {n.name: n for n in m.graph.node}
    result = {}
    for node_name, t in taps:
        node = by_node[node_name]
        rm = numpy_helper.to_array(inits[node.input[3]]).astype(np.float64)
        rv = numpy_helper.to_array(inits[node.input[4]]).astype(np.float64)
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        n, s, ss = acc[t]
        mean = s / n
        var = np.maximum(ss / n - mean * mean, 0.0)
        d = np.abs(mean - rm) / np.sqrt(rv + eps)
        lr = np.abs(np.log((var + eps) / (rv + eps)))
        result[node_name] = {
            "max_abs_d": float(d.max()),
            "median_abs_d": float(np.median(d)),
            "max_abs_log_var_ratio": float(lr.max()),
            "median_abs_log_var_ratio": float(np.median(lr)),
        }
    return result


def reference_pair(
    model_name: str, size: int = 64, classes: int = 100, stats_samples: int = 256
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """(feed of the first 8 training images, the builder's float64 logits for them) for
    "resnet18" / "mobilenetv3_small" / "resnet50" built with the same arguments: onnxruntime's
    output of the model on the feed must match the logits (this checks the ONNX graph against
    the numpy arithmetic that set the running statistics). For resnet50 ``size`` is both the
    input and the stats size, and ``stats_samples`` should be 16 (its default)."""
    if model_name == "resnet18":
        model = _resnet18_cached(size, classes, stats_samples)
    elif model_name == "mobilenetv3_small":
        model = _mobilenetv3_cached(size, classes, stats_samples)
    elif model_name == "resnet50":
        model = _resnet50_cached(size, classes, stats_samples, size)
    else:
        raise ValueError(model_name)
    logits = _REFERENCE[id(model)]
    feed = {INPUT: _train_images(stats_samples, size)[: len(logits)]}
    return feed, logits


def count_params(model: onnx.ModelProto) -> int:
    """Number of elements over all initializers (external data not loaded: dims only)."""
    return int(sum(np.prod(t.dims, dtype=np.int64) for t in model.graph.initializer))
