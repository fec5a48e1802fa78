"""``--ray``: statistics and recalibration on a local Ray cluster (2 CPUs) equal one process.

Only where Ray Data is installed (``pip install "bnscope[ray]"``; CI's ``ray`` leg). Kept few and
small: each Ray Data run starts its actors (seconds). One process is the oracle, run with the
actors' session settings (one thread): the batches, the per-batch numbers and the merge order are
the same, so the moments agree to float64 rounding, and verdicts and diagnosis exactly. A killed
actor is restarted by Ray and its task retried: the result does not change.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from functools import partial
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

ray = pytest.importorskip("ray")
pytest.importorskip("ray.data")

from bnscope.distributed import ClusterOptions  # noqa: E402
from bnscope.errors import BnscopeError  # noqa: E402
from bnscope.stats.collect import StatsOptions  # noqa: E402
from bnscope.workflows.recalibrate import RecalibrateOptions, recalibrate_model  # noqa: E402
from bnscope.workflows.stats import collect_stats  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_models"
RESNET, SHIFTED = SAMPLES / "resnet_small.onnx", SAMPLES / "resnet_small_shifted.npz"
ONE_THREAD = StatsOptions(threads=1)  # the actors' sessions run one thread each (one CPU)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="WARNING")
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import tests/
    yield ClusterOptions("local", workers=2)
    ray.shutdown()


def assert_same_report(got, want, where: str = "report") -> None:
    """The same keys, strings, counts, verdicts and diagnosis; numbers to float64 rounding (1e-10
    relative: the batches and the merge order are one process's)."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and got.keys() == want.keys(), (where, sorted(got), sorted(want))
        for key in want:
            assert_same_report(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list) and not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in want):
        assert isinstance(got, list) and len(got) == len(want), where
        for k, (a, b) in enumerate(zip(got, want)):
            assert_same_report(a, b, f"{where}[{k}]")
    elif isinstance(want, (list, float)):
        x, y = np.asarray(got, dtype=float), np.asarray(want, dtype=float)
        np.testing.assert_allclose(x, y, rtol=1e-10, atol=1e-12, err_msg=where)
    else:
        assert got == want, (where, got, want)


def test_stats_equal_one_process_with_diagnosis(cluster):
    # 12 batches: the diagnosis's second pass reads shards (every 2nd batch, then the others)
    options = StatsOptions(threads=1, batch_size=8)
    want = collect_stats(RESNET, SHIFTED, options=options, diagnose="always").to_dict()
    got = collect_stats(RESNET, SHIFTED, options=options, diagnose="always", cluster=cluster).to_dict()
    assert want["summary"]["diagnosis"] and want["summary"]["verdicts"]["drift"]  # shifted data: it drifts
    assert_same_report(got, want)


def test_a_ray_dataset_is_cut_into_the_same_batches(cluster):
    samples = np.load(SHIFTED)["input"]
    dataset = ray.data.from_numpy([samples[i : i + 25] for i in range(0, 96, 25)])  # blocks unlike the batches
    options = StatsOptions(threads=1, batch_size=10)  # 96 = 9 x 10 + 6: the short batch is the last one
    want = collect_stats(RESNET, SHIFTED, options=options, diagnose="never").to_dict()
    one_actor = ClusterOptions("local", workers=1)  # 2 CPUs: one actor, one for the dataset's own tasks
    got = collect_stats(RESNET, dataset, options=options, diagnose="never", cluster=one_actor).to_dict()
    assert got["data"]["batches"] == 10 and got["data"]["samples"] == 96
    got["data"]["source"] = want["data"]["source"]  # "a Ray Dataset" against the file's name
    assert_same_report(got, want)


def test_parquet_is_read_by_ray_data(cluster, tmp_path):
    samples = np.load(SHIFTED)["input"]
    ray.data.from_items([{"input": x} for x in samples], override_num_blocks=3).write_parquet(str(tmp_path / "calib"))
    options = StatsOptions(threads=1, batch_size=32)
    want = collect_stats(RESNET, SHIFTED, options=options, diagnose="never").to_dict()
    one_actor = ClusterOptions("local", workers=1)
    got = collect_stats(RESNET, tmp_path / "calib", options=options, diagnose="never", cluster=one_actor).to_dict()
    assert got["data"]["source"] == str(tmp_path / "calib")
    got["data"]["source"] = want["data"]["source"]
    assert_same_report(got, want)


def test_an_input_error_in_an_actor_is_the_same_input_error(cluster):
    samples = np.load(SHIFTED)["input"][:8]
    dataset = ray.data.from_items([{"a": x, "b": x} for x in samples])
    with pytest.raises(BnscopeError, match="the Ray dataset has columns a, b, the model takes input. Hint: ") as caught:
        collect_stats(RESNET, dataset, diagnose="never", cluster=ClusterOptions("local", workers=1))
    assert "\n" not in str(caught.value)  # one line, as the CLI prints it (exit 2)


