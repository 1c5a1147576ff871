"""Backbones: load a diffusion Transformer and run it truncated, tapping requested blocks. No sklearn here."""
