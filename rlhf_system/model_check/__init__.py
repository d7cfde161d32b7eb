"""`rlhf check-model PATH`: what will and will not work with a model before a long run (report.py runs
the checks, steps.py the training steps). Above workers/ and models/: it drives their code as a trainer does."""
