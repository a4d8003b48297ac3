"""How a re-ranked candidate's score combines the fusion model's ITM logit with the dual encoder's
similarity. numpy only: the query path imports it without torch."""
from __future__ import annotations

import numpy as np

DIRECTIONS = ("text_to_image", "image_to_text")


def blend(itm_logits, similarity, alpha: float) -> np.ndarray:
    """The re-ranked score: (1 - alpha) * ITM probability + alpha * embedding similarity.
    alpha 0 is the ITM probability alone; alpha 1 keeps the dual encoder's order."""
    p = 1.0 / (1.0 + np.exp(-np.asarray(itm_logits, dtype=np.float64)))
    return (1.0 - alpha) * p + alpha * np.asarray(similarity, dtype=np.float64)
