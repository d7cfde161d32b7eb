"""The GPU checks that tests/gpu/run_checks.sh runs, one module (one process) per check: README.md there."""
