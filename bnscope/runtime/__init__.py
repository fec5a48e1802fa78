"""onnxruntime: providers (built-in and plugin EPs), sessions, native messages, timing and comparison."""
