"""``bnscope quantize`` against the anchors, on the real BN models in ``../shared/real-models``.

Calibration and evaluation inputs are different random crops of the photos bundled in scikit-image
and scikit-learn (``benchmarks/photo_crops.py``), normalised as each model expects. Every SQNR is
the mean over the model's outputs, in dB, on the evaluation crops, against the float model. The
anchors use onnxruntime's ``quantize_static`` (QDQ, MinMax, uint8 activations, int8 weights) on the
BN-folded model (bnscope's fold; Constant weights as initializers, opset >= 13), calibrated on the
same crops:

* per-tensor int8 weights; per-channel int8 weights;
* onnxsim 0.8.1 ``cross_layer_equalize`` then per-channel (run in a separate venv given by
  ``--onnxsim-python``; skipped when absent); AIMET-ONNX is not run (it pulls torch);
* int8 weights with every activation at 16 bits (the upper anchor);
* ``bnscope quantize`` (its JSON, from the CLI as a user runs it).

Run: ``python benchmarks/bench_quantize.py [--models picodet,ultraface] [--onnxsim-python /work/venv-i21/bin/python]
[--bnscope-json picodet=FILE] [--anchors-json picodet=FILE]`` (a JSON from an earlier ``bnscope quantize
-f json`` run of the same command is reused instead of running it again; anchors are read from FILE
when it exists, else measured and saved there). Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.photo_crops import photo_crops
from bnscope.fold.rewrite import fold_batchnorm
from bnscope.quant.measure import mean_sqnr, output_sqnr, run_all
from bnscope.quant.ort_quant import Quantizer, activation_bits
from bnscope.quant.prepare import prepare_for_quantization

REAL = Path(__file__).resolve().parents[2] / "shared" / "real-models"
MODELS = {
    # name: (file, input (h, w), mean, std) on [0, 1] RGB
    "picodet": ("paddle_picodet_s_320_coco.onnx", (320, 320), None, None),
    "ultraface": ("pytorch_ultraface_version-RFB-320.onnx", (240, 320), [127 / 255] * 3, [128 / 255] * 3),
}
SAMPLES = 48
CLE = """
import sys, onnx
from onnxsim import cross_layer_equalize
onnx.save(cross_layer_equalize(onnx.load(sys.argv[1])), sys.argv[2])
"""


def crops(name: str, seed: int) -> np.ndarray:
    _, size, mean, std = MODELS[name]
    kwargs = {} if mean is None else {"mean": np.float32(mean), "std": np.float32(std)}
    return photo_crops(SAMPLES, size, seed, **kwargs)


def anchors(name: str, work: Path, onnxsim_python: str | None) -> dict[str, float]:
    model = onnx.load(REAL / MODELS[name][0])
    prepared = prepare_for_quantization(fold_batchnorm(model)[0])
    float_path = work / "float.onnx"
    onnx.save(prepared, float_path)
    input_name = prepared.graph.input[0].name
    calib = [{input_name: x[None]} for x in np.load(work / "calib.npy")]
    evaluation = [{input_name: x[None]} for x in np.load(work / "eval.npy")]
    names, reference = run_all(REAL / MODELS[name][0], evaluation, "the original model")

    def sqnr(path: Path) -> float:
        return mean_sqnr(output_sqnr(names, reference, run_all(path, evaluation, "QDQ")[1]))

    results = {}
    per_tensor = Quantizer(float_path, calib, work / "pt", per_channel=False)
    (work / "pt").mkdir()
    results["per-tensor"] = sqnr(per_tensor.quantize(work / "pt.onnx"))
    per_channel = Quantizer(float_path, calib, work / "pc")
    (work / "pc").mkdir()
    results["per-channel"] = sqnr(per_channel.quantize(work / "pc.onnx"))
    everything = activation_bits(onnx.load(work / "pc.onnx")).int8
    results["all activations 16-bit"] = sqnr(per_channel.quantize(work / "a16.onnx", everything))
    if onnxsim_python and Path(onnxsim_python).exists():
        cle = work / "cle.onnx"
        subprocess.run([onnxsim_python, "-c", CLE, str(float_path), str(cle)], check=True)
        (work / "cle").mkdir()
        results["onnxsim CLE + per-channel"] = sqnr(Quantizer(cle, calib, work / "cle").quantize(work / "cle_q.onnx"))
    return results


def run_bnscope(name: str, work: Path) -> dict:
    cmd = [sys.executable, "-m", "bnscope", "quantize", str(REAL / MODELS[name][0]), "-d", str(work / "calib.npy")]
    cmd += ["--eval-data", str(work / "eval.npy"), "-o", str(work / "bnscope.onnx"), "-f", "json"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode not in (0, 1):
        raise RuntimeError(done.stderr[-2000:])
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="picodet,ultraface")
    parser.add_argument("--onnxsim-python", default="/work/venv-i21/bin/python")
    parser.add_argument("--bnscope-json", action="append", default=[], help="NAME=FILE: reuse a quantize JSON")
    parser.add_argument(
        "--anchors-json",
        action="append",
        default=[],
        help="NAME=FILE: anchors read from FILE, or measured and saved there",
    )
    args = parser.parse_args()
    reuse = dict(item.split("=", 1) for item in args.bnscope_json)
    saved = dict(item.split("=", 1) for item in args.anchors_json)
    rows = []
    for name in args.models.split(","):
        with tempfile.TemporaryDirectory(prefix=f"bench-quantize-{name}-") as folder:
            work = Path(folder)
            np.save(work / "calib.npy", crops(name, 1))
            np.save(work / "eval.npy", crops(name, 2))
            cache = Path(saved[name]) if name in saved else None
            if cache is not None and cache.exists():
                found = json.loads(cache.read_text())
            else:
                found = anchors(name, work, args.onnxsim_python)
                if cache is not None:
                    cache.write_text(json.dumps(found))
            report = json.loads(Path(reuse[name]).read_text()) if name in reuse else run_bnscope(name, work)
        acts = report["activations"]
        rows.append((name, found, report, acts))
        print(f"{name}: {found} bnscope {report['sqnr_db']} dB, {acts}", file=sys.stderr, flush=True)
    keys = ["per-tensor", "per-channel", "onnxsim CLE + per-channel", "all activations 16-bit"]
    print(
        "| model | "
        + " | ".join(keys)
        + " | bnscope quantize | 16-bit tensors | int8 fraction | Spearman (local / output) |"
    )
    print("|---|" + "---:|" * (len(keys) + 4))
    for name, found, report, acts in rows:
        cells = [f"{found[k]:.2f}" if k in found else "n/a" for k in keys]
        spear = f"{report['rank_correlation']} / {report.get('rank_correlation_output')}"
        line = (
            f"| {name} | "
            + " | ".join(cells)
            + f" | {report['sqnr_db']:.2f} | {acts['int16']} of {acts['int8'] + acts['int16']}"
        )
        print(line + f" | {acts['fraction_int8']:.1%} | {spear} |")


if __name__ == "__main__":
    main()
