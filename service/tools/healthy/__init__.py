"""Training the healthy-appearance model of a model card (``pacs-xai demo train-healthy``,
``pacs-xai model train-healthy``)."""
