"""Edge deployment: one ONNX / OpenVINO / TorchScript model per artifact with the memory bank inside.

``exporter`` and ``graph`` build it (torch); ``runtime``, ``preprocess`` and ``model_meta`` score it
with ONNX Runtime or OpenVINO and import neither torch nor Ray, so nothing here is imported eagerly.
"""
