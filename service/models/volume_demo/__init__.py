"""The demo volume classifier: a small 3D CNN trained on phantom chest CT volumes
(``pacs-xai demo train-volume``).

Beside this module: ``model.yaml`` (its card, ``input.kind: volume``) and ``volume.pth`` (state
dict for :class:`~service.models.volume_demo.network.VolumeDemoNet`).
"""
