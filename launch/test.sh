#!/usr/bin/env bash
# Run the test suite (the README's test command; CI runs exactly this). Extra args go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
# --timeout: a test that hangs (a wait without a deadline somewhere) fails after 20 minutes instead of
# stalling CI; no single test legitimately takes more than a few minutes on 2 cores.
exec python -m pytest tests -q --timeout=1200 "$@"
