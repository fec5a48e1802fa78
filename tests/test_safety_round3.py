"""Bad input is exit 2 and one line, with nothing written (issue 19, attack round three).

Each case here was exit 3 (a traceback-worthy internal error), exit 0 or 1 with a wrong verdict,
or wrote its output before it found the input bad.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphs import bn_inits, bn_node, init, make_model, ort_run, vi
from helpers import cli
from onnx import helper

ROOT = Path(__file__).parents[1]


def _one_line_exit_2(result) -> None:
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "internal error" not in result.stderr


def _bnscope(*args, cwd=None, env=None, **kwargs) -> subprocess.CompletedProcess:
    environ = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "COLUMNS": "120", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "bnscope", *map(str, args)],
        cwd=cwd,
        env=environ,
        capture_output=True,
        timeout=120,
        **kwargs,
    )


# -- recalibrate --eval-data is checked before -o is written -------------------------------------------
@pytest.fixture
def classifier(tmp_path, rng):
    """x -> Conv -> BN -> GlobalAveragePool -> Flatten -> logits (3 classes), 16 samples of data."""
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        bn_node("c", "b"),
        helper.make_node("GlobalAveragePool", ["b"], ["p"]),
        helper.make_node("Flatten", ["p"], ["logits"]),
    ]
    inits = [init("w", rng.standard_normal((3, 3, 1, 1)).astype(np.float32)), *bn_inits(rng, 3)]
    model = make_model(nodes, [vi("x", ["N", 3, 4, 4])], [vi("logits", ["N", 3])], inits)
    onnx.save(model, tmp_path / "m.onnx")
    x = rng.standard_normal((16, 3, 4, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    return tmp_path, x


@pytest.mark.parametrize(
    "labels",
    [
        np.arange(5) % 3,  # 5 labels for 16 samples
        np.eye(3, dtype=np.float32)[np.arange(16) % 3],  # one-hot float labels (2-D)
        np.array(["cat"] * 16),  # strings
        np.full(16, 0.5),  # float labels
    ],
    ids=["5-for-16", "one-hot", "strings", "floats"],
)
def test_recalibrate_bad_eval_labels_write_nothing(classifier, labels):
    folder, x = classifier
    np.savez(folder / "eval.npz", x=x, labels=labels)
    out = folder / "out.onnx"
    out.write_bytes(b"an existing file that must survive")
    result = cli(
        "recalibrate", folder / "m.onnx", "--data", folder / "x.npy", "-o", out, "--eval-data", folder / "eval.npz"
    )
    _one_line_exit_2(result)
    assert "labels" in result.stderr
    assert out.read_bytes() == b"an existing file that must survive"
    assert sorted(p.name for p in folder.iterdir()) == ["eval.npz", "m.onnx", "out.onnx", "x.npy"]


def test_recalibrate_good_eval_labels_report_top1(classifier):
    folder, x = classifier
    np.savez(folder / "eval.npz", x=x, labels=(np.arange(16) % 3).reshape(16, 1))
    args = ["--data", folder / "x.npy", "-o", folder / "out.onnx", "--eval-data", folder / "eval.npz", "-f", "json"]
    result = cli("recalibrate", folder / "m.onnx", *args)
    assert result.exit_code == 0, result.stderr
    accuracy = json.loads(result.stdout)["accuracy"]
    for key, model in (("before", folder / "m.onnx"), ("after", folder / "out.onnx")):
        predicted = np.argmax(ort_run(onnx.load(model), {"x": x})[0], axis=1)
        assert accuracy[key] == pytest.approx(float(np.mean(predicted == np.arange(16) % 3)))


# -- model inputs: a BN with 0 channels, an external-data location with a NUL byte -------------------
@pytest.fixture
def conv_bn(tmp_path, rng):
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"), bn_node("c", "y")]
    inits = [init("w", rng.standard_normal((3, 3, 1, 1)).astype(np.float32)), *bn_inits(rng, 3)]
    model = make_model(nodes, [vi("x", [2, 3, 4, 4])], [vi("y", [2, 3, 4, 4])], inits)
    onnx.save(model, tmp_path / "m.onnx")
    np.save(tmp_path / "x.npy", rng.standard_normal((8, 3, 4, 4)).astype(np.float32))
    return tmp_path, model


def _commands(folder: Path, model: Path) -> list[list]:
    data = folder / "x.npy"
    return [
        ["inspect", model],
        ["stats", model, "--data", data],
        ["check", model, "--data", data],
        ["fold", model, "-o", folder / "out.onnx"],
        ["run", model, "--random", "--runs", "1"],
        ["recalibrate", model, "--data", data, "-o", folder / "out.onnx"],
    ]


def test_bn_with_zero_channels_is_an_input_error(tmp_path, rng):
    model = make_model([bn_node("x", "y")], [vi("x", [2, 0, 4, 4])], [vi("y", [2, 0, 4, 4])], bn_inits(rng, 0))
    onnx.save(model, tmp_path / "zero.onnx")
    np.save(tmp_path / "x.npy", np.zeros((4, 0, 4, 4), np.float32))
    for args in _commands(tmp_path, tmp_path / "zero.onnx"):
        result = cli(*args)
        _one_line_exit_2(result)
        assert "0 channels" in result.stderr
    assert not (tmp_path / "out.onnx").exists()


def test_external_data_location_with_a_nul_byte_is_an_input_error(conv_bn):
    folder, model = conv_bn
    weight = model.graph.initializer[0]
    weight.ClearField("raw_data")
    weight.ClearField("float_data")
    weight.data_location = onnx.TensorProto.EXTERNAL
    weight.external_data.add(key="location", value="weights\x00.bin")
    (folder / "nul.onnx").write_bytes(model.SerializeToString())
    for args in _commands(folder, folder / "nul.onnx"):
        result = cli(*args)
        _one_line_exit_2(result)
        assert "unsafe external data location" in result.stderr
    assert not (folder / "out.onnx").exists()


# -- data files written by bnscope, edited by hand ------------------------------------------------------
def _baseline(conv_bn) -> tuple[Path, dict]:
    folder, _ = conv_bn
    path = folder / "base.json"
    result = cli("check", folder / "m.onnx", "--data", folder / "x.npy", "--save-baseline", path, "--disable", "max_d")
    assert result.exit_code in (0, 1), result.stderr
    return path, json.loads(path.read_text())


@pytest.mark.parametrize(
    "edit",
    [
        lambda layer: layer.pop("gamma"),
        lambda layer: layer.pop("running_mean"),
        lambda layer: layer.pop("batch_var"),
        lambda layer: layer.update(gamma=None),
        lambda layer: layer.update(beta="1, 2, 3"),
        lambda layer: layer.update(running_var=[1.0, "2", 3.0]),
        lambda layer: layer.update(running_var=[True, False, True]),
        lambda layer: layer.update(gamma=[1.0, 2.0]),
        lambda layer: layer.update(batch_mean=[0.0] * 7),
    ],
    ids=[
        "no-gamma",
        "no-running-mean",
        "no-batch-var",
        "null",
        "string",
        "string-item",
        "bools",
        "short",
        "long-batch",
    ],
)
def test_edited_baseline_is_an_input_error(conv_bn, edit):
    path, doc = _baseline(conv_bn)
    edit(doc["layers"]["bn"])
    path.write_text(json.dumps(doc))
    folder, _ = conv_bn
    result = cli("check", folder / "m.onnx", "--data", folder / "x.npy", "--baseline", path)
    _one_line_exit_2(result)
    assert "baseline" in result.stderr


def test_deeply_nested_json_and_toml_are_input_errors(conv_bn):
    folder, _ = conv_bn
    (folder / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    _one_line_exit_2(cli("check", folder / "m.onnx", "--baseline", folder / "deep.json"))
    (folder / "deep.toml").write_text("a = " + "[" * 100_000 + "]" * 100_000 + "\n")
    result = cli("check", folder / "m.onnx", "--config", folder / "deep.toml")
    _one_line_exit_2(result)
    assert "deep.toml" in result.stderr


def _edit_moments(path: Path, **changes) -> None:
    with np.load(path, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    header = json.loads(str(arrays["header"]))
    header.update(changes)
    arrays["header"] = np.array(json.dumps(header))
    with open(path, "wb") as f:
        np.savez(f, **arrays)


@pytest.mark.parametrize(
    "changes",
    [{"shard": [1, "2"]}, {"samples": "lots"}, {"batches": -1}, {"shard": [2, 2]}, {"layers": {"bn": 1}}],
    ids=["shard-string", "samples-string", "negative", "shard-out-of-range", "layers-dict"],
)
def test_edited_moments_header_is_an_input_error(conv_bn, changes):
    folder, _ = conv_bn
    parts = [folder / f"part{i}.npz" for i in (1, 2)]
    for i, part in enumerate(parts, 1):
        args = ["--data", folder / "x.npy", "-b", "2", "--shard", f"{i}/2", "--save-moments", part]
        assert cli("stats", folder / "m.onnx", *args).exit_code in (0, 1)
    _edit_moments(parts[1], **changes)
    result = cli("merge", *parts)
    _one_line_exit_2(result)
    assert "part2.npz" in result.stderr


# -- outputs: long names, trailing slashes, a deleted working directory ---------------------------------
@pytest.mark.parametrize("length", [250, 255])
def test_output_names_up_to_255_characters(conv_bn, length):
    folder, _ = conv_bn
    cases = (
        ("-o", "fold"),
        ("--save-moments", "stats"),
        ("--html", "stats"),
        ("-o", "recalibrate"),
        ("--save-baseline", "check"),
    )
    for option, command in cases:
        out = folder / ("a" * length)
        args = [command, folder / "m.onnx", option, out] + (["--data", folder / "x.npy"] if command != "fold" else [])
        result = cli(*args)
        assert result.exit_code in (0, 1), result.stderr
        assert out.is_file() and out.stat().st_size > 0
        out.unlink()
    assert sorted(p.name for p in folder.iterdir()) == ["m.onnx", "x.npy"]  # no temp file left


@pytest.mark.parametrize("option", ["-o", "--output", "--save-moments", "--html"])
def test_output_with_a_trailing_slash_writes_nothing(conv_bn, option):
    folder, _ = conv_bn
    command = "fold" if option in ("-o", "--output") else "stats"
    extra = ["--data", folder / "x.npy"] if command == "stats" else []
    result = cli(command, folder / "m.onnx", *extra, option, f"{folder / 'newdir'}/")
    _one_line_exit_2(result)
    assert "names a folder" in result.stderr
    assert sorted(p.name for p in folder.iterdir()) == ["m.onnx", "x.npy"]


def test_relative_output_in_a_deleted_working_directory(conv_bn):
    folder, _ = conv_bn
    gone = folder / "gone"
    script = (
        "import os, sys; os.chdir(sys.argv[1]); os.rmdir(sys.argv[1]); "
        "from bnscope.cli.main import main; sys.argv = ['bnscope', *sys.argv[2:]]; main()"
    )
    for args in (
        ["fold", folder / "m.onnx", "-o", "out.onnx"],
        ["stats", folder / "m.onnx", "--data", folder / "x.npy", "--save-moments", "m.npz"],
    ):
        gone.mkdir()
        result = subprocess.run(
            [sys.executable, "-c", script, gone, *map(str, args)],
            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 2, result.stderr
        assert result.stderr.strip().splitlines() == [result.stderr.strip()] and "working directory" in result.stderr


# -- loader scripts -------------------------------------------------------------------------------------
_LOADERS = {
    "generator_exit": "def load_data():\n    raise GeneratorExit('stop')\n",
    "base_exception": "class Odd(BaseException):\n    pass\n\ndef load_data():\n    raise Odd('odd')\n",
    "inside_the_generator": "import numpy as np\n\ndef load_data():\n    yield {'x': np.zeros((2, 3, 4, 4), np.float32)}\n    raise GeneratorExit\n",
}


@pytest.mark.parametrize("script", sorted(_LOADERS))
@pytest.mark.parametrize("command", ["stats", "check"])
def test_loader_raising_a_base_exception_is_an_input_error(conv_bn, script, command):
    folder, _ = conv_bn
    (folder / "loader.py").write_text(_LOADERS[script])
    result = cli(command, folder / "m.onnx", "--loader", f"{folder / 'loader.py'}:load_data")
    _one_line_exit_2(result)
    assert "data loader loader.py:load_data raised" in result.stderr


def test_loader_print_does_not_corrupt_json(conv_bn):
    folder, _ = conv_bn
    (folder / "loader.py").write_text(
        "import numpy as np\nprint('importing')\n\ndef load_data():\n    print('loading')\n"
        "    for _ in range(2):\n        print('yielding')\n        yield {'x': np.ones((2, 3, 4, 4), np.float32)}\n"
    )
    for command in ("stats", "check"):
        result = cli(command, folder / "m.onnx", "--loader", f"{folder / 'loader.py'}:load_data", "--format", "json")
        assert result.exit_code in (0, 1), result.stderr
        json.loads(result.stdout)  # stdout is only the report
        assert "importing" in result.stderr or command == "check"  # the module is imported once per process
        assert "yielding" in result.stderr and "yielding" not in result.stdout


def test_check_with_an_endless_loader_ends(conv_bn):
    folder, _ = conv_bn
    (folder / "endless.py").write_text(
        "import numpy as np\n\ndef load_data():\n    while True:\n"
        "        open(__file__ + '.count', 'a').write('.')\n"
        "        yield {'x': np.ones((2, 3, 4, 4), np.float32)}\n"
    )
    count = folder / "endless.py.count"
    loader = f"{folder / 'endless.py'}:load_data"
    result = cli("check", folder / "m.onnx", "--loader", loader, "--max-batches", "3")
    assert result.exit_code in (0, 1), result.stderr
    assert 3 <= len(count.read_text()) <= 9  # a few passes (statistics, the diagnosis), each at most 3 batches
    count.unlink()
    default = _bnscope("check", folder / "m.onnx", "--loader", loader, text=True)
    assert default.returncode in (0, 1), default.stderr
    from bnscope.workflows.check.rules import LOADER_BATCHES

    assert LOADER_BATCHES <= len(count.read_text()) <= 3 * LOADER_BATCHES
    assert "default budget" in default.stderr


# -- stdout that cannot take the output -----------------------------------------------------------------
SAMPLE = ROOT / "sample_models" / "planted_stale"


@pytest.mark.parametrize(
    "env",
    [{"PYTHONIOENCODING": "ascii"}, {"LC_ALL": "C", "PYTHONUTF8": "0"}, {"PYTHONIOENCODING": "cp1252"}],
    ids=["ascii", "C-locale", "cp1252"],
)
@pytest.mark.parametrize("fmt", ["table", "markdown", "json"])
def test_stdout_that_cannot_encode_the_output(env, fmt):
    result = _bnscope("stats", f"{SAMPLE}.onnx", "--data", f"{SAMPLE}_calib.npz", "--format", fmt, env=env)
    assert result.returncode == 0, result.stderr
    text = result.stdout.decode("ascii" if "cp1252" not in env.values() else "cp1252")
    if fmt == "table":
        assert "+/-d" in text and "to +/-0." in text  # the header and the sample budget


def test_cyrillic_name_on_a_cp1252_stdout(conv_bn):
    folder, model = conv_bn
    model.graph.node[1].name = "слой"
    onnx.save(model, folder / "cyr.onnx")
    for fmt in ("table", "markdown", "json"):
        result = _bnscope("inspect", folder / "cyr.onnx", "--format", fmt, env={"PYTHONIOENCODING": "cp1252"})
        assert result.returncode == 0, result.stderr
        text = result.stdout.decode("cp1252")
        assert "\\u0441\\u043b\\u043e\\u0439" in text  # escaped, recoverable, not an exit 3


@pytest.mark.parametrize("fmt", ["table", "json", "csv"])
def test_stdout_on_dev_full(fmt):
    with open("/dev/full", "wb") as full:
        args = ["stats", f"{SAMPLE}.onnx", "--data", f"{SAMPLE}_calib.npz", "--format", fmt]
        result = subprocess.run(
            [sys.executable, "-m", "bnscope", *args],
            env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
            timeout=120,
        )
    assert result.returncode == 2, result.stderr
    assert (
        result.stderr.strip()
        == "error: cannot write to stdout (No space left on device). Hint: check free space, or redirect it elsewhere"
    )


def test_library_warnings_are_one_log_line(conv_bn):
    folder, _ = conv_bn
    (folder / "warns.py").write_text(
        "import warnings\nimport numpy as np\n\ndef load_data():\n"
        "    np.sqrt(np.array([-1.0]))\n    warnings.warn('from a library')\n"
        "    yield {'x': np.ones((2, 3, 4, 4), np.float32)}\n"
    )
    result = _bnscope("stats", folder / "m.onnx", "--loader", f"{folder / 'warns.py'}:load_data", text=True)
    assert result.returncode == 0, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == [
        "warning: RuntimeWarning: invalid value encountered in sqrt (warns.py:5)",
        "warning: UserWarning: from a library (warns.py:6)",
    ]


@pytest.mark.parametrize("command", ["inspect", "fold", "check", "stats"])
def test_a_weight_whose_bytes_do_not_fill_its_shape_is_an_input_error(conv_bn, command):
    """onnx.checker accepts such a tensor; numpy's reshape then failed inside inspect/fold/check (exit 3)."""
    folder, model = conv_bn
    damaged = onnx.ModelProto()
    damaged.CopyFrom(model)
    weight = next(t for t in damaged.graph.initializer if t.name == "w")
    weight.raw_data = weight.raw_data + b"\0\0\0\0"
    path = folder / "damaged.onnx"
    onnx.save(damaged, path)
    before = path.read_bytes()
    extra = {"fold": ["-o", str(folder / "out.onnx")], "stats": ["--data", str(folder / "x.npy")]}.get(command, [])
    result = cli(command, path, *extra)
    _one_line_exit_2(result)
    assert "tensor 'w' holds 40 bytes, but its shape [3, 3, 1, 1] of float32 needs 36" in result.stderr
    assert path.read_bytes() == before and not (folder / "out.onnx").exists()
