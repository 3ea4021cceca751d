"""Exporting the towers to other runtimes (ONNX) and running them there."""
