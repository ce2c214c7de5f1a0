"""Module 2 of the book: generative adversarial networks (Chapters 6–13)."""
