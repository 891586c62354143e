"""Synthetic radiographs with ground-truth lesion masks: the demo model's training data, the
node's start-up warm-up image, and the test and benchmark cases."""
