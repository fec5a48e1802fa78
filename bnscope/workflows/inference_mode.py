"""Orchestration of the training-mode repair ``recalibrate`` applies: refuse a model with nothing to
re-estimate, and run the written model. The pattern, check and rewrite are
:mod:`bnscope.repair.inference_mode`."""

from __future__ import annotations

from pathlib import Path

from bnscope.data.spec import DataSource
from bnscope.errors import BnscopeError
from bnscope.onnxio.external_data import TensorStore
from bnscope.onnxio.graph import GraphView
from bnscope.onnxio.model_io import LoadedModel
from bnscope.repair.inference_mode import ModeRepair, plan_repairs
from bnscope.runtime.sessions import create_session
from bnscope.stats.summary import layer_references


def plan_or_refuse(loaded: LoadedModel) -> list[ModeRepair]:
    """The training-mode repairs; an input error when no BN has statistics to re-estimate."""
    view = GraphView(loaded.model, TensorStore(loaded))
    planned = plan_repairs(view)
    if view.bn_indices() and not layer_references(view):
        why = next((r.reason for r in planned if r.reason), "no BN has constant running statistics")
        raise BnscopeError(
            f"{loaded.path}: nothing to re-estimate: {why}. Hint: export the model with its parameters as "
            "initializers (PyTorch: torch.onnx.export(..., export_params=True))"
        )
    return planned


def runs_on(path: Path, source: DataSource, batch_size: int) -> dict[str, str]:
    """Runs the written model on one batch on the CPU, and on the CUDA EP when onnxruntime lists it.

    Returns provider -> "ok", "not available: why" (the EP itself did not load: no GPU or driver,
    not the model's fault) or "failed: why" (the model does not load or run there)."""
    import onnxruntime as ort

    providers = ["cpu"] + (["cuda"] if "CUDAExecutionProvider" in ort.get_available_providers() else [])
    batch = next(iter(source.batches(batch_size, 1)))
    out = {}
    for provider in providers:
        try:
            session = create_session(path, provider, allow_fallback=provider != "cpu")
            if session.fell_back:
                out[provider] = f"not available: {session.fallback_reason}"
                continue
            session.run(batch)
            out[provider] = "ok"
        except BnscopeError as exc:
            out[provider] = f"failed: {exc}"
    return out
