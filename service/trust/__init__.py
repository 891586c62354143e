"""Can a heatmap be believed? Evaluation metrics for saliency maps, DICOM-free (arrays and models in,
numbers out), each checked in the tests against an independent implementation (Quantus,
pytorch-grad-cam, scikit-image).

- :mod:`~service.trust.localisation`: maps against ground-truth masks (hit rate, mIoU after Otsu,
  relevance mass accuracy, pointing game with a tolerance).
- :mod:`~service.trust.faithfulness`: deletion and insertion curves (RISE), ROAD.
- :mod:`~service.trust.randomisation`: cascading model parameter randomisation, the random-logit check.
- :mod:`~service.trust.repeatability`: maps over seeds, and over two model paths (ONNX vs torch).
- :mod:`~service.trust.similarity`: SSIM, Spearman and Pearson between maps.
"""

from service.trust.checks import TrustMetricError

__all__ = ["TrustMetricError"]
