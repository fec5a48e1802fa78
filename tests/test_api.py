"""The public API's settings and verdicts, as the README shows them: a path may be a str, a wrong
keyword is a BnscopeError (one line, naming the settings there are), and every result has ``passed``."""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import SAMPLES

import bnscope


def test_fold_settings_take_a_str_path(tmp_path):
    out = tmp_path / "folded.onnx"
    settings = bnscope.FoldSettings(output=str(out))
    assert settings.output == out
    result = bnscope.fold_model(SAMPLES / "mlp.onnx", settings)
    assert result.passed and out.is_file()


@pytest.mark.parametrize("kwargs", [{"out": "x.onnx"}, {"output": "x.onnx", "verfy": False}])
def test_an_unknown_setting_is_a_bnscope_error(kwargs):
    with pytest.raises(bnscope.BnscopeError) as info:
        bnscope.FoldSettings(**kwargs)
    message = str(info.value)
    assert "\n" not in message and "output" in message and "Hint" in message


def test_a_path_setting_of_the_wrong_type_is_a_bnscope_error():
    with pytest.raises(bnscope.BnscopeError, match="not a path"):
        bnscope.FoldSettings(output=3)
    with pytest.raises(bnscope.BnscopeError, match="not a path"):
        bnscope.DataChoice(path=["a.npz"])
    assert bnscope.DataChoice(path="a.npz").path == Path("a.npz")


def test_inspect_result_passed_is_no_error_flag():
    broken = bnscope.inspect_model(SAMPLES / "broken.onnx")  # NaN variance in bn4: an error flag
    assert {f.severity for f in broken.flags} >= {"error"} and broken.passed is False
    assert broken.fails_on("warning") and broken.fails_on("error")
    healthy = bnscope.inspect_model(SAMPLES / "resnet_small.onnx")
    assert healthy.passed is True and not any(f.severity == "error" for f in healthy.flags)
