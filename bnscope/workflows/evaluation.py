"""``recalibrate --eval-data``: top-1 accuracy before and after, on an .npz with a ``labels`` array.

The evaluation data are read and checked (one integer class index per sample) before the
recalibrated model is written, so a bad label array stops the run with nothing written.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx

from bnscope.data.sources import open_source
from bnscope.data.spec import DataSource, input_specs
from bnscope.errors import BnscopeError
from bnscope.runtime.sessions import create_session


def evaluation_data(eval_data, model: onnx.ModelProto) -> tuple[DataSource, np.ndarray]:
    """The evaluation data and its labels, checked before anything is written: one integer class
    label per sample (shape (N,) or (N, 1))."""
    source = open_source(eval_data, input_specs(model))
    labels = source.labels()
    hint = "save one integer class index per sample: np.savez(..., labels=y) with y of shape (N,)"
    if labels is None:
        raise BnscopeError(f"{eval_data} has no 'labels' array. Hint: {hint}")
    labels = np.asarray(labels)
    if labels.ndim == 2 and labels.shape[1] == 1:
        labels = labels.reshape(-1)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise BnscopeError(
            f"{eval_data}: labels of shape {list(labels.shape)} and dtype {labels.dtype} are not class indices. "
            f"Hint: {hint} (one-hot labels: y.argmax(axis=1))"
        )
    if source.samples is not None and labels.shape[0] != source.samples:
        raise BnscopeError(
            f"{eval_data}: {labels.shape[0]} labels for {source.samples} samples; nothing written. Hint: {hint}"
        )
    return source, labels


def accuracies(before, recalibrated: Path, source: DataSource, labels: np.ndarray, options) -> tuple[float, float]:
    """Top-1 of the model as exported (``before``: its path, or a copy whose training-mode BNs can
    load, so they use batch statistics) and of the recalibrated one; ``options``: recalibrate's (provider,
    fallback, batch size)."""
    return tuple(
        top1(
            create_session(p, options.provider, allow_fallback=options.allow_fallback),
            source,
            labels,
            options.batch_size,
        )
        for p in (before, recalibrated)
    )


def top1(session, source: DataSource, labels: np.ndarray, batch_size: int) -> float:
    """Top-1 accuracy of the first output's argmax over axis 1."""
    predictions = [
        np.argmax(session.run(batch)[0].reshape(len(next(iter(batch.values()))), -1), axis=1)
        for batch in source.batches(batch_size)
    ]
    predicted = np.concatenate(predictions)
    if predicted.shape[0] != labels.shape[0]:
        raise BnscopeError(f"{labels.shape[0]} labels for {predicted.shape[0]} samples. Hint: one label per sample")
    return float(np.mean(predicted == labels.reshape(-1)))
