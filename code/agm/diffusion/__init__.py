"""Module 4 of the book: diffusion models (Chapters 24–41)."""
