#!/usr/bin/env bash
# Run the test suite (the README's test command; CI runs exactly this). Extra args go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
exec python -m pytest tests -q "$@"
