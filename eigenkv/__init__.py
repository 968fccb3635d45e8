"""eigenkv: low-rank (Eigen Attention) KV-cache compression for decoder LLMs."""

__version__ = "0.1.0"
