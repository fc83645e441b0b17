"""Helpers that are not a training concern of their own: config, checkpoints, distributed."""
