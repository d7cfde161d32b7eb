"""Pure-torch RLHF algorithm code: log-probabilities, losses. No Ray, DeepSpeed, vLLM or transformers here."""
