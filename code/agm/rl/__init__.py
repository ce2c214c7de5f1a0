"""Module 6 of the book: reinforcement learning for generative models (Chapters 49–53)."""
