"""Evaluation: offline task metrics (`eval.metrics`) and the MT-Bench judge client (`eval.judge`)."""
