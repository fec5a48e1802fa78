"""What the output says must mean something: verdicts that agree with the diagnosis (defined in one
table), the cause and the action in JUnit, no sample budget next to a decided drift, no cause from
random data."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET

from helpers import RESNET, SAMPLES, SHIFTED, cli

from bnscope.stats.verdict import VERDICT_TABLE, VERDICTS

STALE = SAMPLES / "planted_stale.onnx"
STALE_CALIB = SAMPLES / "planted_stale_calib.npz"


def _stats(*args) -> dict:
    result = cli("stats", *args, "--format", "json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def test_the_root_layer_carries_the_cause_and_the_layers_after_it_inherit():
    doc = _stats(STALE, "--data", STALE_CALIB)
    by_name = {x["name"]: x for x in doc["layers"]}
    (finding,) = doc["summary"]["diagnosis"]
    assert finding["cause"] == "stale_layers" and finding["layers"] == ["bn2"]
    assert by_name["bn2"]["verdict"] == "stale" and by_name["bn2"]["cause"] == "stale_layers"
    for name in finding["evidence"]["downstream"]:
        assert by_name[name]["verdict"] == "inherited" and by_name[name]["cause"] == "after bn2"
    assert by_name["bn1"]["verdict"] == "ok"


def test_every_verdict_is_defined_once_and_documented():
    docs = (SAMPLES.parent / "docs" / "stats.md").read_text()
    assert set(VERDICTS) == set(VERDICT_TABLE)
    for verdict, info in VERDICT_TABLE.items():
        assert f"| `{verdict}` | {info.meaning} | {info.gate} |" in docs  # the docs' table is the module's
        assert info.gate in ("pass", "unsure", "fail")


def test_junit_carries_the_cause_and_the_action_of_each_failing_layer(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stats = _stats(STALE, "--data", STALE_CALIB)
    (finding,) = stats["summary"]["diagnosis"]
    result = cli("check", STALE, "--data", STALE_CALIB, "--format", "junit")
    assert result.exit_code == 1
    cases = [c for c in ET.fromstring(result.stdout.encode()).iter("testcase") if c.find("failure") is not None]
    assert {c.get("name") for c in cases} == {"bn2", "bn3", "bn4"}
    causes = {x["name"]: x["cause"] for x in stats["layers"]}
    for case in cases:
        layer, failure = case.get("name"), case.find("failure")
        assert f"cause: {causes[layer]}" in failure.get("message")
        assert finding["message"] in failure.text and f"what to do: {finding['action']}" in failure.text


def test_no_sample_budget_when_every_layer_that_drifts_is_decided():
    doc = _stats(RESNET, "--data", SHIFTED)
    assert all(x["verdict"] in ("drift", "inherited") for x in doc["layers"])  # decided far beyond
    assert doc["summary"]["sample_budget"]["resolution_d"] is None
    assert "sample budget" not in cli("stats", RESNET, "--data", SHIFTED).stdout


def test_the_sample_budget_stays_where_more_samples_could_change_a_verdict():
    doc = _stats(STALE, "--data", STALE_CALIB)
    assert doc["summary"]["sample_budget"]["resolution_d"] is not None  # bn1 is ok: resolution matters


def test_random_data_gives_no_cause_and_says_so():
    for diagnose in ("auto", "always"):
        doc = _stats(RESNET, "--random", "--diagnose", diagnose)
        assert doc["summary"]["diagnosis"] == [] and all(x["cause"] is None for x in doc["layers"])
        assert any("random data cannot show a cause" in line for line in doc["summary"]["reading"])
    table = cli("stats", RESNET, "--random").stdout
    assert "check the preprocessing" not in table and "random data cannot show a cause" in table
