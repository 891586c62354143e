"""Can a result be believed? Evaluation metrics for saliency maps, and signals on every result;
DICOM-free (arrays and models in, numbers out); the metrics are checked in the tests against
independent implementations (Quantus, pytorch-grad-cam, scikit-image).

- :mod:`~service.trust.localisation`: maps against ground-truth masks (hit rate, mIoU after Otsu,
  relevance mass accuracy, pointing game with a tolerance).
- :mod:`~service.trust.faithfulness`: deletion and insertion curves (RISE), ROAD.
- :mod:`~service.trust.randomisation`: cascading model parameter randomisation, the random-logit check.
- :mod:`~service.trust.repeatability`: maps over seeds, and over two model paths (ONNX vs torch).
- :mod:`~service.trust.similarity`: SSIM, Spearman and Pearson between maps.

And the signals on every result (:mod:`service.node.pipeline` computes them beside the explanation):

- :mod:`~service.trust.shortcut`: the share of positive attribution outside the anatomy, and the flag.
- :mod:`~service.trust.ood`: the Mahalanobis distance of an input's pooled features to the training data.
"""

from service.trust.checks import TrustMetricError

__all__ = ["TrustMetricError"]
