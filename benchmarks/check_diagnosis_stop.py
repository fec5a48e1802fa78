"""Does the diagnosis's second pass, stopping at its first decided look, give the diagnosis of the
whole pass? Runs ``collect_stats`` twice per case, once as shipped and once with every look
undecided (the pass reads all the data), and prints each case's causes, how many batches the
stopping pass read, and the number of cases that differ (the exit code is 1 if any do).

    python benchmarks/check_diagnosis_stop.py                          # the shipped samples
    python benchmarks/check_diagnosis_stop.py --extra MODEL.onnx DATA.npz 16 [--extra ...]

Cases: every sample model with each of its .npz files at batch 2, 4, 8, 16, 32 and 64, the planted
stale and shifted samples repeated eight times at batch 4-32 (where the pass has many shards to stop early in),
then each ``--extra`` (model, data, batch size). A case the model refuses (a fixed batch size, data
for another model) is skipped and listed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np

import bnscope.stats.companion as companion
from bnscope import collect_stats
from bnscope.errors import BnscopeError
from bnscope.stats.collect import StatsOptions

SAMPLES = Path(__file__).resolve().parents[1] / "sample_models"
BATCHES = (2, 4, 8, 16, 32, 64)  # 2: train_eval_mismatch fixes its batch size to 2
STOPS = companion.decided


def diagnosis(model: Path, data: Path, batch: int, whole: bool) -> tuple[dict, int, int]:
    """(causes, batches the second pass read, batches of the first)."""
    companion.decided = (lambda _result: False) if whole else STOPS
    try:
        result = collect_stats(model, data, options=StatsOptions(batch_size=batch))
    finally:
        companion.decided = STOPS
    causes = {f.cause: f.layers for f in result.diagnosis}
    second = result.companion[0].batches if result.companion else 0
    return causes, second, result.layers[0].batches if result.layers else 0


def cases(tmp: Path, extra: list[list[str]]):
    for model in sorted(SAMPLES.glob("*.onnx")):
        for data in sorted(SAMPLES.glob(f"{model.stem}*.npz")):
            for batch in BATCHES:
                yield model, data, batch
    for stem, data_name in (("planted_stale", "planted_stale_calib"), ("resnet_small", "resnet_small_shifted")):
        arrays = np.load(SAMPLES / f"{data_name}.npz")
        repeated = tmp / f"{data_name}_x8.npz"
        np.savez(repeated, **{k: np.concatenate([arrays[k]] * 8) for k in arrays.files})
        for batch in BATCHES[1:5]:
            yield SAMPLES / f"{stem}.onnx", repeated, batch
    for model, data, batch in extra:
        yield Path(model), Path(data), int(batch)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--extra", nargs=3, action="append", default=[], metavar=("MODEL", "DATA", "BATCH"))
    args = parser.parse_args(argv)
    compared = differ = second_passes = 0
    skipped = []
    with tempfile.TemporaryDirectory() as tmp:
        for model, data, batch in cases(Path(tmp), args.extra):
            try:
                stopped, read, total = diagnosis(model, data, batch, whole=False)
                whole = diagnosis(model, data, batch, whole=True)[0]
            except BnscopeError as exc:
                skipped.append(f"{model.name} {data.name} b{batch}: {str(exc).splitlines()[0][:80]}")
                continue
            compared += 1
            second_passes += read > 0
            same = stopped == whole
            differ += not same
            label = "same" if same else f"DIFFERS (whole pass: {whole})"
            print(f"{model.name} {data.name} b{batch}: second pass read {read} of {total} batches; {stopped}; {label}")
    print(f"\n{compared} cases ({second_passes} with a second pass), {differ} differ; {len(skipped)} skipped:")
    for line in skipped:
        print(f"  {line}")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
