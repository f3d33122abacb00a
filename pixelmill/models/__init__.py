"""Inference: one runner per task, the registry that resolves a model name, image decoding and
preprocessing, and the per-process model cache. Knows nothing of Celery or SQL."""
