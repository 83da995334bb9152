"""Evaluation of a model's predictions: the metrics of a report, and the evaluators a config names."""
