"""Module 7 of the book: preference optimization — reward models and DPO (Chapters 54–55)."""
