"""Module 5 of the book: autoregressive models and transformers (Chapters 42–48)."""
