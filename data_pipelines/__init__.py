"""Data sources (TFDS builders) and the grain loader that feeds the trainer."""
