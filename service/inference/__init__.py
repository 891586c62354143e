"""Model cards and the runners that execute them (ONNX Runtime, TorchScript/torch)."""
