"""Towers: the only open_clip user (encoder.py), the model registry, and the torch-free text and
image towers with their export, cache and runtime; safe checkpoint loading; devices and precisions."""
