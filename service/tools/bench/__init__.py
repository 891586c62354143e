"""Benchmarks (`pacs-xai bench ...`): measured against a peer in the same run, figures written to files."""
