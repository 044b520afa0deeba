"""Evaluation: labels -> classes and accuracy, the metrics, probability calibration, image-text matching."""
