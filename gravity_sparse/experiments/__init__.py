"""Experiments around the pipeline: the quality-vs-density sweep and pretraining the tiny model."""
