"""rlfleet: distributed RL post-training on Ray + vLLM."""
__version__ = "0.1.0"
