"""Tasks: training and evaluating a normalisation layer with a classifier or a segmenter."""
