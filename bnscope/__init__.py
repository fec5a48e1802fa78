"""bnscope: inspect, measure, fold and recalibrate BatchNormalization in trained ONNX models."""

__version__ = "0.1.0"
