"""TensorRT engines for the GPU classifiers, the last stage of `make engines` (GPU hosts only).

- ``engines``: plans, builds, checks and installs each engine with its manifest (``build_all``);
  ``python -m build_engines.tensorrt.engines`` runs this stage alone.
- ``opt_profile``: an engine's optimization profile, derived from its Triton config.
- ``onnx_checks``: what an ONNX file must satisfy before TensorRT sees it (checked on any host).
- ``gpu``: the GPU an engine is built for, from the CUDA driver.
- ``progress``: build progress as log lines.

Only ``engines`` imports ``tensorrt``, and only when it builds; the rest run on CPU hosts.
"""
