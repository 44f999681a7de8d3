"""Deployment: ``export`` (checkpoint -> ONNX / TorchScript / OpenVINO) and ``runtime`` (running those files)."""
