"""Adversarial purification defenses: models, attacks, defenses and evaluation for five papers."""

__version__ = "0.1.0"
