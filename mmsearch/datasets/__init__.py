"""Datasets: caption readers behind one interface (readers.py), synthetic captioned scenes (synth.py)
and synthetic CLIP-like vectors for ANN work (synthvec.py)."""
