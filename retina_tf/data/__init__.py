"""Datasets, preprocessing and tf.data pipelines."""
