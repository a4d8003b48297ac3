"""The fusion re-ranker (model.py) and how its logit blends with the dual encoder's score (blend.py)."""
