"""lsvcr: LLM-enhanced sequential recommendation of short videos and their comments, on Ray."""

__version__ = "0.1.0"
