"""Statistics as a user runs them, start-up included, against a plain onnxruntime run of the same data.

Two cases, each timed alternately with its baseline (median of paired ratios over rounds):

* ``wide``: a model whose inference is cheap but whose BN layers are wide (8 x [BN(512) -> Relu]
  on [N, 512, 2, 2]), 32 batches of 256, in-process. bnscope: ``bnscope.collect_stats(model,
  data.npz)`` (load, instrument, session, collect, summarise). Baseline: ``np.load`` of the same
  .npz, ``onnxruntime.InferenceSession(path)`` and ``run`` over the same batches.
* ``cli``: ``bnscope stats MODEL --data DATA.npz --format json`` as a fresh process, against a
  fresh ``python plain_script.py MODEL DATA.npz BATCH`` (load the .npz, create a session, run every
  batch, five lines) on saved models: the benchmark's ResNet-18-like (2048 samples of 64x64,
  batch 16) and the real exports in ``../shared/real-models`` whose batch is fixed at 1.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from benchmarks import common, models

REAL_MODELS = Path(__file__).resolve().parents[2] / "shared" / "real-models"
PLAIN_SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np, onnxruntime as ort
    model, data, batch = sys.argv[1], sys.argv[2], int(sys.argv[3])
    x = np.load(data)["x"]
    session = ort.InferenceSession(model, providers=[sys.argv[4]])
    for i in range(0, len(x), batch):
        session.run(None, {session.get_inputs()[0].name: x[i : i + batch]})
    """
)
PROVIDER_NAMES = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


def wide_bn_model(channels: int = 512, layers: int = 8, seed: int = 0) -> onnx.ModelProto:
    """x [N, C, 2, 2] -> (BN -> Relu) x ``layers``; running statistics near the data's own."""
    rng = np.random.default_rng(seed)
    nodes, inits, h = [], [], "x"
    sample = wide_bn_data(512, seed + 1)
    for i in range(layers):
        mean = sample.mean(axis=(0, 2, 3))
        var = sample.var(axis=(0, 2, 3))
        gamma, beta = rng.uniform(0.5, 1.5, channels), rng.uniform(-0.5, 0.5, channels)
        names = [f"bn{i}_{k}" for k in ("scale", "B", "mean", "var")]
        inits += [numpy_helper.from_array(v.astype(np.float32), n) for n, v in zip(names, (gamma, beta, mean, var))]
        nodes.append(helper.make_node("BatchNormalization", [h, *names], [f"y{i}"], name=f"bn{i}"))
        nodes.append(helper.make_node("Relu", [f"y{i}"], [f"r{i}"], name=f"relu{i}"))
        h = f"r{i}"
        shape = (1, -1, 1, 1)
        y = (sample - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + 1e-5) * gamma.reshape(shape)
        sample = np.maximum(y + beta.reshape(shape), 0)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", channels, 2, 2])
    out = helper.make_tensor_value_info(h, TensorProto.FLOAT, ["N", channels, 2, 2])
    model = helper.make_model(
        helper.make_graph(nodes, "wide_bn", [x], [out], inits), opset_imports=[helper.make_opsetid("", 17)]
    )
    model.ir_version = 8
    return model


def wide_bn_data(samples: int, seed: int = 1, channels: int = 512) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centre = rng.standard_normal((1, channels, 1, 1))
    return (centre + rng.standard_normal((samples, channels, 2, 2))).astype(np.float32)


def export_before(ref: str, tmp: Path) -> Path:
    """bnscope as of git ``ref``, twice under ``tmp``: ``plain/bnscope`` (for a fresh process with
    PYTHONPATH) and ``renamed/bnscope_before`` (importable beside the current bnscope)."""
    root = Path(__file__).resolve().parents[1]
    for sub in ("plain", "renamed"):
        (tmp / sub).mkdir()
        archive = subprocess.run(["git", "-C", str(root), "archive", ref, "bnscope"], check=True, capture_output=True)
        subprocess.run(["tar", "-x", "-C", str(tmp / sub)], input=archive.stdout, check=True)
    package = tmp / "renamed" / "bnscope"
    for source in package.rglob("*.py"):
        text = source.read_text()
        source.write_text(
            text.replace("from bnscope.", "from bnscope_before.")
            .replace("from bnscope import", "from bnscope_before import")
            .replace("import bnscope.", "import bnscope_before.")
        )
    package.rename(tmp / "renamed" / "bnscope_before")
    sys.path.insert(0, str(tmp / "renamed"))
    return tmp


