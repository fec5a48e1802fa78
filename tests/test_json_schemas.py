"""Every command's ``--format json`` output is valid against the JSON Schema shipped in the package
(bnscope/schemas), checked on real output; stats's JSON is compact unless --per-channel."""

from __future__ import annotations

import copy
import json
import sys

import jsonschema
import pytest
from helpers import BROKEN, CALIB, RESNET, SAMPLES, SHIFTED, cli

from bnscope.schemas import COMMANDS, schema

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

STALE, STALE_CALIB = SAMPLES / "planted_stale.onnx", SAMPLES / "planted_stale_calib.npz"
TRAIN = SAMPLES / "training_mode_export.onnx"
PER_CHANNEL = ("batch_mean", "batch_var", "running_mean", "running_var", "d", "log_r", "kl", "se_d", "se_log_r")

CASES = {
    "inspect": [("inspect", BROKEN), ("inspect", TRAIN)],
    "stats": [
        ("stats", STALE, "--data", STALE_CALIB),
        ("stats", STALE, "--data", STALE_CALIB, "--per-channel"),
        ("stats", RESNET, "--random"),
        ("stats", BROKEN, "--data", SAMPLES / "broken_calib.npz", "--allow-nonfinite"),
    ],
    "fold": [("fold", RESNET, "-o", "folded.onnx"), ("fold", BROKEN, "-o", "b.onnx", "--dry-run")],
    "check": [("check", STALE, "--data", STALE_CALIB), ("check", BROKEN, RESNET)],
    "run": [("run", RESNET)],
    "recalibrate": [("recalibrate", RESNET, "--data", SHIFTED, "-o", "recal.onnx")],
    "providers": [("providers",)],
}


@pytest.fixture
def in_tmp(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _json(*args) -> dict:
    result = cli(*args, "--format", "json")
    assert result.exit_code in (0, 1), result.stderr
    return json.loads(result.stdout)


def _validate(command: str, doc: dict) -> None:
    jsonschema.Draft202012Validator(schema(command)).validate(doc)


def test_the_schemas_are_schemas_and_ship_as_package_data():
    for command in COMMANDS:
        jsonschema.Draft202012Validator.check_schema(schema(command))
    project = tomllib.loads((SAMPLES.parent / "pyproject.toml").read_text())
    assert "*.schema.json" in project["tool"]["setuptools"]["package-data"]["bnscope.schemas"]
    assert any(dep.startswith("jsonschema") for dep in project["project"]["optional-dependencies"]["test"])


@pytest.mark.parametrize("command", list(CASES))
def test_real_output_of_every_command_is_valid(command, in_tmp):
    for args in CASES[command]:
        _validate(command, _json(*args))


def test_merge_output_is_valid_against_the_stats_schema(in_tmp):
    for i in (1, 2):
        assert cli("stats", RESNET, "--data", CALIB, "--shard", f"{i}/2", "--save-moments", f"m{i}.npz").exit_code == 0
    for extra in ((), ("--per-channel",)):
        _validate("merge", _json("merge", "m1.npz", "m2.npz", *extra))


def test_quantize_output_is_valid(in_tmp):
    _validate("quantize", _json("quantize", RESNET, "--data", CALIB, "-o", "q.onnx"))


def test_stats_json_is_compact_unless_per_channel():
    compact = _json("stats", STALE, "--data", STALE_CALIB)
    full = _json("stats", STALE, "--data", STALE_CALIB, "--per-channel")
    for small, big in zip(compact["layers"], full["layers"]):
        assert not set(PER_CHANNEL) & set(small) and set(PER_CHANNEL) <= set(big)
        assert all(len(big[key]) == big["channels"] for key in PER_CHANNEL)
        assert {k: v for k, v in big.items() if k not in PER_CHANNEL + ("batch_mean_spread",)} == small
    assert compact["summary"] == full["summary"]


def test_the_schemas_reject_what_they_do_not_describe():
    doc = _json("stats", STALE, "--data", STALE_CALIB)
    _validate("stats", doc)
    for change in (
        lambda d: d["layers"][0].update(verdict="fine"),  # not a verdict
        lambda d: d["layers"][0].pop("max_abs_d"),  # a required figure
        lambda d: d["summary"].update(surprise=1),  # an undocumented field
        lambda d: d["summary"]["diagnosis"][0].update(cause="bad luck"),
    ):
        bad = copy.deepcopy(doc)
        change(bad)
        with pytest.raises(jsonschema.ValidationError):
            _validate("stats", bad)
