"""Where the roles run: Ray worker groups with deadlines (group.py), the roles' placement groups and
start-up (roles.py), and the rollout engines' placement (engines.py). The controllers (trainers/) use
these to start the workers (workers/); nothing here imports a worker class."""
