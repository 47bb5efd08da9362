"""gptstore-onnx: ONNX export, int8 quantization and ONNX Runtime serving."""
