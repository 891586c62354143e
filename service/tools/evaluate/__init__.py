"""``pacs-xai evaluate``: a scorecard per model and method on a labelled set (the built-in phantoms,
or a folder of images with ground-truth DICOM SEGs), for the governance board that must decide
whether a heatmap can be believed."""