def wide_case(
    tmp: Path, rounds: int, provider: str = "cpu", before: bool = False, batches: int = 32, batch: int = 256
) -> list[dict]:
    """bnscope.collect_stats vs a plain session, both from the saved files, alternated."""
    import importlib

    import onnxruntime as ort

    path, data = tmp / "wide_bn.onnx", tmp / "wide_bn.npz"
    onnx.save(wide_bn_model(), str(path))
    np.savez(data, x=wide_bn_data(batches * batch))

    def plain():
        x = np.load(data)["x"]
        session = ort.InferenceSession(str(path), providers=[PROVIDER_NAMES[provider]])
        for i in range(0, len(x), batch):
            session.run(None, {"x": x[i : i + batch]})

    def collector(package: str):
        options = importlib.import_module(f"{package}.stats.collect").StatsOptions(batch_size=batch, provider=provider)
        collect_stats = importlib.import_module(f"{package}.workflows.stats").collect_stats
        return lambda: collect_stats(path, data, options=options)

    candidates = {"plain": plain, "bnscope collect_stats": collector("bnscope")}
    if before:
        candidates["before: bnscope collect_stats"] = collector("bnscope_before")
    times = common.interleaved(candidates, rounds=rounds)
    return common.summarize(times, baseline="plain")


def cli_cases(tmp: Path, rounds: int, provider: str = "cpu", before: bool = False) -> list[dict]:
    """``bnscope stats`` as a fresh process against the plain script, per saved model."""
    script = tmp / "plain_script.py"
    script.write_text(PLAIN_SCRIPT)
    rows = []
    for name, model, x, batch in _cli_models(tmp):
        data = tmp / f"{name}.npz"
        np.savez(data, x=x)
        bnscope = [sys.executable, "-m", "bnscope", "stats", str(model), "--data", str(data), "--format", "json"]
        bnscope += ["--batch-size", str(batch), "--provider", provider]
        plain = [sys.executable, str(script), str(model), str(data), str(batch), PROVIDER_NAMES[provider]]
        candidates = {"plain": _process(plain), "bnscope stats": _process(bnscope)}
        if before:
            candidates["before: bnscope stats"] = _process(bnscope, tmp / "plain")
        times = common.interleaved(candidates, rounds=rounds)
        for row in common.summarize(times, baseline="plain"):
            rows.append({**row, "model": f"{name} ({len(x)} x {list(x.shape[1:])}, batch {batch})"})
    return rows


def _cli_models(tmp: Path):
    resnet = tmp / "resnet18_like.onnx"
    onnx.save(models.resnet18_like(size=64), str(resnet))
    x = np.concatenate([b[models.INPUT] for b in models.calibration_batches("resnet18", 16, 128, 64)])
    yield "resnet18_like", resnet, x, 16
    face = REAL_MODELS / "pytorch_ultraface_version-RFB-320.onnx"
    if face.is_file():
        rng = np.random.default_rng(0)
        yield "ultraface_RFB_320", face, rng.uniform(-1, 1, (64, 3, 240, 320)).astype(np.float32), 1


def _process(argv: list[str], package_root: Path | None = None) -> Callable[[], None]:
    """A fresh process per call. Bytecode is cached (in a temp prefix, written by the untimed
    warm-up call), as an installed package has it: compiling bnscope's sources took 0.09 s."""
    env = dict(os.environ, PYTHONPATH=str(package_root or Path(__file__).resolve().parents[1]))
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env["PYTHONPYCACHEPREFIX"] = str(Path(tempfile.gettempdir()) / "bnscope-bench-pycache")

    def call():
        done = subprocess.run(argv, env=env, capture_output=True)
        if done.returncode != 0:
            raise RuntimeError(f"{argv[:4]} failed: {done.stderr.decode()[-2000:]}")

    return call


def tables(rounds: int, provider: str = "cpu", parts=("wide", "cli"), before: Path | None = None) -> str:
    """Both cases as markdown tables; ``before`` (from :func:`export_before`) adds that bnscope beside."""
    out = []
    with tempfile.TemporaryDirectory() as tmp:
        if before:
            (Path(tmp) / "plain").symlink_to(before / "plain")
        if "wide" in parts:
            t0 = time.perf_counter()
            rows = wide_case(Path(tmp), rounds, provider, bool(before))
            out.append(
                f"\nWide BN (8 x 512 ch, [256,512,2,2] x 32 batches, in-process, load + session included; "
                f"{time.perf_counter() - t0:.0f} s):"
            )
            out.append(_format(rows, with_model=False))
        if "cli" in parts:
            out.append("\nAs a user runs it: fresh process each, start-up included:")
            out.append(_format(cli_cases(Path(tmp), rounds, provider, bool(before)), with_model=True))
    return "\n".join(out)


def _format(rows: list[dict], with_model: bool) -> str:
    columns = [("model", "model", "")] if with_model else []
    columns += [("name", "candidate", ""), ("median_ms", "ms", ".0f"), ("paired_ratio", "x plain", ".2f")]
    return common.format_table(rows, columns)
