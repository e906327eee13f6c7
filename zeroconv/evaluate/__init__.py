"""Controllability: does a generated image follow its condition? Metrics compare a condition with a generation."""
