#!/usr/bin/env bash
# Sets up ./.venv (and, for the browser tests, Debian's chromium when running as root) and runs the whole test
# suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  echo "installing Debian's chromium for the browser tests" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "could not install chromium: the browser tests will be skipped" >&2
fi
bash scripts/setup_env.sh
. .venv/bin/activate
python -m pytest "$@"
