"""ONNX export and quantization of trained models."""
