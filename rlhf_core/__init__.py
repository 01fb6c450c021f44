"""rlhf_core: the library behind the RLHF pipeline (no orchestration imports here)."""

__version__ = "0.1.0"