@pytest.mark.parametrize("method", ["sequential", "onepass"])
def test_recalibrated_model_equals_one_process(cluster, tmp_path, method):
    model, data = SAMPLES / "planted_stale.onnx", SAMPLES / "planted_stale_calib.npz"
    options = RecalibrateOptions(method=method, batch_size=16)
    local = recalibrate_model(model, data, tmp_path / "local.onnx", options)
    on_ray = recalibrate_model(model, data, tmp_path / "ray.onnx", options, cluster=cluster)
    assert [(c.name, c.after.verdict) for c in on_ray.layers] == [(c.name, c.after.verdict) for c in local.layers]
    want, got = _initializers(tmp_path / "local.onnx"), _initializers(tmp_path / "ray.onnx")
    assert want.keys() == got.keys()
    for name, value in want.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-6, atol=1e-12, err_msg=name)
    assert any(not np.array_equal(v, _initializers(model).get(k, v)) for k, v in want.items())  # it changed


def _initializers(path: Path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_a_killed_actor_is_retried_and_the_moments_do_not_change(cluster, tmp_path):
    samples = np.load(SHIFTED)["input"]
    gate = tmp_path / "gate"
    gate.mkdir()
    blocks = [{"input": samples[i : i + 8], "late": np.full(len(samples[i : i + 8]), i >= 48)} for i in range(0, 96, 8)]
    dataset = ray.data.from_numpy([b["input"] for b in blocks]).zip(
        ray.data.from_numpy([b["late"] for b in blocks]).rename_columns({"data": "late"})
    )
    dataset = dataset.map_batches(partial(_gate, folder=gate), batch_size=None).drop_columns(["late"])
    options = StatsOptions(threads=1, batch_size=8)
    want = collect_stats(RESNET, SHIFTED, options=options, diagnose="never").to_dict()
    killed = []
    killer = threading.Thread(target=_kill_one_actor, args=(gate, killed), daemon=True)
    killer.start()
    one_actor = ClusterOptions("local", workers=1)  # 2 CPUs: the actor, and the gate's and the dataset's tasks
    got = collect_stats(RESNET, dataset, options=options, diagnose="never", cluster=one_actor).to_dict()
    killer.join(timeout=5)
    assert killed, "no actor was killed"
    assert not Path(f"/proc/{killed[0]}").exists()
    got["data"]["source"] = want["data"]["source"]
    assert_same_report(got, want)


def _gate(batch, folder: Path):
    """Holds the second half of the data back until the test has killed an actor."""
    if batch["late"].any():
        (folder / "reached").touch()
        deadline = time.monotonic() + 60
        while not (folder / "killed").exists() and time.monotonic() < deadline:
            time.sleep(0.05)
    return batch


def _kill_one_actor(gate: Path, killed: list) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        actors = _our_actors()
        if actors and (gate / "reached").exists():
            os.kill(actors[0], signal.SIGKILL)
            killed.append(actors[0])
            time.sleep(0.5)
            break
        time.sleep(0.05)
    (gate / "killed").touch()


def _our_actors() -> list[int]:
    """bnscope's Ray Data actors among this process's descendants (other Ray users may share the machine)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue

    def ours(pid: int) -> bool:
        while pid > 1:
            pid = parents.get(pid, 0)
            if pid == os.getpid():
                return True
        return False

    found = []
    for pid in parents:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            continue
        if b"BatchMoments" in cmdline and ours(pid):
            found.append(pid)
    return sorted(found)


def test_cli_ray_local_prints_the_report_of_one_process(tmp_path):
    args = [str(RESNET), "--data", str(SHIFTED), "--format", "json"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    one = subprocess.run([sys.executable, "-m", "bnscope", "stats", *args], capture_output=True, text=True, env=env)
    on_ray = subprocess.run(
        [sys.executable, "-m", "bnscope", "stats", *args, "--ray", "local", "--workers", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert one.returncode == 0 and on_ray.returncode == 0, on_ray.stderr[-3000:]
    assert_same_report(json.loads(on_ray.stdout), json.loads(one.stdout))


def test_actors_ask_ray_for_a_gpu_only_for_gpu_providers():
    from bnscope.distributed.ray_runner import _wants_gpu

    assert [_wants_gpu(p) for p in ("cuda", "cuda:1", "tensorrt", "ROCMExecutionProvider")] == [True] * 4
    assert [_wants_gpu(p) for p in ("cpu", "openvino:gpu", "CPUExecutionProvider")] == [False] * 3
