"""Sessions for an edited copy of a model whose weights live in external data files, without writing
anything beside the model.

Newer onnxruntime builds take the model as bytes plus the folder its data files are in
(``session.model_external_initializers_file_folder_path``), so nothing is written at all; they also
refuse data files reached through a link outside the model's folder. Older builds (1.19) ignore
that setting and look in the working directory; there the copy is written to a folder in the system
temp folder, with a link to each data file, and removed once the session is made (onnxruntime has
read or mapped the data by then). Which applies is probed once, on a one-tensor model.
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper

from bnscope.runtime.sessions import Session, create_session

_FOLDER_OPTION = "session.model_external_initializers_file_folder_path"


def session_with_external_data(model: onnx.ModelProto, folder: Path, provider: str = "cpu", **settings) -> Session:
    """A session for ``model`` (in memory) whose external data files lie in ``folder``.

    ``settings`` are ``create_session``'s keyword arguments.
    """
    folder = Path(folder).resolve()
    if bytes_models_read_a_given_folder():
        return create_session(model.SerializeToString(), provider, external_data_dir=folder, **settings)
    staging = Path(tempfile.mkdtemp(prefix="bnscope-session-"))
    try:
        for name in data_locations(model):
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            os.symlink(folder / name, target)
        path = staging / "model.onnx"
        path.write_bytes(model.SerializeToString())
        return create_session(path, provider, **settings)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def data_locations(model: onnx.ModelProto) -> set[str]:
    """The external data locations the model's tensors name (relative to its folder)."""
    return {
        entry.value
        for tensor in onnx.external_data_helper._get_all_tensors(model)
        if tensor.data_location == TensorProto.EXTERNAL
        for entry in tensor.external_data
        if entry.key == "location"
    }


@functools.cache
def bytes_models_read_a_given_folder() -> bool:
    """Whether this onnxruntime reads a bytes model's external data from the folder it is given."""
    with tempfile.TemporaryDirectory(prefix="bnscope-probe-") as folder:
        value = np.arange(4, dtype=np.float32)
        Path(folder, "w.bin").write_bytes(value.tobytes())
        weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4])
        weight.data_location = TensorProto.EXTERNAL
        _set_entries(weight, {"location": "w.bin", "offset": "0", "length": str(value.nbytes)})
        graph = helper.make_graph(
            [helper.make_node("Identity", ["w"], ["y"])],
            "probe",
            [],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
            [weight],
        )
        probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
        options = ort.SessionOptions()
        options.log_severity_level = 4
        options.add_session_config_entry(_FOLDER_OPTION, folder)
        try:
            session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
            return bool(np.array_equal(session.run(None, {})[0], value))
        except Exception:  # onnxruntime's pybind errors derive from Exception only
            return False


def _set_entries(tensor: TensorProto, entries: dict[str, str]) -> None:
    for key, value in entries.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
