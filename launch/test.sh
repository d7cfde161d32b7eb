#!/usr/bin/env bash
# Run the test suite (the README's test command; CI runs exactly this). Extra args go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/_env.sh"
# The feedback app's browser test drives Debian's chromium (Playwright's own browser download cannot
# run here). On a fresh Debian machine with root, install it once; elsewhere the test says what is missing.
if [[ ! -x /usr/bin/chromium ]] && command -v apt-get >/dev/null 2>&1 && [[ "$(id -u)" == 0 ]]; then
  echo "[test] installing Debian's chromium for the browser tests" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q --no-install-recommends chromium >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q --no-install-recommends chromium >/dev/null; } \
    || echo "[test] could not install chromium: the browser test will fail under CI" >&2
fi
# --timeout: a test that hangs (a wait without a deadline somewhere) fails after 20 minutes instead of
# stalling CI; no single test legitimately takes more than a few minutes on 2 cores.
# Paths among the extra arguments (tests/unit, tests/x.py::test_y) replace the default `tests`.
targets=(tests)
for arg in "$@"; do [[ -e "${arg%%::*}" ]] && targets=() && break; done
exec python -m pytest "${targets[@]}" -q --timeout=1200 "$@"
