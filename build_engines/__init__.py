"""Build pipeline for the classifier's model variants (`make engines`).

Stages: export the source ONNX, prune it, quantize a CPU variant, write
precision-explicit ONNX files for TensorRT, and measure each against the source.
"""
