"""State-space models for sequence generation (Chapter 56)."""
