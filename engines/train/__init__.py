"""Training recipe of the reference denoiser (RED-CNN-class, PyTorch): simulated full-dose /
quarter-dose pairs (`data`), the network (`model`), and the recipe that trains it, exports ONNX and
writes its card (`train`).  Only `data` is importable without torch."""
