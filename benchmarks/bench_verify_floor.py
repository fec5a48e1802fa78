"""The float floor of real networks, and where their folds sit against it (issue 18).

For each model: ``fold`` with the defaults (random inputs) and with ``--data`` (the first 32
samples), as a user runs it through the library; then, on held-out samples the fold never saw, the
written model against the original: its difference, the original's floor on those samples, and
their ratio. Also, to choose the multiple: five independent one-ulp nudges of the original
(seeds 10-14) against the floor of seeds 0-2 (how far a correct rounding change goes), and a
deliberately wrong fold (the written model with one folded weight tensor off by 1e-3 relative).

    python benchmarks/bench_verify_floor.py MODEL[=DATA.npz] ...

DATA.npz: samples 0-31 are the fold's --data, the rest held out (random seed 7 when none are left).
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from bnscope.onnxio.external_data import TensorStore
from bnscope.onnxio.model_io import load_model
from bnscope.runtime.floor import float_weights, judge_outputs, measure_floor
from bnscope.runtime.sessions import create_session
from bnscope.workflows.fold import fold_model
from bnscope.workflows.options import DataChoice, FoldSettings


def _split(data: Path, tmp: Path) -> tuple[Path, Path | None]:
    z = np.load(data)
    first = {k: z[k][:32] for k in z.files if k != "labels"}
    rest = {k: z[k][32:] for k in z.files if k != "labels"}
    np.savez(tmp / "fold.npz", **first)
    if min(len(v) for v in rest.values()) == 0:
        return tmp / "fold.npz", None
    np.savez(tmp / "held.npz", **rest)
    return tmp / "fold.npz", tmp / "held.npz"


def _run(session, batches):
    return [dict(zip(session.output_names, session.run(b))) for b in batches]


def held_out(original: Path, written: Path, held: Path | None) -> dict:
    loaded = load_model(original)
    choice = DataChoice(path=held) if held else DataChoice(seed=7)
    batches, _ = choice.batches(loaded.model)
    expected = _run(create_session(original, "cpu", opt_level="disable"), batches)
    weights = float_weights(loaded.model, TensorStore(loaded).to_array)
    floors = measure_floor(str(original), weights, batches, expected)
    diffs = judge_outputs(_run(create_session(written, "cpu", opt_level="disable"), batches), expected, floors)
    independent = []
    for seed in range(10, 15):
        one = measure_floor(str(original), weights, batches, expected, seeds=1, first_seed=seed)
        independent.append(max((one[n] / floors[n] for n in floors if floors[n] > 0), default=float("nan")))
    wrong = _wrong_fold(written, batches, expected, floors)
    return {"diffs": diffs, "independent": independent, "wrong": wrong}


def _wrong_fold(written: Path, batches, expected, floors) -> float:
    """The written model with its largest Conv/Gemm weight off by 1e-3 relative: its ratio."""
    model = onnx.load(str(written))
    targets = {n.input[1] for n in model.graph.node if n.op_type in ("Conv", "Gemm", "ConvTranspose", "MatMul")}
    inits = [t for t in model.graph.initializer if t.name in targets and t.data_type == onnx.TensorProto.FLOAT]
    if not inits:
        return float("nan")
    t = inits[0]
    w = onnx.numpy_helper.to_array(t) * np.float32(1 + 1e-3)
    t.CopyFrom(onnx.numpy_helper.from_array(w.astype(np.float32), t.name))
    diffs = judge_outputs(_run(create_session(model, "cpu", opt_level="disable"), batches), expected, floors)
    return max(d.ratio for d in diffs if d.ratio is not None)


def main(argv: list[str]) -> None:
    print(
        "| model | data | BN folded | fold: max abs / floor = ratio | passed | fold s | floor s | held-out: max abs / floor = ratio | 5 nudges / floor | 1e-3 wrong / floor |"
    )
    print("|---|---|---|---|---|---:|---:|---|---|---|")
    for arg in argv:
        model, _, data = arg.partition("=")
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            fold_data, held = _split(Path(data), tmp) if data else (None, None)
            for label, choice in (("random", DataChoice()), ("--data", DataChoice(path=fold_data))):
                if label == "--data" and fold_data is None:
                    continue
                out = tmp / "folded.onnx"
                start = time.perf_counter()
                try:
                    result = fold_model(model, FoldSettings(output=out, data=choice, force=True))
                except Exception as exc:  # a model fold refuses: its row says why
                    print(f"| {Path(model).name} | {label} | {type(exc).__name__}: {str(exc)[:150]} |", flush=True)
                    break
                seconds = time.perf_counter() - start
                v = result.verification[0]
                row = "; ".join(
                    f"{o.max_abs:.3g} / {o.floor:.3g} = {o.ratio:.3g}" for o in v.outputs if o.floor is not None
                )
                folded = result.bn_before - result.bn_after
                cells = [
                    Path(model).name,
                    label,
                    f"{folded}/{result.bn_before}",
                    row,
                    str(v.passed),
                    f"{seconds:.2f}",
                    f"{v.floor_seconds:.2f}",
                ]
                if result.output:
                    h = held_out(Path(model), out, held)
                    cells.append(
                        "; ".join(
                            f"{o.max_abs:.3g} / {o.floor:.3g} = {o.ratio:.3g}"
                            for o in h["diffs"]
                            if o.floor is not None
                        )
                    )
                    cells.append(f"{min(h['independent']):.2f}-{max(h['independent']):.2f}")
                    cells.append(f"{h['wrong']:.3g}")
                else:
                    cells += ["not written", "", ""]
                print("| " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
