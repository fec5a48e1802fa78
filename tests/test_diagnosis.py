"""The diagnosis: on models whose cause is known it names that cause and only the root layers.

Sample models (sample_models/build.py) with one planted cause each::

    planted_stale:        x -> [Conv-BN-ReLU] x4; bn2's running mean moved by +1.5 std after training
    train_eval_mismatch:  x -> [Gemm-BN-ReLU] x4 -> Gemm; running stats from train mode, batches of 2
    broken:               bn2_stale (mean +3..5 std, var x10), bn3_never_updated (0 / 1), bn4 NaN var
    resnet_small + resnet_small_shifted.npz: the inputs scaled by 1.8 and offset by 0.7

and hand-made LayerStats for the graph logic (branches, eval-only evidence).
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from helpers import SAMPLES, cli

from bnscope.stats.collect import StatsOptions
from bnscope.stats.diagnosis import CAUSES, diagnose
from bnscope.stats.summary import Thresholds
from bnscope.workflows.stats import collect_stats


def _stats(name: str, data: str | None = None, **kwargs):
    return collect_stats(SAMPLES / f"{name}.onnx", SAMPLES / (data or f"{name}_calib.npz"), **kwargs)


def _causes(result) -> dict[str, tuple[str, ...]]:
    return {f.cause: f.layers for f in result.diagnosis}


def test_diagnose_planted_stale_names_only_the_root_layer():
    result = _stats("planted_stale")
    verdicts = {layer.name: layer.verdict for layer in result.layers}
    assert verdicts["bn1"] == "ok" and all(verdicts[n] != "ok" for n in ("bn2", "bn3", "bn4"))  # eval: all 3 drift
    assert _causes(result) == {"stale_layers": ("bn2",)}
    finding = result.diagnosis[0]
    assert finding.evidence["downstream"] == ["bn3", "bn4"] and finding.evidence["before"] == ["bn1"]
    assert result.companion_mode == "train"
    assert all(result.companion_of(n).max_abs_d < 0.1 for n in ("bn3", "bn4"))  # isolated, they match


def test_diagnose_planted_stale_eval_only_still_finds_the_root():
    result = _stats("planted_stale", diagnose="never")
    assert result.companion_mode is None and result.companion == ()
    assert _causes(result) == {"stale_layers": ("bn2",)}
    assert "look alike" in result.diagnosis[0].message


def test_diagnose_train_eval_mismatch():
    result = _stats("train_eval_mismatch")  # the model's fixed batch (2) is its training batch size
    causes = _causes(result)
    assert list(causes) == ["train_eval_mismatch"]
    assert causes["train_eval_mismatch"] == ("bn2", "bn3", "bn4")  # bn1 sees the data itself: it matches
    for name in causes["train_eval_mismatch"]:
        layer, train = next(x for x in result.layers if x.name == name), result.companion_of(name)
        assert layer.verdict == "drift" and train.verdict == "ok" and train.max_abs_d < 0.1


def test_diagnose_input_shift_names_the_first_layer():
    result = _stats("resnet_small", "resnet_small_shifted.npz")
    assert _causes(result) == {"input_shift": ("stem_bn",)}
    evidence = result.diagnosis[0].evidence
    assert evidence["later_drifting_in_train_mode"] == [] and evidence["later_train_max_abs_d"] < 0.2
    assert result.causes() == {"stem_bn": "input_shift", **{x.name: "after stem_bn" for x in result.layers[1:]}}
    assert "preprocessing" in result.diagnosis[0].action


def test_diagnose_broken_names_never_updated_and_stale_not_their_consequences():
    result = _stats("broken")
    assert _causes(result) == {"never_updated": ("bn3_never_updated",), "stale_layers": ("bn2_stale",)}
    assert [f.cause for f in result.diagnosis] == ["never_updated", "stale_layers"]  # most important first


def test_diagnosis_empty_and_no_second_pass_when_statistics_match():
    result = _stats("resnet_small")
    assert result.passed and result.diagnosis == () and result.companion_mode is None
    always = _stats("resnet_small", diagnose="always")
    assert always.companion_mode == "train" and always.diagnosis == ()


def test_diagnose_insufficient_data_gives_a_sample_budget():
    options = StatsOptions(batch_size=2, max_batches=1)  # two samples
    result = _stats("train_eval_mismatch", options=options)
    unsure = [layer for layer in result.layers if layer.verdict == "unsure"]
    assert unsure and _causes(result)["insufficient_data"] == tuple(x.name for x in unsure)
    finding = next(f for f in result.diagnosis if f.cause == "insufficient_data")
    assert finding.evidence["samples"] == 2 and finding.evidence["samples_needed"] > 2


def test_stats_cli_json_and_table_show_the_diagnosis():
    args = ["stats", str(SAMPLES / "planted_stale.onnx"), "--data", str(SAMPLES / "planted_stale_calib.npz")]
    doc = json.loads(cli(*args, "--format", "json").stdout)
    (finding,) = doc["summary"]["diagnosis"]
    assert set(finding) == {"cause", "layers", "evidence", "action", "message"}
    assert finding["cause"] in CAUSES and finding["layers"] == ["bn2"]
    assert doc["summary"]["diagnosis_basis"] == "eval and train"
    assert doc["layers"][2]["other_mode"]["mode"] == "train"
    assert [layer["cause"] for layer in doc["layers"]] == [None, "stale_layers", "after bn2", "after bn2"]
    budget = doc["summary"]["sample_budget"]
    assert budget["resolution_d"] > 0 and [r["abs_d"] for r in budget["samples_needed"]] == [0.5, 0.25, 0.1]
    table = cli(*args, "--format", "table", env={"COLUMNS": "200"}).stdout
    assert "stale layers: bn2" in table and "bnscope recalibrate" in table and "train max|d|" in table
    assert table.count("after bn2") == 2
    assert "sample budget" in table
    never = cli(*args, "--diagnose", "never", "--format", "json")
    assert json.loads(never.stdout)["summary"]["diagnosis_basis"] == "eval only"


def test_check_reports_the_diagnosis():
    model, data = SAMPLES / "planted_stale.onnx", SAMPLES / "planted_stale_calib.npz"
    result = cli("check", str(model), "--data", str(data), "--format", "json")
    assert result.exit_code == 1
    assert [f["cause"] for f in json.loads(result.stdout)["diagnosis"]] == ["stale_layers"]
    table = cli("check", str(model), "--data", str(data), env={"COLUMNS": "200"}).stdout
    assert "stale layers: bn2" in table


# -- the graph logic on hand-made layers --------------------------------------------------------------
def _layer(name: str, verdict: str, d: float = 0.0, never: bool = False):
    return SimpleNamespace(
        name=name,
        verdict=verdict,
        max_abs_d=d,
        max_abs_log_r=0.0,
        mean_abs_d=d,
        mean_abs_log_r=0.0,
        running_mean=np.zeros(4) if never else np.full(4, 0.3),
        running_var=np.ones(4) if never else np.full(4, 2.0),
        samples=64,
        max_se_d=0.05,
        samples_to_decide=None,
        why="",
    )


#   a1 -> a2 -> a3        (a2 stale: a3 drifts in eval mode only)
#   b1 -> b2              (b2 drifts in eval mode only, nothing wrong before it: mismatch)
UPSTREAM = {"a1": set(), "a2": {"a1"}, "a3": {"a1", "a2"}, "b1": set(), "b2": {"b1"}}


def test_diagnose_branches_root_causes_and_mismatch_apart():
    ev = [_layer("a1", "ok"), _layer("a2", "drift", 1.5), _layer("a3", "stale", 4), _layer("b1", "ok")]
    ev.append(_layer("b2", "drift", 0.8))
    tr = [_layer("a1", "ok"), _layer("a2", "drift", 1.5), _layer("a3", "ok"), _layer("b1", "ok"), _layer("b2", "ok")]
    found = {f.cause: f.layers for f in diagnose(ev, tr, UPSTREAM, Thresholds())}
    assert found == {"stale_layers": ("a2",), "train_eval_mismatch": ("b2",)}


def test_diagnose_never_updated_root_hides_its_consequences_without_train_evidence():
    ev = [_layer("a1", "ok"), _layer("a2", "stale", 2, never=True), _layer("a3", "drift", 1.0)]
    ev += [_layer("b1", "ok"), _layer("b2", "ok")]
    found = {f.cause: f.layers for f in diagnose(ev, None, UPSTREAM, Thresholds())}
    assert found == {"never_updated": ("a2",)}


def test_diagnose_first_layer_drift_on_each_branch_is_input_shift():
    ev = [_layer(n, "drift", 1.0) for n in ("a1", "a2", "a3", "b1", "b2")]
    tr = [_layer("a1", "drift", 1.0), _layer("b1", "drift", 1.0)] + [_layer(n, "ok") for n in ("a2", "a3", "b2")]
    (finding,) = diagnose(ev, tr, UPSTREAM, Thresholds())
    assert finding.cause == "input_shift" and finding.layers == ("a1", "b1")


@pytest.mark.parametrize("verdicts", [("ok", "ok", "ok"), ("dead", "ok", "broken")])
def test_diagnose_nothing_to_say(verdicts):
    layers = [_layer(n, v) for n, v in zip(("a1", "a2", "a3"), verdicts)]
    assert diagnose(layers, layers, UPSTREAM, Thresholds()) == ()
    assert diagnose([], None, None, Thresholds()) == ()


def test_fail_on_drift_fails_on_drift_not_on_unsure():
    model, data = SAMPLES / "train_eval_mismatch.onnx", SAMPLES / "train_eval_mismatch_calib.npz"
    args = ["stats", str(model), "--data", str(data), "--max-batches", "1", "--fail-on-drift", "--format", "json"]
    two_samples = cli(*args)
    verdicts = {layer["verdict"] for layer in json.loads(two_samples.stdout)["layers"]}
    assert verdicts == {"unsure"} and two_samples.exit_code == 0
    stale = SAMPLES / "planted_stale.onnx", SAMPLES / "planted_stale_calib.npz"
    assert cli("stats", stale[0], "--data", stale[1], "--fail-on-drift").exit_code == 1


def test_random_data_runs_no_second_pass_unless_asked():
    model = SAMPLES / "resnet_small.onnx"
    auto = collect_stats(model, random=True, options=StatsOptions(max_batches=1))
    assert auto.companion_mode is None and auto.to_dict()["summary"]["diagnosis_basis"] == "eval only"
    always = collect_stats(model, random=True, options=StatsOptions(max_batches=1), diagnose="always")
    assert always.companion_mode == "train"


def test_markdown_reports_carry_the_diagnosis():
    model, data = str(SAMPLES / "planted_stale.onnx"), str(SAMPLES / "planted_stale_calib.npz")
    stats_md = cli("stats", model, "--data", data, "--format", "markdown").stdout
    check_md = cli("check", model, "--data", data, "--format", "markdown").stdout
    for text in (stats_md, check_md):
        assert "1. stale layers: bn2" in text and "what to do:" in text


def test_unknown_diagnose_setting_is_an_input_error():
    from bnscope.errors import BnscopeError

    with pytest.raises(BnscopeError, match="auto, always, never"):
        _stats("resnet_small", diagnose="sometimes")


def test_stats_says_which_layers_are_in_training_mode():
    result = _stats("training_mode_export")
    (note,) = [line for line in result.reading if "training mode" in line]
    assert "(bn1, bn2)" in note and "bnscope recalibrate" in note
    assert not any("training mode" in line for line in _stats("planted_stale").reading)


# -- planted causes in resnet_small (branchy, residual Adds) --------------------------------------------
#   stem_bn -> block1_bn1 -> block1_bn2 -> (+stem) -> block2_bn1 -> block2_bn2 -> (+) <- block2_proj_bn
#                                                  \---------------------------------> block2_proj_bn
def _planted_resnet(tmp_path: Path, edits: dict) -> Path:
    """resnet_small with running statistics edited: edits[bn] = f(mean, var) -> (mean, var)."""
    import onnx
    from onnx import numpy_helper

    model = onnx.load(SAMPLES / "resnet_small.onnx")
    inits = {t.name: t for t in model.graph.initializer}
    for bn, edit in edits.items():
        keys = (f"{bn}.running_mean", f"{bn}.running_var")
        new = edit(*(numpy_helper.to_array(inits[k]).astype(np.float64) for k in keys))
        for key, value in zip(keys, new):
            inits[key].CopyFrom(numpy_helper.from_array(np.asarray(value, np.float32), key))
    path = tmp_path / "planted.onnx"
    onnx.save(model, path)
    return path


def _resnet_stats(path: Path, **kwargs):
    return collect_stats(path, SAMPLES / "resnet_small_calib.npz", **kwargs)


def test_diagnose_never_updated_in_resnet_its_unsure_consequences_are_not_insufficient_data(tmp_path):
    result = _resnet_stats(_planted_resnet(tmp_path, {"block1_bn2": lambda m, v: (0 * m, 0 * v + 1)}))
    assert _causes(result) == {"never_updated": ("block1_bn2",)}
    after = result.diagnosis[0].evidence["downstream"]
    assert "block2_bn1" in after and "block2_bn2" in after
    assert all(result.causes()[n] == "after block1_bn2" for n in after)


def test_diagnose_two_stale_layers_in_series_the_layers_before_exclude_their_consequences(tmp_path):
    moved = lambda m, v: (m + 1.5 * np.sqrt(v), v)  # noqa: E731
    result = _resnet_stats(_planted_resnet(tmp_path, {"block1_bn1": moved, "block2_proj_bn": moved}))
    assert _causes(result) == {"stale_layers": ("block1_bn1", "block2_proj_bn")}
    evidence = result.diagnosis[0].evidence
    assert evidence["before"] == ["stem_bn"]  # block1_bn2 drifts, behind block1_bn1: not a layer that matches
    assert evidence["downstream"] == ["block1_bn2", "block2_bn1", "block2_bn2"]
    assert "The layers before them match (max|d| <= 0.0" in result.diagnosis[0].message


def test_diagnose_stale_variance_only_shows_the_log_r_that_makes_it_stale(tmp_path):
    result = _resnet_stats(_planted_resnet(tmp_path, {"block1_bn1": lambda m, v: (m, 4 * v)}))
    assert _causes(result) == {"stale_layers": ("block1_bn1",)}
    assert "max|log r| 0.7" in result.diagnosis[0].message.split("The layers before")[0]


def test_diagnose_stale_layer_deep_in_a_branch_names_only_it(tmp_path):
    moved = lambda m, v: (m + 1.5 * np.sqrt(v), v)  # noqa: E731
    result = _resnet_stats(_planted_resnet(tmp_path, {"block2_bn1": moved}))
    assert _causes(result) == {"stale_layers": ("block2_bn1",)}
    assert result.diagnosis[0].evidence["downstream"] == ["block2_bn2"]  # not block2_proj_bn, on the other branch
    assert result.causes() == {"block2_bn1": "stale_layers", "block2_bn2": "after block2_bn1"}


def test_diagnose_two_samples_budget_is_not_extrapolated_from_noise():
    # with 2 samples one channel's |log r| just over its threshold is noise: no 'sits on a threshold'
    result = _resnet_stats(SAMPLES / "resnet_small.onnx", options=StatsOptions(batch_size=2, max_batches=1))
    (finding,) = result.diagnosis
    assert finding.cause == "insufficient_data" and len(finding.layers) == len(result.layers)
    assert "sit on a threshold" not in finding.message
    assert 10 <= finding.evidence["samples_needed"] < 100  # ~10 values per channel, |d| to +-0.5


@pytest.mark.parametrize("command", ["stats", "merge"])
def test_fail_on_drift_help_says_unsure_passes(command):
    text = cli(command, "--help", env={"COLUMNS": "300"}).stdout
    assert "unsure" in " ".join(text.split())


def test_diagnose_train_mode_only_names_no_eval_numbers():
    result = _stats("planted_stale", options=StatsOptions(mode="train"), diagnose="never")
    assert result.mode == "train" and _causes(result) == {"stale_layers": ("bn2",)}
    message = result.diagnosis[0].message
    assert "nan" not in message and "eval" not in message.split("The layers before")[0]


@pytest.mark.parametrize(("scale", "offset", "mostly"), [(1.8, 0.0, "scale"), (1.0, 0.7, "offset")])
def test_diagnose_input_shift_by_scale_or_offset_alone(tmp_path, scale, offset, mostly):
    x = np.load(SAMPLES / "resnet_small_calib.npz")["input"]
    np.savez(tmp_path / "shifted.npz", input=(x * scale + offset).astype(np.float32))
    result = collect_stats(SAMPLES / "resnet_small.onnx", tmp_path / "shifted.npz")
    assert _causes(result) == {"input_shift": ("stem_bn",)}
    assert result.diagnosis[0].evidence["mostly"] == mostly
    assert result.causes() == {"stem_bn": "input_shift", **{x.name: "after stem_bn" for x in result.layers[1:]}}


def test_layer_why_names_the_layers_own_log_r_limit():
    thresholds = Thresholds(per_layer_max_log_r={"bn4": 0.3})
    result = _stats("train_eval_mismatch", thresholds=thresholds, diagnose="never")
    bn4 = next(x for x in result.layers if x.name == "bn4")
    assert bn4.verdict == "inherited" and "|log r| > 0.3 " in bn4.why  # drifts after bn2, its own numbers kept


def test_random_data_gets_no_causal_diagnosis():
    """Under the banner that random data mean nothing, no cause and no "check the preprocessing"
    (review of issue 23: every model got "input shift" with --random)."""
    model = SAMPLES / "bn_after_flatten.onnx"
    result = cli("stats", model, "--random")
    assert result.exit_code == 0 and "drift" in result.stdout  # random data do drift here
    assert "input shift" not in result.stdout and "preprocessing" not in result.stdout
    report = json.loads(cli("stats", model, "--random", "--format", "json").stdout)
    assert report["summary"]["diagnosis"] == [] and all(layer["cause"] is None for layer in report["layers"])


def test_one_batch_shows_no_noise_as_a_dash_not_nan():
    """BN's batch-to-batch noise needs two batches; with one the table shows '-', never 'nan' as a
    value (JSON: null)."""
    model, data = SAMPLES / "bn_before_conv.onnx", SAMPLES / "bn_before_conv_calib.npz"
    result = cli("stats", model, "--data", data)
    assert result.exit_code == 0 and " 1 batches" in result.stdout
    assert "nan" not in result.stdout.lower()
    report = json.loads(cli("stats", model, "--data", data, "--format", "json").stdout)
    assert all(layer["batch_mean_noise"] is None for layer in report["layers"])
