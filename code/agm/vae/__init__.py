"""Latent-variable models with amortized inference (Module 3)."""
