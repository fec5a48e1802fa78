"""ONNX models on disk and in memory: load/save (atomic), external data, graph queries, sorting, edits."""
