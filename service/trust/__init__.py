"""Whether an explanation and its input can be believed: signals and measures computed beside the pipeline."""
