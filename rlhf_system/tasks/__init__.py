"""The synthetic task domain the demo, the tests and the experiments train on: instruction families with
verifiable answers (synthetic.py), their files (files.py), and the tool-use family (tools.py). Data
loading (data/) does not depend on it; the reward rules and evaluation that check its answers do."""
