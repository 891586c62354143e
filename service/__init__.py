"""The running pacs-xai process: configuration, inference, explainers, CLI."""

__version__ = "0.1.0"
