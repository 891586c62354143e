"""The demo classifier: a compact CNN trained on phantom chest radiographs (``pacs-xai demo train``).

Beside this module: ``model.yaml`` (its card), ``demo.onnx``, ``demo.pt`` (TorchScript),
``demo.pth`` (state dict for :class:`~service.models.demo.network.DemoNet`) and
``saliency-masker.pt`` (the real-time saliency masker trained against it).
"""
