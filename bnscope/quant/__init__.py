"""int8 quantisation on top of onnxruntime.quantization: prepare, risk, exact equalisation, plan, measure."""
