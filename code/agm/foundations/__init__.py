"""Module 1 of the book: foundations (Chapters 1–5)."""
