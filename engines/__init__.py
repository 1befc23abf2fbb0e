"""Models and inference: model cards, runtime backends (TensorRT, ONNX Runtime), tiling."""
