"""Evaluation: retrieval metrics in the CLIP_benchmark protocol (metrics.py) and the recall@k report (evaluate.py)."""
