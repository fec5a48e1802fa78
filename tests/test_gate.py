"""One meaning of "fail" for CI (bnscope.stats.gate): decided drift fails, unsure passes with one
warning line naming the layers and the samples that decide them, --strict fails on unsure too, in
stats --fail-on-drift and check alike."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import CALIB, RESNET, RESNET_BN, SAMPLES, cli

from bnscope.stats.gate import FAIL, PASS, UNSURE, limit_call


@pytest.mark.parametrize(
    ("values", "se", "outcome"),
    [
        ([0.1, 0.4], [0.01, 0.3], PASS),  # under the limit, however noisy
        ([0.1, 0.95], [0.01, 0.2], FAIL),  # 0.95 - 2 * 0.2 = 0.55 > 0.5: decided
        ([0.1, -0.95], [0.01, 0.2], FAIL),  # |value|
        ([0.1, 0.6], [0.01, 0.2], UNSURE),  # over, but 0.6 - 0.4 < 0.5
        ([0.1, np.nan], [0.01, 0.01], FAIL),  # NaN never passes
    ],
)
def test_limit_call_asks_the_point_estimate_minus_two_standard_errors(values, se, outcome):
    assert limit_call(values, se, 0.5, samples=100).outcome == outcome


def test_limit_call_says_how_many_samples_would_decide_the_nearest_channel():
    # channels 0.6 (se 0.2) and 0.8 (se 0.2): the 0.8 one decides first, at 100 * (2 * 0.2 / 0.3)^2
    call = limit_call([0.6, 0.8], [0.2, 0.2], 0.5, samples=100)
    assert call.outcome == UNSURE and call.samples_to_decide == int(np.ceil(100 * (0.4 / 0.3) ** 2))


FEW = ("--batch-size", "4", "--max-batches", "2", "--diagnose", "never")  # 8 samples: every layer unsure


def test_stats_unsure_passes_with_one_warning_and_strict_fails():
    doc = json.loads(cli("stats", RESNET, "--data", CALIB, *FEW, "--format", "json").stdout)
    assert {x["verdict"] for x in doc["layers"]} == {"unsure"}
    passed = cli("stats", RESNET, "--data", CALIB, *FEW, "--fail-on-drift", "--format", "json")
    assert passed.exit_code == 0
    (line,) = passed.stderr.strip().splitlines()
    for layer in doc["layers"][:6]:
        assert f"{layer['name']} (about {layer['samples_to_decide']} samples decide)" in line
    strict = cli("stats", RESNET, "--data", CALIB, *FEW, "--fail-on-drift", "--strict", "--format", "json")
    assert strict.exit_code == 1 and strict.stderr == ""


def _unsure_limit(layer: dict) -> float | None:
    """A limit the layer's worst channel exceeds, but by less than its 2 standard errors."""
    d, se = np.abs(np.array(layer["d"])), np.array(layer["se_d"])
    worst = int(np.argmax(d))
    limit = d[worst] - 0.25 * se[worst]
    return float(limit) if limit > 0 and not np.any(d - 2 * se > limit) else None  # no channel decided beyond it


def test_check_gates_like_stats_unsure_passes_with_a_warning_strict_fails(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stats = json.loads(cli("stats", RESNET, "--data", CALIB, "--per-channel", "--format", "json").stdout)
    name, limit = next((x["name"], _unsure_limit(x)) for x in stats["layers"] if _unsure_limit(x))
    args = ("check", RESNET, "--data", CALIB, "--max-layer-d", "5", "--layer-max-d", f"{name}:{limit}")
    result = cli(*args, "--format", "json")
    assert result.exit_code == 0, result.stderr
    doc = json.loads(result.stdout)
    assert result.exit_code == 0 and doc["passed"]
    (rule,) = [r for r in doc["results"] if r["rule"] == "max_d" and r["unsure"]]
    assert rule["layer"] == name and rule["samples_to_decide"] > stats["data"]["samples"]
    (line,) = result.stderr.strip().splitlines()
    assert f"{name} (about {rule['samples_to_decide']} samples decide)" in line
    strict = cli(*args, "--strict", "--format", "json")
    assert strict.exit_code == 1 and strict.stderr == ""
    assert [r["layer"] for r in json.loads(strict.stdout)["results"] if not r["passed"]] == [name]
    (tmp_path / "bnscope.toml").write_text("strict = true\n")
    assert cli(*args).exit_code == 1  # the config key


def test_check_fails_a_decided_drift_without_strict(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("check", RESNET, "--data", SAMPLES / "resnet_small_shifted.npz", "--format", "json")
    doc = json.loads(result.stdout)
    assert result.exit_code == 1 and not doc["passed"]
    failed = {r["layer"] for r in doc["results"] if not r["passed"] and not r["unsure"]}
    assert failed and failed <= set(RESNET_BN)
