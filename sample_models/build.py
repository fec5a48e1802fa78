"""Build the sample ONNX models that bnscope's tests, docs and benchmarks use.

Run from the repository root::

    python sample_models/build.py            # rebuild into sample_models/ and verify
    python sample_models/build.py --out DIR  # rebuild elsewhere

Every BatchNormalization's running statistics are *real*: the population mean and biased
variance (over N and every spatial axis) of the BN's input when a synthetic "training" set is
pushed through the model with a float64 numpy forward pass, layer by layer, with every earlier
BN already holding its own statistics. The weights are random (He init); gamma is drawn around
1 and beta around 0; epsilon is 1e-5 and momentum 0.9 (the ONNX convention, PyTorch's 0.1).

Each input distribution is structured, not iid noise: per-channel offsets and scales, smooth
random plane waves mixed across channels with per-sample loadings, a per-sample channel offset
and a little pixel noise; image inputs are 8-bit quantised and normalised with the ImageNet
mean/std, so their channel means are not zero. Calibration files (``*_calib.npz``) are new
draws from the same distribution; ``resnet_small_shifted.npz`` is the calibration set under a
contrast/brightness shift (x * 1.8 + 0.7).

Only onnx.helper and numpy build the models; onnxruntime is used by ``verify_sample`` only.
Everything is deterministic: each model has its own fixed seed, and the ``.npz`` files are
written with fixed zip timestamps, so a rebuild leaves the folder byte-identical on the same
platform (BLAS may change a float32 last bit elsewhere).
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import itertools
import math
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

HERE = Path(__file__).resolve().parent
PRODUCER = "bnscope-sample-builder"
PRODUCER_VERSION = "1"
EPSILON = 1e-5
MOMENTUM = 0.9
OPSET = 17
IR_VERSION = 8
IMAGENET_MEAN = np.array([0.485, 0.456, 0.406])
IMAGENET_STD = np.array([0.229, 0.224, 0.225])
SHIFT_SCALE, SHIFT_OFFSET = 1.8, 0.7

# ---------------------------------------------------------------------------------------------
# Synthetic training distributions
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Distribution:
    """A structured input distribution; ``sample`` draws from it with its own seed.

    x[n, c, *s] = mu[c] + scale[c] * (sum_k load[n, c, k] * amp[n, k] * wave[n, k, *s]
                                      + offset[n, c] + noise)
    with ``load = base_load[c, k] + 0.3 * N(0, 1)``, ``|amp| ~ U(0.6, 1.4) / sqrt(k)`` and plane
    waves of 1 to 4 cycles per extent (so a sample's spatial mean is near its channel's mean).
    ``image=True`` maps that to [0, 1] pixels, quantises to 8 bits and normalises with the
    ImageNet mean/std instead of applying mu/scale.
    """

    channels: int
    spatial: tuple[int, ...]
    seed: int
    image: bool = False
    waves: int = 4

    def _profile(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rng = np.random.default_rng([self.seed, 0])
        base_load = rng.normal(0.0, 1.0, (self.channels, self.waves))
        if self.image:
            mu, scale = rng.uniform(0.4, 0.62, self.channels), rng.uniform(0.13, 0.2, self.channels)
            return mu, scale, base_load
        return rng.normal(0.0, 1.0, self.channels), rng.uniform(0.5, 2.0, self.channels), base_load

    def sample(self, n: int, draw: int) -> np.ndarray:
        """Draws ``n`` samples as float64; ``draw`` selects an independent stream."""
        mu, scale, base_load = self._profile()
        rng = np.random.default_rng([self.seed, 1 + draw])
        c, k, sp = self.channels, self.waves, self.spatial
        wave = _plane_waves(rng, n, k, sp)
        amp = rng.uniform(0.6, 1.4, (n, k)) * rng.choice([-1.0, 1.0], (n, k)) / math.sqrt(k)
        load = base_load[None] + 0.3 * rng.normal(0.0, 1.0, (n, c, k))
        x = np.einsum("nck,nk...->nc...", load * amp[:, None, :], wave)
        x += 0.15 * rng.normal(0.0, 1.0, (n, c) + (1,) * len(sp))
        x += 0.1 * rng.normal(0.0, 1.0, x.shape)
        bshape = (1, c) + (1,) * len(sp)
        if not self.image:
            return mu.reshape(bshape) + scale.reshape(bshape) * x
        pixels = np.clip(mu.reshape(bshape) + scale.reshape(bshape) * x, 0.0, 1.0)
        pixels = np.round(pixels * 255) / 255
        return (pixels - IMAGENET_MEAN[:c].reshape(bshape)) / IMAGENET_STD[:c].reshape(bshape)


def _plane_waves(rng: np.random.Generator, n: int, k: int, spatial: tuple[int, ...]) -> np.ndarray:
    """Returns cos(2 pi f.x + phase) of shape [n, k, *spatial]; constant per sample if no axes."""
    grids = np.meshgrid(*[np.arange(s) / s for s in spatial], indexing="ij")
    size = (n, k, len(spatial))
    freq = rng.uniform(1.0, 4.0, size) * rng.choice([-1.0, 1.0], size)
    arg = np.broadcast_to(rng.uniform(0, 2 * np.pi, (n, k)).reshape((n, k) + (1,) * len(spatial)),
                          (n, k, *spatial)).copy()
    for d, grid in enumerate(grids):
        arg += 2 * np.pi * freq[:, :, d].reshape((n, k) + (1,) * len(spatial)) * grid
    return np.cos(arg)


# ---------------------------------------------------------------------------------------------
# float64 reference implementations of the ops the samples use
# ---------------------------------------------------------------------------------------------


def np_conv(x, w, b, strides, pads, group):
    """ONNX Conv (dilation 1) in float64 for any number of spatial axes."""
    n, c, nd, m, k = x.shape[0], x.shape[1], x.ndim - 2, w.shape[0], w.shape[2:]
    cg, mg = c // group, m // group
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)])
    out = [(xp.shape[2 + i] - k[i]) // strides[i] + 1 for i in range(nd)]
    xg = np.moveaxis(xp.reshape(n, group, cg, *xp.shape[2:]), (1, 2), (0, -1))  # [g, n, *s, cg]
    wg = w.reshape(group, mg, cg, *k)
    y = np.zeros((group, n, *out, mg))
    for off in itertools.product(*(range(kk) for kk in k)):
        window = tuple(slice(o, o + s * (q - 1) + 1, s) for o, s, q in zip(off, strides, out))
        xs = xg[(slice(None), slice(None)) + window].reshape(group, -1, cg)
        y += (xs @ wg[(slice(None),) * 3 + off].transpose(0, 2, 1)).reshape(y.shape)
    y = np.moveaxis(y, (0, -1), (1, 2)).reshape(n, m, *out)
    return y if b is None else y + b.reshape((1, m) + (1,) * nd)


def np_conv_transpose(x, w, b, strides, pads, group):
    """ONNX ConvTranspose (dilation 1, no output_padding) in float64."""
    n, c, nd, k, sp = x.shape[0], x.shape[1], x.ndim - 2, w.shape[2:], x.shape[2:]
    cg, mg = c // group, w.shape[1]
    full = [(sp[i] - 1) * strides[i] + k[i] for i in range(nd)]
    xg = np.moveaxis(x.reshape(n, group, cg, *sp), (1, 2), (0, -1)).reshape(group, -1, cg)
    wg = w.reshape(group, cg, mg, *k)
    y = np.zeros((group, n, *full, mg))
    for off in itertools.product(*(range(kk) for kk in k)):
        window = tuple(slice(o, o + s * (q - 1) + 1, s) for o, s, q in zip(off, strides, sp))
        y[(slice(None), slice(None)) + window] += (xg @ wg[(slice(None),) * 3 + off]).reshape(
            group, n, *sp, mg)
    y = np.moveaxis(y, (0, -1), (1, 2)).reshape(n, group * mg, *full)
    crop = tuple(slice(pads[i], full[i] - pads[i + nd]) for i in range(nd))
    y = y[(slice(None), slice(None)) + crop]
    return y if b is None else y + b.reshape((1, -1) + (1,) * nd)


def np_batchnorm(x, scale, bias, mean, var, eps=EPSILON):
    """ONNX BatchNormalization (inference) in float64, channel axis 1."""
    shape = (1, -1) + (1,) * (x.ndim - 2)
    r = lambda a: np.asarray(a, np.float64).reshape(shape)  # noqa: E731
    return r(scale) * (x - r(mean)) / np.sqrt(r(var) + eps) + r(bias)


def population_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and biased variance over N and every spatial axis, in float64."""
    axes = (0,) + tuple(range(2, x.ndim))
    x = np.asarray(x, np.float64)
    return x.mean(axis=axes), x.var(axis=axes)


