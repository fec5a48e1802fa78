"""``bnscope check``: rules configured from bnscope.toml or pyproject's [tool.bnscope] with the CLI on
top, baselines that catch moved statistics, and JUnit output with one test case per rule and layer.

The configuration is read from the working directory, so every test runs in its own ``tmp_path``
(``monkeypatch.chdir``) and passes model paths as absolute paths.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from helpers import BROKEN, CALIB, RESNET, RESNET_BN, SAMPLES, SHIFTED, assert_input_error, cli
from onnx import numpy_helper

from bnscope.errors import BnscopeError
from bnscope.workflows.check.config import (
    RULES,
    CheckConfig,
    config_from_table,
    load_config,
    with_overrides,
)
from bnscope.workflows.recalibrate import recalibrate_model


def check_json(*args) -> tuple[int, dict]:
    result = cli("check", *args, "--format", "json")
    assert result.exit_code in (0, 1), result.stderr
    doc = json.loads(result.stdout)
    assert doc["schema_version"] == 1
    assert doc["passed"] == (result.exit_code == 0)
    return result.exit_code, doc


def outcomes(doc: dict, rule: str) -> dict:
    """layer -> passed, for one rule."""
    return {r["layer"]: r["passed"] for r in doc["results"] if r["rule"] == rule}


@pytest.fixture
def in_tmp(tmp_path, monkeypatch) -> Path:
    monkeypatch.chdir(tmp_path)
    return tmp_path


# -- defaults -------------------------------------------------------------------------------------------
def test_check_defaults_without_a_config(in_tmp):
    code, doc = check_json(BROKEN)
    assert code == 1
    assert outcomes(doc, "no_nonfinite") == {
        "bn1_healthy": True,
        "bn2_stale": True,
        "bn3_never_updated": True,
        "bn4_nan_var": False,
    }
    assert outcomes(doc, "no_never_updated")["bn3_never_updated"] is False
    assert all(outcomes(doc, "no_training_mode").values())
    assert {r["rule"] for r in doc["not_run"]} == {"max_d", "max_log_r"}
    assert {r["rule"] for r in doc["results"]} == {"no_nonfinite", "no_never_updated", "no_training_mode"}


def test_check_training_mode_rule(in_tmp):
    code, doc = check_json(SAMPLES / "training_mode.onnx")
    assert code == 1 and outcomes(doc, "no_training_mode") == {"bn1": False}


def test_check_off_by_default_rules(in_tmp):
    code, doc = check_json(SAMPLES / "shared_conv_output.onnx", "--enable", "all_foldable", "--enable", "no_bn")
    assert code == 1
    assert outcomes(doc, "all_foldable") == {"bn1": False, "bn2": False}
    assert outcomes(doc, "no_bn") == {None: False}
    code, doc = check_json(SAMPLES / "no_bn.onnx", "--enable", "no_bn")
    assert code == 0 and outcomes(doc, "no_bn") == {None: True}


def test_check_with_nothing_to_check_hints_only_what_would_help(in_tmp):
    """No BN: data add no rule, so the hint does not ask for --data (it did, even with --data given)."""
    no_bn = SAMPLES / "no_bn.onnx"
    line = assert_input_error(
        cli("check", no_bn, "--data", SAMPLES / "no_bn_calib.npz"), "ran no rule", "--enable no_bn"
    )
    assert "give --data" not in line
    assert "give --data" not in assert_input_error(cli("check", no_bn), "ran no rule")


def test_check_fold_verified_rule(in_tmp):
    code, doc = check_json(RESNET, "--enable", "fold_verified")
    assert code == 0
    (result,) = [r for r in doc["results"] if r["rule"] == "fold_verified"]
    assert result["passed"] and "6/6 BN folded" in result["message"]


def test_check_loads_and_folds_the_model_once(in_tmp, monkeypatch):
    import bnscope.onnxio.model_io
    import bnscope.workflows.check.rules
    import bnscope.workflows.fold
    import bnscope.workflows.stats

    calls = {"load": 0, "fold": 0}

    def counting(name, real):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        return wrapper

    for module in (bnscope.workflows.check.rules, bnscope.workflows.stats, bnscope.onnxio.model_io):
        monkeypatch.setattr(module, "load_model", counting("load", module.load_model))
    monkeypatch.setattr(
        bnscope.workflows.fold, "fold_batchnorm", counting("fold", bnscope.workflows.fold.fold_batchnorm)
    )
    html = in_tmp / "report.html"
    result = cli("check", RESNET, "--data", CALIB, "--enable", "fold_verified", "--html", html)
    assert result.exit_code == 0, result.stderr
    assert calls == {"load": 1, "fold": 1}
    assert "6 of 6 BN layer(s) folded" in html.read_text()  # the rule's fold, shown in the report


def test_check_html_with_all_foldable_alone_shows_a_fold(in_tmp):
    html = in_tmp / "report.html"
    assert cli("check", RESNET, "--enable", "all_foldable", "--html", html).exit_code == 0
    assert "6 of 6 BN layer(s) folded" in html.read_text()
    assert cli("check", RESNET, "--html", html).exit_code == 0
    assert "BN layer(s) folded" not in html.read_text()


def test_check_drift_rules_with_data(in_tmp):
    code, doc = check_json(RESNET, "--data", CALIB)
    assert code == 0 and doc["not_run"] == []
    assert outcomes(doc, "max_d") == dict.fromkeys(RESNET_BN, True)
    code, doc = check_json(RESNET, "--data", SHIFTED)
    assert code == 1
    assert not any(outcomes(doc, "max_d").values())


# -- configuration files ---------------------------------------------------------------------------------
LENIENT_RULES = "no_nonfinite = false\nno_never_updated = false\n"


def test_check_config_from_bnscope_toml(in_tmp):
    (in_tmp / "bnscope.toml").write_text("[rules]\n" + LENIENT_RULES)
    code, doc = check_json(BROKEN)
    assert code == 0
    assert {r["rule"] for r in doc["results"]} == {"no_training_mode"}


def test_check_config_from_pyproject(in_tmp):
    (in_tmp / "pyproject.toml").write_text(
        '[project]\nname = "x"\n\n[tool.bnscope]\nrules = { no_nonfinite = false, no_never_updated = false }\n'
    )
    assert cli("check", BROKEN).exit_code == 0


def test_check_pyproject_without_a_bnscope_table_means_defaults(in_tmp):
    (in_tmp / "pyproject.toml").write_text('[project]\nname = "x"\n\n[tool.other]\nmax_d = 0.0\n')
    assert cli("check", BROKEN).exit_code == 1
    assert load_config(cwd=in_tmp) == CheckConfig()


def test_check_explicit_pyproject_without_a_bnscope_table_is_an_input_error(in_tmp):
    # --config names the file to use: one that configures nothing is a mistake, not the defaults
    (in_tmp / "pyproject.toml").write_text('[project]\nname = "x"\n')
    result = cli("check", BROKEN, "--config", in_tmp / "pyproject.toml")
    assert result.exit_code == 2
    assert "no [tool.bnscope] table" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_check_bnscope_toml_wins_over_pyproject(in_tmp):
    (in_tmp / "pyproject.toml").write_text("[tool.bnscope]\nrules = { no_nonfinite = true }\n")
    (in_tmp / "bnscope.toml").write_text("[rules]\n" + LENIENT_RULES)
    assert cli("check", BROKEN).exit_code == 0


def test_check_explicit_config_path(in_tmp):
    (in_tmp / "ci").mkdir()
    (in_tmp / "ci" / "gate.toml").write_text("[rules]\n" + LENIENT_RULES)
    assert cli("check", BROKEN).exit_code == 1  # not picked up from ./
    assert cli("check", BROKEN, "--config", in_tmp / "ci" / "gate.toml").exit_code == 0
    pyproject = in_tmp / "ci" / "pyproject.toml"
    pyproject.write_text("[tool.bnscope.rules]\n" + LENIENT_RULES)
    assert cli("check", BROKEN, "--config", pyproject).exit_code == 0


def test_check_limits_and_layer_overrides_from_the_file(in_tmp):
    (in_tmp / "bnscope.toml").write_text(
        "strict = true\nmax_layer_d = 0.001\nmax_layer_log_r = 10.0\n\n[layer_max_d]\nstem_bn = 5.0\n"
    )
    code, doc = check_json(RESNET, "--data", CALIB)
    assert code == 1
    assert outcomes(doc, "max_d") == {name: name == "stem_bn" for name in RESNET_BN}
    assert all(outcomes(doc, "max_log_r").values())
    stem = next(r for r in doc["results"] if r["rule"] == "max_d" and r["layer"] == "stem_bn")
    assert "limit 5" in stem["message"]


def test_check_cli_overrides_beat_the_file(in_tmp):
    (in_tmp / "bnscope.toml").write_text(
        "strict = true\nmax_layer_d = 0.001\n\n[rules]\n" + LENIENT_RULES + "\n[layer_max_d]\nstem_bn = 5.0\n"
    )
    # --max-layer-d beats the file's max_layer_d; the file's per-layer limit stays; --layer-max-d beats it
    code, doc = check_json(RESNET, "--data", CALIB, "--max-layer-d", "5", "--layer-max-d", "stem_bn:0.001")
    assert code == 1 and outcomes(doc, "max_d") == {name: name != "stem_bn" for name in RESNET_BN}
    # --enable beats the file's "off"
    assert cli("check", BROKEN).exit_code == 0
    code, doc = check_json(BROKEN, "--enable", "no_never_updated")
    assert code == 1 and outcomes(doc, "no_never_updated")["bn3_never_updated"] is False
    # --disable beats the default "on"
    assert cli("check", RESNET, "--data", SHIFTED, "--disable", "max_d", "--disable", "max_log_r").exit_code == 0


def test_check_old_limit_flags_still_work_with_one_warning(in_tmp):
    for old, new, rule in (("--max-d", "--max-layer-d", "max_d"), ("--max-log-r", "--max-layer-log-r", "max_log_r")):
        result = cli("check", RESNET, "--data", CALIB, old, "0.001", "--strict", "--format", "json")
        assert result.exit_code == 1  # the limit applied: every layer's worst channel is above 0.001
        assert not any(outcomes(json.loads(result.stdout), rule).values())
        assert result.stderr.strip().splitlines() == [
            f"warning: check {old} is deprecated; use {new} (the limit on each layer's worst channel)"
        ]
        assert cli("check", RESNET, "--data", CALIB, new, "0.001", "--strict").stderr == ""
    assert_input_error(cli("check", BROKEN, "--max-d", "1", "--max-layer-d", "1"), "--max-layer-d")
    shown = cli("check", "--help").stdout
    assert "--max-layer-d" in shown and "--max-d " not in shown  # the old spelling is hidden


def test_check_old_limit_keys_in_the_file_still_work_with_one_warning(in_tmp):
    (in_tmp / "bnscope.toml").write_text("strict = true\nmax_d = 0.001\nmax_log_r = 10.0\n")
    result = cli("check", RESNET, "--data", CALIB, "--format", "json")
    doc = json.loads(result.stdout)
    assert result.exit_code == 1
    assert not any(outcomes(doc, "max_d").values()) and all(outcomes(doc, "max_log_r").values())
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2 and "max_d is deprecated; use max_layer_d" in lines[0]
    assert "max_log_r is deprecated; use max_layer_log_r" in lines[1]
    (in_tmp / "bnscope.toml").write_text("max_d = 1.0\nmax_layer_d = 1.0\n")
    assert_input_error(cli("check", BROKEN), "both max_d and max_layer_d")


@pytest.mark.parametrize(
    "text, needle",
    [
        ("max_dd = 1.0\n", "unknown bnscope setting"),
        ("[rules]\nno_such_rule = true\n", "unknown rule"),
        ("max_d = = 1\n", "not valid TOML"),
    ],
)
def test_check_bad_config_is_an_input_error(in_tmp, text, needle):
    (in_tmp / "bnscope.toml").write_text(text)
    assert_input_error(cli("check", BROKEN), needle)


def test_check_unknown_key_in_pyproject_is_an_input_error(in_tmp):
    (in_tmp / "pyproject.toml").write_text("[tool.bnscope]\nmax_dd = 1.0\n")
    assert_input_error(cli("check", BROKEN), "max_dd")


def test_check_missing_config_file_is_an_input_error(in_tmp):
    assert_input_error(cli("check", BROKEN, "--config", in_tmp / "nothere.toml"), "not found")


@pytest.mark.parametrize("option", [("--enable", "nope"), ("--disable", "nope"), ("--layer-max-d", "stem_bn")])
def test_check_bad_cli_option_is_an_input_error(in_tmp, option):
    assert_input_error(cli("check", BROKEN, *option), option[1])


@pytest.mark.parametrize(
    "text", ['max_layer_d = "abc"\n', 'rules = "all"\n', "layer_max_d = 3\n", 'batch_size = "32"\n']
)
def test_check_config_value_of_the_wrong_type_is_an_input_error(in_tmp, text):
    (in_tmp / "bnscope.toml").write_text(text)
    result = cli("check", RESNET, "--data", CALIB)
    assert result.exit_code == 2, result.stderr


def test_config_from_table_and_overrides_as_a_library():
    config = config_from_table(
        {"max_layer_d": 2.0, "rules": {"all_foldable": True, "max_log_r": False}, "layer_max_d": {"a": 1.0}}
    )
    assert config.max_layer_d == 2.0 and config.enabled("all_foldable") and not config.enabled("max_log_r")
    merged = with_overrides(
        config, enable=["max_log_r"], disable=["all_foldable"], max_layer_d=None, layer_max_d={"b": 3.0}
    )
    assert merged.max_layer_d == 2.0  # None leaves the file's value
    assert merged.enabled("max_log_r") and not merged.enabled("all_foldable")
    assert merged.layer_max_d == {"a": 1.0, "b": 3.0}
    assert config.rules["all_foldable"] is True  # the original is untouched
    assert set(CheckConfig().rules) == set(RULES)
    with pytest.raises(BnscopeError):
        config_from_table({"bogus": 1})


# -- baselines ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("baseline") / "base.json"
    result = cli("check", RESNET, "--data", CALIB, "--save-baseline", path)
    assert result.exit_code == 0, result.stderr
    return path


def test_baseline_file_contents(baseline):
    doc = json.loads(baseline.read_text())
    assert doc["kind"] == "bnscope-baseline" and doc["schema_version"] == 1
    assert list(doc["layers"]) == RESNET_BN
    stem = doc["layers"]["stem_bn"]
    assert {"gamma", "beta", "running_mean", "running_var", "batch_mean", "batch_var"} <= set(stem)
    assert len(stem["running_var"]) == len(stem["batch_mean"]) == 16
    assert not [p for p in baseline.parent.iterdir() if p.name != baseline.name]  # no temp file left


def test_baseline_passes_against_itself(baseline, in_tmp):
    code, doc = check_json(RESNET, "--data", CALIB, "--baseline", baseline)
    assert code == 0
    assert outcomes(doc, "baseline") == dict.fromkeys(RESNET_BN, True)


def test_baseline_passes_against_an_identical_copy_without_data(baseline, in_tmp):
    copy = in_tmp / "copy.onnx"
    copy.write_bytes(RESNET.read_bytes())
    code, doc = check_json(copy, "--baseline", baseline)
    assert code == 0 and outcomes(doc, "baseline") == dict.fromkeys(RESNET_BN, True)


def test_baseline_fails_against_a_recalibrated_copy(baseline, in_tmp):
    recal = in_tmp / "recal.onnx"
    recalibrate_model(RESNET, SHIFTED, recal)
    code, doc = check_json(recal, "--data", CALIB, "--baseline", baseline)
    assert code == 1
    assert outcomes(doc, "baseline") == dict.fromkeys(RESNET_BN, False)
    stem = next(r for r in doc["results"] if r["rule"] == "baseline" and r["layer"] == "stem_bn")
    assert "running mean moved" in stem["message"]


def scaled_variance(tmp: Path, layer: str = "block1_bn2", factor: float = 10.0) -> Path:
    model = onnx.load(str(RESNET))
    (node,) = [n for n in model.graph.node if n.name == layer]
    for t in model.graph.initializer:
        if t.name == node.input[4]:
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * np.float32(factor), t.name))
    path = tmp / "scaled.onnx"
    onnx.save_model(model, str(path))
    return path


def test_baseline_fails_when_one_running_variance_is_scaled(baseline, in_tmp):
    code, doc = check_json(scaled_variance(in_tmp), "--data", CALIB, "--baseline", baseline)
    assert code == 1
    got = outcomes(doc, "baseline")
    assert got["block1_bn2"] is False
    assert got["stem_bn"] and got["block1_bn1"]  # upstream of the change: nothing moved
    message = next(r["message"] for r in doc["results"] if r["rule"] == "baseline" and r["layer"] == "block1_bn2")
    assert "running variance changed" in message


def test_baseline_parameters_alone_pinpoint_the_layer(baseline, in_tmp):
    """Without data only parameters are compared: exactly the edited layer fails."""
    code, doc = check_json(scaled_variance(in_tmp), "--baseline", baseline)
    assert code == 1
    assert outcomes(doc, "baseline") == {name: name != "block1_bn2" for name in RESNET_BN}


def test_baseline_of_another_model_reports_missing_and_new_layers(baseline, in_tmp):
    code, doc = check_json(BROKEN, "--baseline", baseline, "--disable", "no_nonfinite", "--disable", "no_never_updated")
    assert code == 1
    messages = {r["layer"]: r["message"] for r in doc["results"] if r["rule"] == "baseline"}
    assert "missing" in messages["stem_bn"] and "not in the baseline" in messages["bn1_healthy"]


def test_baseline_rule_can_be_disabled(baseline, in_tmp):
    assert cli("check", scaled_variance(in_tmp), "--baseline", baseline, "--disable", "baseline").exit_code == 0


@pytest.mark.parametrize("content", ["not json", json.dumps({"kind": "something else"})])
def test_bad_baseline_file_is_an_input_error(in_tmp, content):
    (in_tmp / "base.json").write_text(content)
    assert_input_error(cli("check", RESNET, "--baseline", in_tmp / "base.json"), "baseline")


def test_missing_baseline_file_is_an_input_error(in_tmp):
    assert_input_error(cli("check", RESNET, "--baseline", in_tmp / "nothere.json"), "baseline")


# -- JUnit -------------------------------------------------------------------------------------------------
def junit(*args) -> tuple[int, ET.Element, dict]:
    result = cli("check", *args, "--format", "junit")
    assert result.exit_code in (0, 1), result.stderr
    assert result.stdout.startswith("<?xml")
    _, doc = check_json(*args)
    return result.exit_code, ET.fromstring(result.stdout), doc


def test_junit_one_testcase_per_rule_and_layer(in_tmp):
    code, root, doc = junit(BROKEN)
    assert code == 1
    (suite,) = root.findall("testsuite")
    cases = suite.findall("testcase")
    run = [c for c in cases if c.find("skipped") is None]
    pairs = [(c.get("classname"), c.get("name")) for c in run]
    assert len(pairs) == len(set(pairs)) == len(doc["results"])
    assert set(pairs) == {(f"bnscope.{r['rule']}", r["layer"] or "model") for r in doc["results"]}
    failed = {(c.get("classname"), c.get("name")) for c in run if c.find("failure") is not None}
    assert failed == {("bnscope.no_nonfinite", "bn4_nan_var"), ("bnscope.no_never_updated", "bn3_never_updated")}
    assert int(suite.get("failures")) == int(root.get("failures")) == 2
    skipped = [c for c in cases if c.find("skipped") is not None]
    assert {c.get("classname") for c in skipped} == {"bnscope.max_d", "bnscope.max_log_r"}
    assert int(suite.get("skipped")) == len(skipped)
    failure = next(c for c in run if c.find("failure") is not None).find("failure")
    assert failure.get("message") and failure.text


def test_junit_with_data_covers_every_layer_of_every_rule(in_tmp):
    code, root, doc = junit(RESNET, "--data", CALIB)
    assert code == 0
    cases = root.find("testsuite").findall("testcase")
    for rule in ("no_nonfinite", "no_never_updated", "no_training_mode", "max_d", "max_log_r"):
        assert sorted(c.get("name") for c in cases if c.get("classname") == f"bnscope.{rule}") == sorted(RESNET_BN)
    assert all(c.find("failure") is None and c.find("skipped") is None for c in cases)


def test_junit_failures_carry_the_diagnosis_and_the_action(in_tmp):
    """A CI log shows the failing layer's cause and what to do, as the table and markdown do."""
    model, data = SAMPLES / "planted_stale.onnx", SAMPLES / "planted_stale_calib.npz"
    code, root, _ = junit(model, "--data", data)
    failures = {
        (c.get("classname"), c.get("name")): c.find("failure")
        for c in root.iter("testcase")
        if c.find("failure") is not None
    }
    assert code == 1 and ("bnscope.max_d", "bn2") in failures
    assert "diagnosis: stale layers: bn2" in failures["bnscope.max_d", "bn2"].text
    assert "what to do: re-estimate" in failures["bnscope.max_d", "bn2"].text
    consequences = [f for (_, layer), f in failures.items() if layer in ("bn3", "bn4")]
    assert consequences and all(
        "cause: after bn2" in f.get("message") and "what to do:" in f.text for f in consequences
    )


def test_junit_tests_attribute_counts_every_testcase(in_tmp):
    _, root, _ = junit(BROKEN)
    suite = root.find("testsuite")
    assert int(suite.get("tests")) == len(suite.findall("testcase"))


def test_check_fold_verified_verifies_on_the_check_provider(in_tmp, monkeypatch):
    # check -p P: the fold_verified rule verified on the CPU only, never on the provider asked for
    import bnscope.workflows.check.rules as rules
    from bnscope.workflows.check.config import with_overrides

    seen = []

    def recording(loaded, settings):
        seen.append(settings.providers)
        return real(loaded, replace(settings, providers=("cpu",)))  # this build's other EP runs no Conv

    real = rules.fold_model
    monkeypatch.setattr(rules, "fold_model", recording)
    monkeypatch.setattr(rules, "distinct_providers", lambda names, first: (first, *names))
    config = with_overrides(CheckConfig(), enable=["fold_verified"])
    result = rules.check_model(RESNET, config, provider="cuda:1")
    assert seen == [("cpu", "cuda:1")] and result.passed
