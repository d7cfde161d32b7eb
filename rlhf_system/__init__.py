"""rlhf_system: distributed LLM adaptation (SFT, RM, PPO-family RLHF, DPO) on Ray + DeepSpeed + vLLM."""
__version__ = "0.1.0"
