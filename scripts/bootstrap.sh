#!/usr/bin/env bash
# Idempotent setup for a Debian/Ubuntu machine: apt packages, a virtualenv in .venv, and the
# project with its pinned dependencies. Safe to run again; does nothing that is already done.
#   scripts/bootstrap.sh            runtime + offline engine
#   scripts/bootstrap.sh --dev      also test/lint tools and the packages the tests need
set -euo pipefail
cd "$(dirname "$0")/.."
DEV=0; [[ "${1:-}" == "--dev" ]] && DEV=1

APT=(python3 python3-venv python3-dev gcc portaudio19-dev)
# the test suite's real parts: PulseAudio virtual microphone, mosquitto, systemd-analyze
# and Chromium for the live page's browser test (Playwright drives it): Debian's package, or
# where the distribution has none as a deb (Ubuntu ships Chromium as a snap), Playwright's own
# build, downloaded once into ~/.cache/ms-playwright (below)
playwright_chromium() {
  compgen -G "${PLAYWRIGHT_BROWSERS_PATH:-$HOME/.cache/ms-playwright}/chromium-*" >/dev/null
}
if [[ $DEV == 1 ]]; then
  APT+=(pulseaudio pulseaudio-utils libasound2-plugins mosquitto systemd openssl)
  [[ -x /usr/bin/chromium ]] || playwright_chromium || APT+=(chromium)
fi
BROWSER_DOWNLOAD=0

missing=()
for pkg in "${APT[@]}"; do
  dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
  SUDO=""; [[ $(id -u) != 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  if [[ " ${missing[*]} " == *" chromium "* ]] \
      && ! apt-cache policy chromium 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    BROWSER_DOWNLOAD=1                    # no chromium deb here: Playwright's own, below
    kept=(); for pkg in "${missing[@]}"; do [[ $pkg == chromium ]] || kept+=("$pkg"); done
    missing=("${kept[@]}")
  fi
fi
if ((${#missing[@]})); then
  echo "bootstrap: installing apt packages: ${missing[*]}" >&2
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

PY=${PYTHON:-python3}
if ! "$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  echo "bootstrap: transcribed needs Python >= 3.11 (found $("$PY" --version 2>&1))" >&2; exit 1
fi
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
EXTRAS="local"; [[ $DEV == 1 ]] && EXTRAS="local,dev"
base=".venv/.installed-$(cat pyproject.toml requirements.lock | sha256sum | cut -c1-16)"
stamp="$base-$EXTRAS"
# the dev install includes the runtime one: scripts/demo.sh after scripts/test.sh installs nothing
if [[ ! -e "$stamp" && ! ( $DEV == 0 && -e "$base-local,dev" ) ]]; then
  echo "bootstrap: installing Python packages into .venv ($EXTRAS)" >&2
  .venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip >/dev/null
  .venv/bin/python -m pip install -q --disable-pip-version-check -c requirements.lock -e ".[$EXTRAS]"
  rm -f .venv/.installed-* && touch "$stamp"
fi
if [[ $BROWSER_DOWNLOAD == 1 ]]; then
  echo "bootstrap: no chromium deb on this system: installing Playwright's Chromium" >&2
  $SUDO .venv/bin/python -m playwright install-deps chromium >/dev/null
  .venv/bin/python -m playwright install chromium
fi
