"""Running bnscope on more than one process or machine, without Ray: the shard + merge recipe
(Slurm job arrays, Kubernetes Indexed Jobs) as separate processes, and ``--ray`` where Ray is not
installed (exit 2 with the install line; nothing imports Ray unless ``--ray`` is given).
The Ray runs themselves are in test_ray.py (only where Ray Data is installed).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from helpers import SAMPLES

ROOT = Path(__file__).resolve().parents[1]
RESNET, SHIFTED = SAMPLES / "resnet_small.onnx", SAMPLES / "resnet_small_shifted.npz"
ENV = {**os.environ, "PYTHONPATH": str(ROOT)}
# Ray made unimportable, as in an install without the extra (also where the extra is installed)
WITHOUT_RAY = (
    "import sys; sys.modules['ray'] = None; from bnscope.cli.main import main; sys.argv[0] = 'bnscope'; main()"
)


def bnscope(*args, code: str | None = None) -> subprocess.CompletedProcess:
    command = (
        [sys.executable, "-c", code, *map(str, args)] if code else [sys.executable, "-m", "bnscope", *map(str, args)]
    )
    return subprocess.run(command, capture_output=True, text=True, env=ENV, cwd=ROOT, timeout=300)


def test_shards_in_separate_processes_merge_into_the_run_of_one(tmp_path):
    # What a Slurm array or an Indexed Job runs: one process per shard, then one merge.
    common = ["--data", SHIFTED, "--batch-size", 10, "--format", "json"]
    shards = [
        subprocess.Popen(
            [sys.executable, "-m", "bnscope", "stats", RESNET, *map(str, common), "--shard", f"{i}/3"]
            + ["--save-moments", str(tmp_path / f"part_{i}.npz")],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=ENV,
            cwd=ROOT,
        )
        for i in (1, 2, 3)
    ]
    for shard in shards:
        assert shard.wait(timeout=300) == 0, shard.stderr.read().decode()[-2000:]
    merged = bnscope("merge", *(tmp_path / f"part_{i}.npz" for i in (1, 2, 3)), "--per-channel", "--format", "json")
    whole = bnscope("stats", RESNET, *common, "--diagnose", "never", "--per-channel")  # shards never diagnose
    assert merged.returncode == 0 and whole.returncode == 0, merged.stderr + whole.stderr
    got, want = json.loads(merged.stdout), json.loads(whole.stdout)
    assert got["data"]["samples"] == want["data"]["samples"] == 96
    assert got["data"]["batches"] == want["data"]["batches"] == 10
    assert got["summary"]["verdicts"] == want["summary"]["verdicts"]
    for a, b in zip(got["layers"], want["layers"], strict=True):
        assert (a["name"], a["count"], a["verdict"]) == (b["name"], b["count"], b["verdict"])
        for key in ("batch_mean", "batch_var", "d", "log_r", "batch_mean_spread"):
            np.testing.assert_allclose(a[key], b[key], rtol=1e-9, atol=1e-12, err_msg=key)


def test_ray_without_ray_installed_is_an_input_error_with_the_install_line(tmp_path):
    for command in (
        ["stats", RESNET, "--data", SHIFTED, "--ray", "local"],
        ["recalibrate", RESNET, "--data", SHIFTED, "-o", tmp_path / "out.onnx", "--ray", "auto"],
    ):
        result = bnscope(*command, code=WITHOUT_RAY)
        assert result.returncode == 2, result.stderr
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and 'pip install "bnscope[ray]"' in lines[0], result.stderr
        assert result.stdout == ""
    assert not (tmp_path / "out.onnx").exists()


def test_without_ray_bnscope_does_not_import_it():
    code = (
        "import sys; from bnscope.cli.main import main; sys.argv = ['bnscope', 'stats', sys.argv[1], '--data', "
        "sys.argv[2], '-f', 'json']\ntry:\n    main()\nexcept SystemExit as e:\n    assert e.code == 0, e.code\n"
        "print('ray' in sys.modules, file=sys.stderr)"
    )
    result = bnscope(RESNET, SHIFTED, code=code)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == "False"
