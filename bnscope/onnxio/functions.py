"""Model-local functions that hold a BatchNormalization: inlined, as onnxruntime does when it loads them.

A ``FunctionProto`` in ``model.functions`` is called like an op (``domain``, ``op_type``); its body
may hold a BN whose parameters are Constant nodes or function inputs. A walker that looks only at
``graph.node`` does not see that BN, and a gate built on it passes a model whose BN has NaN or
negative variances. onnxruntime inlines every model-local function while it builds the session
graph, so the inlined graph is the one that runs; bnscope analyses that graph too, inlined by
``onnx.inliner.inline_local_functions`` (node and tensor names of each call get a ``__N`` suffix).
Only a model with a BN in some local function is inlined; any other model is left exactly as it is.
"""

from __future__ import annotations

import logging

import onnx
import onnx.inliner

from bnscope.errors import BnscopeError
from bnscope.onnxio.bn import is_batchnorm
from bnscope.onnxio.nodes import subgraphs

log = logging.getLogger(__name__)
_said: set[str] = set()  # a command may load its model more than once: one warning per model


def _holds_bn(nodes) -> bool:
    return any(is_batchnorm(node) or any(_holds_bn(sub.node) for sub in subgraphs(node)) for node in nodes)


def functions_with_bn(model: onnx.ModelProto) -> list[str]:
    """``domain:name`` of every model-local function whose body (subgraphs included) holds a BN."""
    return [f"{f.domain}:{f.name}" for f in model.functions if _holds_bn(f.node)]


def inline_bn_functions(model: onnx.ModelProto, path: object = "model") -> onnx.ModelProto:
    """``model`` with its local functions inlined when one of them holds a BN, else ``model`` itself.

    Raises:
        BnscopeError: onnx cannot inline them (a broken function).
    """
    hiding = functions_with_bn(model)
    if not hiding:
        return model
    try:
        inlined = onnx.inliner.inline_local_functions(model)
    except Exception as exc:  # onnx's C++ errors arrive as several exception types
        raise BnscopeError(
            f"{path}: model-local function(s) {', '.join(hiding)} hold BatchNormalization, and onnx cannot "
            f"inline them ({' '.join(str(exc).split())[:200]}). Hint: export the model without functions"
        ) from None
    if str(path) in _said:
        return inlined
    _said.add(str(path))
    log.warning(
        "%s: model-local function(s) %s hold BatchNormalization; analysed inlined, as onnxruntime runs them "
        "(layer names get a __N suffix per call; a model bnscope writes has them inlined)",
        path,
        ", ".join(hiding),
    )
    return inlined
