"""Experiments on the effect of instruction tuning (`rlhf experiment ...`): sweeps of SFT runs measured
on held-out synthetic families, each resumable and printing a JSON line per point."""