# ---------------------------------------------------------------------------------------------
# A graph builder that runs the float64 forward pass as it goes
# ---------------------------------------------------------------------------------------------

TensorSource = Callable[[str, np.ndarray], str]


class GraphBuilder:
    """Collects nodes and initializers, and each tensor's float64 value on the training set."""

    def __init__(self, name: str, seed: int):
        self.name = name
        self.rng = np.random.default_rng([seed, 99])
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self.values: dict[str, np.ndarray] = {}
        self.true_stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}

    # -- graph plumbing -----------------------------------------------------------------------
    def add_input(self, name: str, train: np.ndarray, shape: list) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, shape))
        self.values[name] = np.asarray(train, np.float32).astype(np.float64)
        return name

    def add_output(self, tensor: str, shape: list | None = None, name: str | None = None) -> None:
        """Marks ``tensor`` as a graph output, renamed to ``name`` if given."""
        if name is not None and name != tensor:
            for node in self.nodes:
                node.output[:] = [name if o == tensor else o for o in node.output]
                node.input[:] = [name if i == tensor else i for i in node.input]
            self.values[name] = self.values.pop(tensor)
        self.outputs.append(helper.make_tensor_value_info(name or tensor, TensorProto.FLOAT, shape))

    def initializer(self, name: str, array: np.ndarray, dtype=np.float32) -> str:
        arr = np.asarray(array).astype(dtype)
        self.initializers.append(numpy_helper.from_array(arr, name))
        self.values[name] = arr.astype(np.float64) if arr.dtype.kind == "f" else arr
        return name

    def constant(self, name: str, array: np.ndarray, dtype=np.float32) -> str:
        """Emits a Constant node named ``<name>_const`` whose output is ``name``."""
        arr = np.asarray(array).astype(dtype)
        node_name = name.replace(".", "_") + "_const"
        self.nodes.append(helper.make_node("Constant", [], [name], name=node_name,
                                           value=numpy_helper.from_array(arr, name)))
        self.values[name] = arr.astype(np.float64) if arr.dtype.kind == "f" else arr
        return name

    def node(self, op: str, name: str, inputs: list[str], value: np.ndarray, **attrs) -> str:
        out = f"{name}_out"
        self.nodes.append(helper.make_node(op, inputs, [out], name=name, **attrs))
        self.values[out] = value
        return out

    def model(self, doc: str, *, opset: int = OPSET, ir_version: int = IR_VERSION
              ) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs,
                                  self.initializers)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)],
                                  producer_name=PRODUCER, producer_version=PRODUCER_VERSION,
                                  doc_string=doc)
        model.ir_version = ir_version
        return model

    # -- layers ------------------------------------------------------------------------------
    def conv(self, name: str, x: str, out_ch: int, kernel: int, *, stride: int = 1,
             pad: int | None = None, group: int = 1, bias: bool = True,
             weight_source: TensorSource | None = None) -> str:
        xv = self.values[x]
        nd, c = xv.ndim - 2, xv.shape[1]
        k, strides = [kernel] * nd, [stride] * nd
        pads = [kernel // 2 if pad is None else pad] * (2 * nd)
        fan_in = c // group * kernel**nd
        w = self.rng.normal(0.0, math.sqrt(2.0 / fan_in), (out_ch, c // group, *k))
        source = weight_source or self.initializer
        inputs = [x, source(f"{name}.weight", w)]
        if bias:
            inputs.append(source(f"{name}.bias", self.rng.uniform(-0.2, 0.2, out_ch)))
        y = np_conv(xv, self.values[inputs[1]], self.values[inputs[2]] if bias else None,
                    strides, pads, group)
        return self.node("Conv", name, inputs, y, kernel_shape=k, strides=strides, pads=pads,
                         group=group)

    def conv_transpose(self, name: str, x: str, out_ch: int, kernel: int, *, stride: int = 1,
                       pad: int = 0, group: int = 1, bias: bool = True) -> str:
        xv = self.values[x]
        nd, c = xv.ndim - 2, xv.shape[1]
        k, strides, pads = [kernel] * nd, [stride] * nd, [pad] * (2 * nd)
        fan_in = c // group * kernel**nd / stride**nd
        w = self.initializer(f"{name}.weight", self.rng.normal(
            0.0, math.sqrt(2.0 / fan_in), (c, out_ch // group, *k)))
        inputs = [x, w]
        b = None
        if bias:
            b = self.initializer(f"{name}.bias", self.rng.uniform(-0.2, 0.2, out_ch))
            inputs.append(b)
        y = np_conv_transpose(xv, self.values[w], self.values[b] if b else None, strides, pads,
                              group)
        return self.node("ConvTranspose", name, inputs, y, kernel_shape=k, strides=strides,
                         pads=pads, group=group)

    def batchnorm(self, name: str, x: str, *, spoil: Callable | None = None,
                  param_source: TensorSource | None = None, training_mode: bool = False,
                  outputs: int = 3) -> str:
        """BN whose running stats are the population stats of ``x`` (``spoil`` may alter them)."""
        xv = self.values[x]
        mean, var = population_stats(xv)
        self.true_stats[name] = (mean, var)
        if spoil is not None:
            mean, var = spoil(self.rng, mean, var)
        c = xv.shape[1]
        src = param_source or self.initializer
        params = [src(f"{name}.weight", self.rng.uniform(0.6, 1.4, c)),
                  src(f"{name}.bias", self.rng.normal(0.0, 0.2, c)),
                  src(f"{name}.running_mean", mean), src(f"{name}.running_var", var)]
        attrs = {"epsilon": EPSILON, "momentum": MOMENTUM}
        if not training_mode:
            y = np_batchnorm(xv, *(self.values[p] for p in params))
            return self.node("BatchNormalization", name, [x, *params], y, **attrs)
        # training_mode=1: Y uses the batch's own statistics (here the whole training set, whose
        # stats are the true ones); the updated running mean/var are two more outputs.
        outs = [f"{name}_out", f"{name}_running_mean", f"{name}_running_var"][:outputs]
        self.nodes.append(helper.make_node("BatchNormalization", [x, *params], outs, name=name,
                                           training_mode=1, **attrs))
        gamma, beta = self.values[params[0]], self.values[params[1]]
        self.values[outs[0]] = np_batchnorm(xv, gamma, beta, *self.true_stats[name])
        return outs[0]

    def relu(self, name: str, x: str) -> str:
        return self.node("Relu", name, [x], np.maximum(self.values[x], 0.0))

    def add(self, name: str, a: str, b: str) -> str:
        return self.node("Add", name, [a, b], self.values[a] + self.values[b])

    def gemm(self, name: str, x: str, out_features: int, *, trans_b: int = 1, alpha: float = 1.0,
             beta: float = 1.0) -> str:
        fan_in = self.values[x].shape[1]
        w = self.rng.normal(0.0, math.sqrt(2.0 / fan_in), (out_features, fan_in))
        w = self.initializer(f"{name}.weight", w if trans_b else w.T)
        b = self.initializer(f"{name}.bias", self.rng.uniform(-0.2, 0.2, out_features))
        wv = self.values[w].T if trans_b else self.values[w]
        y = alpha * self.values[x] @ wv + beta * self.values[b]
        attrs = {"transB": trans_b}
        if alpha != 1.0:
            attrs["alpha"] = alpha
        if beta != 1.0:
            attrs["beta"] = beta
        return self.node("Gemm", name, [x, w, b], y, **attrs)

    def matmul(self, name: str, x: str, out_features: int) -> str:
        fan_in = self.values[x].shape[1]
        w = self.initializer(f"{name}.weight",
                             self.rng.normal(0.0, math.sqrt(2.0 / fan_in), (fan_in, out_features)))
        return self.node("MatMul", name, [x, w], self.values[x] @ self.values[w])

    def global_avg_pool(self, name: str, x: str) -> str:
        xv = self.values[x]
        return self.node("GlobalAveragePool", name, [x],
                         xv.mean(axis=tuple(range(2, xv.ndim)), keepdims=True))

    def flatten(self, name: str, x: str) -> str:
        xv = self.values[x]
        return self.node("Flatten", name, [x], xv.reshape(xv.shape[0], -1), axis=1)

    def reshape(self, name: str, x: str, shape: list[int]) -> str:
        s = self.initializer(f"{name}.shape", np.array(shape), dtype=np.int64)
        return self.node("Reshape", name, [x, s], self.values[x].reshape(shape))


# ---------------------------------------------------------------------------------------------
# The samples
# ---------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Sample:
    """One model with its calibration data and what verification should expect of it."""

    name: str
    model: onnx.ModelProto
    train: dict[str, np.ndarray]
    calib: dict[str, np.ndarray]
    true_stats: dict[str, tuple[np.ndarray, np.ndarray]]
    defects: dict[str, str] = dataclasses.field(default_factory=dict)  # BN -> what is wrong
    spoiled: frozenset[str] = frozenset()  # BNs whose finite stats are deliberately not real
    extra_npz: dict[str, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)


def _image_input(b: GraphBuilder, dist: Distribution, n_train: int, name: str = "input") -> str:
    return b.add_input(name, dist.sample(n_train, 0), ["N", dist.channels, *dist.spatial])


def _sample(b: GraphBuilder, doc: str, calib: dict, **kwargs) -> Sample:
    model = kwargs.pop("model", None) or b.model(doc)
    train = {i.name: b.values[i.name].astype(np.float32) for i in b.inputs}
    calib = {k: v.astype(np.float32) for k, v in calib.items()}
    return Sample(b.name, model, train, calib, b.true_stats, **kwargs)


def _resnet_block(b: GraphBuilder, name: str, x: str, out_ch: int, stride: int) -> str:
    h = b.relu(f"{name}_relu1", b.batchnorm(f"{name}_bn1", b.conv(
        f"{name}_conv1", x, out_ch, 3, stride=stride, bias=False)))
    h = b.batchnorm(f"{name}_bn2", b.conv(f"{name}_conv2", h, out_ch, 3, bias=False))
    skip = x
    if stride != 1 or b.values[x].shape[1] != out_ch:
        skip = b.batchnorm(f"{name}_proj_bn", b.conv(
            f"{name}_proj_conv", x, out_ch, 1, stride=stride, pad=0, bias=False))
    return b.relu(f"{name}_relu", b.add(f"{name}_add", h, skip))


RESNET_DOC = (
    "Small ResNet: stem Conv(bias)-BN-ReLU, block1 (identity skip), block2 (stride 2, 1x1 "
    "Conv-BN projection shortcut), GlobalAveragePool, Flatten, Gemm to 10 logits. Six "
    "Conv+BN fold sites; BN running stats are population stats of a synthetic image set.")


def build_resnet_small() -> Sample:
    dist = Distribution(3, (32, 32), seed=101, image=True)
    b = GraphBuilder("resnet_small", seed=101)
    x = _image_input(b, dist, 384)
    h = b.relu("stem_relu", b.batchnorm("stem_bn", b.conv("stem_conv", x, 16, 3, bias=True)))
    h = _resnet_block(b, "block1", h, 16, 1)
    h = _resnet_block(b, "block2", h, 32, 2)
    logits = b.gemm("fc", b.flatten("flatten", b.global_avg_pool("gap", h)), 10)
    b.add_output(logits, ["N", 10], "logits")
    calib = dist.sample(96, 1)
    shifted = {"input": (calib * SHIFT_SCALE + SHIFT_OFFSET).astype(np.float32)}
    return _sample(b, RESNET_DOC, {"input": calib}, extra_npz={"resnet_small_shifted": shifted})


def to_float16(model: onnx.ModelProto, doc: str) -> onnx.ModelProto:
    """Casts every float initializer, input and output of ``model`` to float16 (a copy)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for i, init in enumerate(out.graph.initializer):
        if init.data_type == TensorProto.FLOAT:
            arr = numpy_helper.to_array(init).astype(np.float16)
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(arr, init.name))
    for vi in itertools.chain(out.graph.input, out.graph.output):
        if vi.type.tensor_type.elem_type == TensorProto.FLOAT:
            vi.type.tensor_type.elem_type = TensorProto.FLOAT16
    out.graph.name += "_fp16"
    out.doc_string = doc
    return out


def build_resnet_small_fp16(fp32: Sample) -> Sample:
    doc = ("resnet_small with every float tensor (weights, BN params, input, logits) in float16: "
           "its fp32 twin, cast after the float64 statistics were computed.")
    model = to_float16(fp32.model, doc)
    calib = {"input": fp32.calib["input"].astype(np.float16)}
    train = {"input": fp32.train["input"].astype(np.float16)}
    return Sample("resnet_small_fp16", model, train, calib, fp32.true_stats)


def build_depthwise_block() -> Sample:
    dist = Distribution(8, (16, 16), seed=102)
    b = GraphBuilder("depthwise_block", seed=102)
    x = b.add_input("input", dist.sample(256, 0), ["N", 8, 16, 16])
    h = b.relu("expand_relu", b.batchnorm("expand_bn", b.conv("expand_conv", x, 16, 1, bias=False)))
    h = b.relu("dw_relu", b.batchnorm("dw_bn", b.conv("dw_conv", h, 16, 3, group=16, bias=False)))
    h = b.batchnorm("pw_bn", b.conv("pw_conv", h, 8, 1, bias=False))
    h = b.add("residual_add", h, x)
    h = b.relu("group_relu", b.batchnorm("group_bn", b.conv("group_conv", h, 8, 3, group=2)))
    b.add_output(h, ["N", 8, 16, 16], "output")
    doc = ("MobileNetV2-style inverted residual: 1x1 expand Conv-BN-ReLU, depthwise 3x3 Conv "
           "(group=16)-BN-ReLU, pointwise 1x1 Conv-BN, Add with the input, then a grouped 3x3 "
           "Conv (group=2, with bias)-BN-ReLU.")
    return _sample(b, doc, {"input": dist.sample(32, 1)})


def build_mlp() -> Sample:
    dist = Distribution(20, (), seed=103)
    b = GraphBuilder("mlp", seed=103)
    x = b.add_input("input", dist.sample(4096, 0), ["N", 20])
    h = b.relu("relu1", b.batchnorm("bn1", b.gemm("fc1", x, 32)))
    h = b.relu("relu2", b.batchnorm("bn2", b.matmul("matmul2", h, 24)))
    h = b.matmul("matmul3", h, 16)
    h = b.add("add3", h, b.initializer("add3.bias", b.rng.uniform(-0.2, 0.2, 16)))
    h = b.gemm("fc4", b.batchnorm("bn3", h), 5, trans_b=0, alpha=0.5, beta=2.0)
    b.add_output(h, ["N", 5], "output")
    doc = ("MLP with BN on 2-D (N, C) activations: Gemm(transB=1, bias C)-BN-ReLU, "
           "MatMul(constant weight, no bias)-BN-ReLU, MatMul-Add(constant bias)-BN, then "
           "Gemm(alpha=0.5, beta=2.0, transB=0) to 5 outputs.")
    return _sample(b, doc, {"input": dist.sample(512, 1)})


def build_convtranspose_decoder() -> Sample:
    dist = Distribution(16, (8, 8), seed=104)
    b = GraphBuilder("convtranspose_decoder", seed=104)
    x = b.add_input("input", dist.sample(256, 0), ["N", 16, 8, 8])
    h = b.relu("up1_relu", b.batchnorm("up1_bn", b.conv_transpose(
        "up1", x, 12, 4, stride=2, pad=1, bias=True)))
    h = b.relu("up2_relu", b.batchnorm("up2_bn", b.conv_transpose(
        "up2", h, 8, 3, pad=1, group=2, bias=False)))
    h = b.conv_transpose("up3", h, 4, 2, stride=2, bias=False)
    h = b.add("up3_bias_add", h, b.initializer("up3_bias_add.bias",
                                               b.rng.uniform(-0.2, 0.2, (1, 4, 1, 1))))
    h = b.batchnorm("up3_bn", h)
    b.add_output(h, ["N", 4, 32, 32], "output")
    doc = ("Decoder: ConvTranspose(k4, stride 2, pads 1, bias)-BN-ReLU [N,12,16,16], "
           "ConvTranspose(k3, group=2, no bias)-BN-ReLU [N,8,16,16], ConvTranspose(k2, stride 2, "
           "no bias) + Add of a constant [1,4,1,1] bias (the Paddle2ONNX way)-BN [N,4,32,32].")
    return _sample(b, doc, {"input": dist.sample(32, 1)})


def build_bn_before_conv() -> Sample:
    dist = Distribution(4, (12, 12), seed=105)
    b = GraphBuilder("bn_before_conv", seed=105)
    x = b.add_input("input", dist.sample(512, 0), ["N", 4, 12, 12])
    a = b.relu("branch_a_relu", b.conv("branch_a_conv", b.batchnorm("branch_a_bn", x), 8, 3, pad=0))
    c = b.conv("branch_b_conv", b.batchnorm("branch_b_bn", x), 8, 3, pad=1, bias=False)
    b.add_output(a, ["N", 8, 10, 10], "output_a")
    b.add_output(c, ["N", 8, 12, 12], "output_b")
    doc = ("BN before Conv, two branches on the same input: branch_a BN-Conv(3x3, pads 0, bias)"
           "-ReLU, foldable forward into the Conv exactly; branch_b BN-Conv(3x3, pads 1, no bias), "
           "not exactly foldable since the zero padding is applied after the BN.")
    return _sample(b, doc, {"input": dist.sample(32, 1)})


def build_shared_conv_output() -> Sample:
    dist = Distribution(4, (12, 12), seed=106)
    b = GraphBuilder("shared_conv_output", seed=106)
    x = b.add_input("input", dist.sample(256, 0), ["N", 4, 12, 12])
    y = b.conv("conv1", x, 8, 3)
    h = b.add("skip_add", b.relu("relu1", b.batchnorm("bn1", y)), y)
    w = b.conv("conv2", h, 8, 3)
    out = b.batchnorm("bn2", w)
    b.add_output(out, ["N", 8, 12, 12], "output")
    b.add_output(w, ["N", 8, 12, 12])
    doc = ("Conv outputs that must not be folded into: conv1's output feeds bn1 and also "
           "skip_add; conv2's output feeds bn2 and is also a graph output (conv2_out).")
    return _sample(b, doc, {"input": dist.sample(32, 1)})


def build_no_bn() -> Sample:
    dist = Distribution(3, (16, 16), seed=108, image=True)
    b = GraphBuilder("no_bn", seed=108)
    x = _image_input(b, dist, 8)
    h = b.conv("conv2", b.relu("relu1", b.conv("conv1", x, 8, 3)), 4, 3)
    b.add_output(h, ["N", 4, 16, 16], "output")
    doc = "Conv-ReLU-Conv without any BatchNormalization."
    return _sample(b, doc, {"input": dist.sample(8, 1)})


def _stale(rng, mean, var):
    shift = rng.uniform(3.0, 5.0, mean.shape) * rng.choice([-1.0, 1.0], mean.shape)
    return mean + shift * np.sqrt(var), var * 10.0


def _never_updated(rng, mean, var):
    return np.zeros_like(mean), np.ones_like(var)


def _nan_var(rng, mean, var):
    var = var.copy()
    var[1] = np.nan
    return mean, var


def build_broken() -> Sample:
    dist = Distribution(3, (16, 16), seed=109, image=True)
    b = GraphBuilder("broken", seed=109)
    x = _image_input(b, dist, 256)
    h = b.relu("relu1", b.batchnorm("bn1_healthy", b.conv("conv1", x, 8, 3, bias=False)))
    h = b.relu("relu2", b.batchnorm("bn2_stale", b.conv("conv2", h, 8, 3), spoil=_stale))
    h = b.relu("relu3", b.batchnorm("bn3_never_updated", b.conv("conv3", h, 8, 3),
                                    spoil=_never_updated))
    h = b.batchnorm("bn4_nan_var", b.conv("conv4", h, 8, 3), spoil=_nan_var)
    b.add_output(h, ["N", 8, 16, 16], "output")
    doc = ("Four Conv-BN layers with known defects: bn1_healthy has real stats; bn2_stale's "
           "running mean is shifted by 3-5 std and its variance is x10; bn3_never_updated has "
           "mean 0 / var 1 everywhere; bn4_nan_var has NaN running var in channel 1 (its other "
           "channels are real, so the model output has one NaN channel). Stats downstream of a "
           "defect are computed through the model as it is.")
    defects = {"bn2_stale": "stale", "bn3_never_updated": "never updated",
               "bn4_nan_var": "NaN running var in channel 1"}
    return _sample(b, doc, {"input": dist.sample(32, 1)}, defects=defects,
                   spoiled=frozenset({"bn2_stale", "bn3_never_updated"}))


def build_conv1d_3d() -> Sample:
    sig = Distribution(4, (32,), seed=110)
    vol = Distribution(2, (6, 8, 8), seed=111)
    b = GraphBuilder("conv1d_3d", seed=110)
    s = b.add_input("signal", sig.sample(512, 0), ["N", 4, 32])
    v = b.add_input("volume", vol.sample(256, 0), ["N", 2, 6, 8, 8])
    b.add_output(b.relu("conv1d_relu", b.batchnorm("conv1d_bn", b.conv("conv1d", s, 8, 5))),
                 ["N", 8, 32], "signal_out")
    b.add_output(b.batchnorm("conv3d_bn", b.conv("conv3d", v, 4, 3, bias=False)),
                 ["N", 4, 6, 8, 8], "volume_out")
    doc = ("Two independent branches: Conv1d(k5, bias)-BN-ReLU on signal [N,4,32] (rank 3) and "
           "Conv3d(k3, no bias)-BN on volume [N,2,6,8,8] (rank 5).")
    return _sample(b, doc, {"signal": sig.sample(48, 1), "volume": vol.sample(48, 1)})


def _hwio_cast_transpose_identity(b: GraphBuilder) -> TensorSource:
    """A weight source: fp16 HWIO Constant -> Cast(float) -> Transpose(OIHW) -> Identity."""

    def source(name: str, array: np.ndarray) -> str:
        base = name.replace(".", "_")
        hwio = b.constant(f"{name}_hwio_fp16", np.transpose(array, (2, 3, 1, 0)), np.float16)
        cast = b.node("Cast", f"{base}_cast", [hwio], b.values[hwio], to=TensorProto.FLOAT)
        oihw = b.node("Transpose", f"{base}_transpose", [cast],
                      np.transpose(b.values[cast], (3, 2, 0, 1)), perm=[3, 2, 0, 1])
        return b.node("Identity", f"{base}_identity", [oihw], b.values[oihw])

    return source


def build_weights_as_constants() -> Sample:
    dist = Distribution(3, (16, 16), seed=112, image=True)
    b = GraphBuilder("weights_as_constants", seed=112)
    x = _image_input(b, dist, 256)
    h = b.conv("conv1", x, 8, 3, weight_source=b.constant)
    h = b.relu("relu1", b.batchnorm("bn1", h, param_source=b.constant))
    h = b.conv("conv2", h, 8, 3, bias=False, weight_source=_hwio_cast_transpose_identity(b))
    h = b.batchnorm("bn2", h, param_source=b.constant)
    b.add_output(h, ["N", 8, 16, 16], "output")
    doc = ("Conv-BN-ReLU-Conv-BN with no initializers: conv1's weight/bias and every BN "
           "parameter come from Constant nodes; conv2's weight is a float16 HWIO Constant that "
           "reaches the Conv through Cast(float) -> Transpose(perm 3,2,0,1) -> Identity.")
    return _sample(b, doc, {"input": dist.sample(32, 1)})


def build_bn_after_flatten() -> Sample:
    dist = Distribution(8, (), seed=113)
    b = GraphBuilder("bn_after_flatten", seed=113)
    x = b.add_input("input", dist.sample(4096, 0), ["N", 8])
    h = b.reshape("reshape", b.gemm("fc1", x, 12), [-1, 3, 4])
    h = b.flatten("flatten", b.relu("relu1", b.batchnorm("bn1", h)))
    b.add_output(b.gemm("fc2", h, 4), ["N", 4], "output")
    doc = ("Gemm [N,8]->[N,12], Reshape to [N,3,4], BN over 3 channels (channel c covers Gemm "
           "output features 4c..4c+3, stats over N and the 4 positions), ReLU, Flatten, "
           "Gemm to 4 outputs.")
    return _sample(b, doc, {"input": dist.sample(256, 1)})


def build_training_mode() -> Sample:
    dist = Distribution(3, (8, 8), seed=114, image=True)
    b = GraphBuilder("training_mode", seed=114)
    x = _image_input(b, dist, 512)
    h = b.batchnorm("bn1", b.conv("conv1", x, 8, 3), training_mode=True)
    b.add_output(b.relu("relu1", h), ["N", 8, 8, 8], "output")
    b.add_output("bn1_running_mean", [8])
    b.add_output("bn1_running_var", [8])
    doc = ("Opset 15 Conv-BN-ReLU with BN training_mode=1 and three outputs (Y, running_mean, "
           "running_var): Y is normalised with the batch's own statistics and the running "
           "outputs are momentum updates. The stored (input) running stats are real.")
    return _sample(b, doc, {"input": dist.sample(32, 1)}, model=b.model(doc, opset=15))


def build_bn_inputs_as_graph_inputs() -> Sample:
    dist = Distribution(3, (8, 8), seed=115, image=True)
    b = GraphBuilder("bn_inputs_as_graph_inputs", seed=115)
    x = _image_input(b, dist, 512)
    b.add_output(b.relu("relu1", b.batchnorm("bn1", b.conv("conv1", x, 8, 3))), ["N", 8, 8, 8],
                 "output")
    doc = ("IR 3 / opset 9 Conv-BN-ReLU whose initializers are all also listed as graph inputs "
           "(the old exporters' style; onnxruntime treats them as overridable, not constant).")
    model = b.model(doc, opset=9, ir_version=3)
    for init in model.graph.initializer:
        model.graph.input.append(
            helper.make_tensor_value_info(init.name, init.data_type, init.dims))
    return _sample(b, doc, {"input": dist.sample(32, 1)}, model=model)


def _set_initializer(model: onnx.ModelProto, name: str, value: np.ndarray) -> None:
    """Overwrites initializer ``name`` of ``model`` (float32), after the forward pass used it."""
    init = next(t for t in model.graph.initializer if t.name == name)
    init.CopyFrom(numpy_helper.from_array(np.asarray(value, np.float32), name))


def build_planted_stale() -> Sample:
    dist = Distribution(3, (16, 16), seed=116, image=True)
    b = GraphBuilder("planted_stale", seed=116)
    h = _image_input(b, dist, 384)
    for k in range(1, 5):
        h = b.relu(f"relu{k}", b.batchnorm(f"bn{k}", b.conv(f"conv{k}", h, 8, 3, bias=k == 1)))
    b.add_output(h, ["N", 8, 16, 16], "output")
    doc = ("Four Conv-BN-ReLU layers with real statistics, then one planted defect: bn2's running "
           "mean moved by +1.5 running std in every channel after training (the later layers' "
           "statistics are the real ones). Eval mode makes bn3 and bn4 drift too; only bn2 is a "
           "cause.")
    model = b.model(doc)
    mean, var = b.true_stats["bn2"]
    _set_initializer(model, "bn2.running_mean", mean + 1.5 * np.sqrt(var))
    return _sample(b, doc, {"input": dist.sample(96, 1)}, model=model,
                   defects={"bn2": "running mean moved by 1.5 std"},
                   spoiled=frozenset({"bn2", "bn3", "bn4"}))  # bn3, bn4: real, but behind bn2


MISMATCH_BATCH = 2  # the training batch size of train_eval_mismatch (also its fixed input batch)


def _train_mode_stats(b: GraphBuilder, x: np.ndarray, layers: int, batch: int) -> dict:
    """Per BN: pooled mean/biased variance of its input when every BN normalises each batch of
    ``batch`` with the batch's own statistics (train mode), over all of ``x``."""
    v, h, stats = b.values, np.asarray(x, np.float64), {}
    for k in range(1, layers + 1):
        z = h @ v[f"fc{k}.weight"].T + v[f"fc{k}.bias"]
        stats[f"bn{k}"] = population_stats(z)
        zb = z.reshape(-1, batch, z.shape[1])
        zn = (zb - zb.mean(1, keepdims=True)) / np.sqrt(zb.var(1, keepdims=True) + EPSILON)
        h = np.maximum(v[f"bn{k}.weight"] * zn.reshape(z.shape) + v[f"bn{k}.bias"], 0.0)
    return stats


def build_train_eval_mismatch() -> Sample:
    dist = Distribution(16, (), seed=117)
    b = GraphBuilder("train_eval_mismatch", seed=117)
    h = x = b.add_input("input", dist.sample(4096, 0), [MISMATCH_BATCH, 16])
    for k in range(1, 5):
        h = b.relu(f"relu{k}", b.batchnorm(f"bn{k}", b.gemm(f"fc{k}", h, 16)))
    b.add_output(b.gemm("fc5", h, 10), [MISMATCH_BATCH, 10], "logits")
    doc = (f"Four Gemm-BN-ReLU layers (2-D BN) trained with batches of {MISMATCH_BATCH}: every "
           "running statistic is the population statistic of the BN's input in *train mode* "
           "(each BN normalising each batch with the batch's own statistics), as a training run "
           "with tiny batches leaves them. Eval mode differs from train mode from bn2 on, more "
           "with depth; the input batch is fixed at the training batch size.")
    model = b.model(doc)
    for name, (mean, var) in _train_mode_stats(b, b.values[x], 4, MISMATCH_BATCH).items():
        _set_initializer(model, f"{name}.running_mean", mean)
        _set_initializer(model, f"{name}.running_var", var)
    return _sample(b, doc, {"input": dist.sample(2048, 1)}, model=model,
                   spoiled=frozenset(f"bn{k}" for k in range(1, 5)))


def _momentum_start(rng, mean, var):
    """Five momentum-0.9 steps from the initial 0 / 1: what an export taken too early stores."""
    w = 1.0 - 0.9**5
    return w * mean, (1.0 - w) + w * var


def _population_logits(model: onnx.ModelProto, true_stats: dict, x: np.ndarray) -> np.ndarray:
    """Logits of ``model`` with every BN in inference mode on ``true_stats`` (onnx.reference)."""
    from onnx.reference import ReferenceEvaluator

    work = onnx.ModelProto()
    work.CopyFrom(model)
    for node in work.graph.node:
        if node.op_type == "BatchNormalization":
            node.attribute.remove(next(a for a in node.attribute if a.name == "training_mode"))
            _set_initializer(work, node.input[3], true_stats[node.name][0])
            _set_initializer(work, node.input[4], true_stats[node.name][1])
    return ReferenceEvaluator(work).run(None, {"input": x})[0]


def build_training_mode_export() -> Sample:
    dist = Distribution(3, (16, 16), seed=118, image=True)
    b = GraphBuilder("training_mode_export", seed=118)
    x = _image_input(b, dist, 512)
    h = b.relu("relu1", b.batchnorm("bn1", b.conv("conv1", x, 8, 3), training_mode=True,
                                    outputs=1, spoil=_momentum_start))
    h = b.conv("conv2", h, 16, 3, stride=2, bias=False)
    h = b.relu("relu2", b.batchnorm("bn2", h, training_mode=True, outputs=1, spoil=_momentum_start))
    logits = b.gemm("fc", b.flatten("flatten", b.global_avg_pool("gap", h)), 10)
    b.add_output(logits, ["N", 10], "logits")
    centred = b.values["fc.bias"] - b.values["logits"].mean(axis=0)  # balanced classes on training data
    doc = ("Opset 15 classifier exported in training mode: two Conv-BN(training_mode=1, *one* "
           "output)-ReLU layers, GlobalAveragePool, Gemm to 10 logits. onnxruntime refuses to "
           "load it ('This number of op outputs should be 3 when Training_mode = True'); the "
           "stored running statistics are five momentum steps from 0 / 1, so simply dropping "
           "training_mode is wrong too. The Gemm bias centres the logits over the training data, so "
           "the classes are balanced. training_mode_export_eval.npz holds labelled data (the "
           "labels are the model's own predictions with population statistics).")
    model = b.model(doc, opset=15)
    _set_initializer(model, "fc.bias", centred)
    evaluation = dist.sample(128, 2).astype(np.float32)
    labels = np.argmax(_population_logits(model, b.true_stats, evaluation), axis=1).astype(np.int64)
    extra = {"training_mode_export_eval": {"input": evaluation, "labels": labels}}
    return _sample(b, doc, {"input": dist.sample(128, 1)}, model=model, extra_npz=extra,
                   spoiled=frozenset({"bn1", "bn2"}))


def build_samples() -> list[Sample]:
    """Builds every sample in memory, in file order."""
    resnet = build_resnet_small()
    return [resnet, build_resnet_small_fp16(resnet), build_depthwise_block(), build_mlp(),
            build_convtranspose_decoder(), build_bn_before_conv(), build_shared_conv_output(),
            build_no_bn(), build_broken(), build_conv1d_3d(), build_weights_as_constants(),
            build_bn_after_flatten(), build_training_mode(), build_bn_inputs_as_graph_inputs(),
            build_planted_stale(), build_train_eval_mismatch(), build_training_mode_export()]


# ---------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Writes an ``np.load``-able .npz with fixed zip timestamps, so rebuilds are byte-stable."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for key in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[key]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{key}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())


def write_sample(sample: Sample, out_dir: Path) -> list[Path]:
    """Writes ``<name>.onnx``, ``<name>_calib.npz`` and any extra .npz into ``out_dir``."""
    paths = [out_dir / f"{sample.name}.onnx", out_dir / f"{sample.name}_calib.npz"]
    paths[0].write_bytes(sample.model.SerializeToString())
    save_npz(paths[1], sample.calib)
    for stem, arrays in sample.extra_npz.items():
        paths.append(out_dir / f"{stem}.npz")
        save_npz(paths[-1], arrays)
    return paths


def build_all(out_dir: Path) -> list[Path]:
    """Builds every sample model and its calibration data into ``out_dir``; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return [p for s in build_samples() for p in write_sample(s, out_dir)]


# ---------------------------------------------------------------------------------------------
# Verification (onnxruntime / onnx.reference); used by main() and the tests
# ---------------------------------------------------------------------------------------------


def tensor_values(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Initializers and Constant-node outputs of the main graph, by name."""
    values = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def bn_input_stats(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, tuple]:
    """Runs ``model`` with every BN input exposed; returns BN name -> float64 (mean, var).

    onnxruntime at ORT_DISABLE_ALL runs it, or onnx.reference for a training_mode BN.
    """
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    graph_inputs = {i.name for i in model.graph.input}
    bns = [n for n in model.graph.node if n.op_type == "BatchNormalization"]
    for n in bns:
        if n.input[0] not in graph_inputs:
            elem = model.graph.input[0].type.tensor_type.elem_type
            exposed.graph.output.append(helper.make_tensor_value_info(n.input[0], elem, None))
    names = [o.name for o in exposed.graph.output]
    training = any(a.name == "training_mode" and a.i for n in bns for a in n.attribute)
    if training:
        from onnx.reference import ReferenceEvaluator

        results = ReferenceEvaluator(exposed).run(None, feeds)
    else:
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(exposed.SerializeToString(), so,
                                    providers=["CPUExecutionProvider"])
        fixed = model.graph.input[0].type.tensor_type.shape.dim[0].dim_value  # 0: dynamic
        n = len(next(iter(feeds.values())))
        step = fixed or n
        runs = [sess.run(names, {k: v[i:i + step] for k, v in feeds.items()}) for i in range(0, n, step)]
        results = [np.concatenate(parts) for parts in zip(*runs)]
    values = {**feeds, **dict(zip(names, results))}
    return {n.name: population_stats(values[n.input[0]]) for n in bns}


def drift(stored: tuple, observed: tuple) -> tuple[np.ndarray, np.ndarray]:
    """Per channel: d = (m_obs - m_run) / sqrt(v_run + eps) and the ratio v_obs / (v_run + eps)."""
    (m_run, v_run), (m_obs, v_obs) = stored, observed
    m_run, v_run = np.asarray(m_run, np.float64), np.asarray(v_run, np.float64)
    return (m_obs - m_run) / np.sqrt(v_run + EPSILON), v_obs / (v_run + EPSILON)


def stored_stats(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """BN name -> (running_mean, running_var) as stored in the model."""
    values = tensor_values(model)
    return {n.name: (values[n.input[3]], values[n.input[4]])
            for n in model.graph.node if n.op_type == "BatchNormalization"}


def _compare_with_reference(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> str:
    """Says whether onnxruntime runs ``model`` and, if so, whether it agrees with onnx.reference."""
    import onnxruntime as ort
    from onnx.reference import ReferenceEvaluator

    try:
        got = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"]).run(None, feeds)
    except Exception as exc:  # noqa: BLE001 - any refusal is an acceptable answer
        return f"{ort.__version__} refuses it: {str(exc).splitlines()[0][:120]}"
    want = ReferenceEvaluator(model).run(None, feeds)
    worst = max(float(np.abs(g - w).max()) for g, w in zip(got, want))
    assert worst < 1e-4, f"onnxruntime and onnx.reference differ by {worst}"
    return f"{ort.__version__} runs it and matches onnx.reference (max abs diff {worst:.1e})"


def _one_output_training_mode(model: onnx.ModelProto) -> bool:
    return any(n.op_type == "BatchNormalization" and len(n.output) == 1
               and any(a.name == "training_mode" and a.i for a in n.attribute) for n in model.graph.node)


def verify_sample(sample: Sample, out_dir: Path) -> list[str]:
    """Checks one written sample; returns report lines and raises AssertionError on failure."""
    path = out_dir / f"{sample.name}.onnx"
    model = onnx.load(str(path))
    # onnx's shape inference rejects a one-output training-mode BN (the very export it stands for)
    onnx.checker.check_model(str(path), full_check=not _one_output_training_mode(model))
    names = [n.name for n in model.graph.node]
    assert all(names) and len(set(names)) == len(names), "node names must be unique and set"
    stored = stored_stats(model)
    if not stored:
        bn_input_stats(model, sample.calib)  # still runs it
        return [f"{sample.name}: no BN; runs"]
    fp16 = model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT16
    tol = 2e-3 if fp16 else 2e-4
    on_train = bn_input_stats(model, sample.train)
    on_calib = bn_input_stats(model, sample.calib)
    lines = []
    for bn, st in stored.items():
        d_train, r_train = drift(st, on_train[bn])
        d_cal, r_cal = drift(st, on_calib[bn])
        ok = np.isfinite(np.asarray(st[1], np.float64))
        lines.append(f"{sample.name}:{bn}: train max|d|={np.nanmax(np.abs(d_train)):.2g} "
                     f"calib max|d|={np.nanmax(np.abs(d_cal)):.3f} var ratio "
                     f"{np.nanmin(r_cal):.2f}..{np.nanmax(r_cal):.2f}"
                     + (f"  [{sample.defects[bn]}]" if bn in sample.defects else ""))
        if bn in sample.spoiled:
            continue
        assert np.all(np.abs(d_train[ok]) < tol) and np.all(np.abs(r_train[ok] - 1) < 5 * tol), \
            f"{sample.name}:{bn}: stored stats are not the training population stats"
        assert np.all(np.abs(d_cal[ok]) < 0.2), f"{sample.name}:{bn}: in-domain calib drifts"
    if any(a.name == "training_mode" and a.i for n in model.graph.node for a in n.attribute):
        lines.append(f"{sample.name}: onnxruntime {_compare_with_reference(model, sample.calib)}")
    for stem, arrays in sample.extra_npz.items():
        if "labels" in arrays:
            lines.append(f"{stem}: {len(arrays['labels'])} labelled samples, "
                         f"{len(np.unique(arrays['labels']))} classes")
            continue
        first = next(iter(stored))
        d_shift, r_shift = drift(stored[first], bn_input_stats(model, arrays)[first])
        d_cal, _ = drift(stored[first], on_calib[first])
        lines.append(f"{stem}:{first}: max|d|={np.abs(d_shift).max():.2f} var ratio "
                     f"{r_shift.min():.2f}..{r_shift.max():.2f}")
        assert np.abs(d_shift).max() > 5 * np.abs(d_cal).max(), "shift does not show"
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=HERE,
                        help="output folder. Defaults to sample_models/.")
    parser.add_argument("--no-verify", action="store_true", help="skip the onnxruntime checks")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    samples = build_samples()
    for sample in samples:
        for path in write_sample(sample, args.out):
            print(f"{path.stat().st_size:>9,d}  {path.name}")
    if not args.no_verify:
        for sample in samples:
            print("\n".join(verify_sample(sample, args.out)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
