"""The built-in demo: training the demo model and its saliency masker, and the node demo
(``pacs-xai demo ...``)."""
