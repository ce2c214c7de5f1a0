"""Reference implementations for *Advanced Generative Modeling*.

The book carries the prose; each module here carries one method.
"""

__version__ = "0.1.0"
