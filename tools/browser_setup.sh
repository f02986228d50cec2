#!/usr/bin/env bash
# Browser-tier prerequisites: Debian chromium + npm playwright-core (never a browser download).
#   - /usr/bin/chromium (or $DCM_CHROMIUM): installed from Debian with apt-get when missing and we are root;
#   - playwright-core@$PLAYWRIGHT_CORE_VERSION in $DCM_BROWSER_CACHE/node_modules (outside the repo).
# On success prints two lines, CHROMIUM=<path> and NODE_PATH=<dir>, and exits 0.
# When something cannot be provided prints ONE line "SKIP: <why>" and exits 3 (other output → stderr).
# Idempotent and quick when everything is already there (no network then).
set -uo pipefail
PLAYWRIGHT_CORE_VERSION="${PLAYWRIGHT_CORE_VERSION:-1.65.1}"
CACHE="${DCM_BROWSER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dcm-video/browser}"
CHROMIUM="${DCM_CHROMIUM:-/usr/bin/chromium}"

skip() { echo "SKIP: $*"; exit 3; }

if [ ! -x "$CHROMIUM" ]; then
  [ "$(id -u)" = 0 ] || skip "no $CHROMIUM and not root (install it: apt-get install --no-install-recommends chromium)"
  command -v apt-get >/dev/null || skip "no $CHROMIUM and no apt-get (install Debian's chromium, or set DCM_CHROMIUM)"
  echo "[browser_setup] installing Debian chromium (apt-get)" >&2
  apt=(apt-get -o DPkg::Lock::Timeout=300 -y -q --no-install-recommends)
  if ! DEBIAN_FRONTEND=noninteractive "${apt[@]}" install chromium >&2; then
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 -q update >&2 || true
    DEBIAN_FRONTEND=noninteractive "${apt[@]}" install chromium >&2 || skip "apt-get install chromium failed"
  fi
  [ -x "$CHROMIUM" ] || skip "apt-get installed chromium but $CHROMIUM is missing"
fi

pkg="$CACHE/node_modules/playwright-core/package.json"
have=""
[ -f "$pkg" ] && have="$(sed -n 's/^ *"version": *"\([^"]*\)".*/\1/p' "$pkg" | head -1)"
if [ "$have" != "$PLAYWRIGHT_CORE_VERSION" ]; then
  command -v node >/dev/null || skip "no node (install Debian's nodejs and npm)"
  command -v npm >/dev/null || skip "no npm (install Debian's npm)"
  echo "[browser_setup] npm install playwright-core@$PLAYWRIGHT_CORE_VERSION into $CACHE" >&2
  mkdir -p "$CACHE" || skip "cannot create $CACHE"
  # PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD: playwright-core downloads nothing, but be explicit.
  ( cd "$CACHE" && [ -f package.json ] || echo '{"private": true}' > package.json ) 2>/dev/null
  PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm install --prefix "$CACHE" --no-audit --no-fund --silent \
    "playwright-core@$PLAYWRIGHT_CORE_VERSION" >&2 || skip "npm install playwright-core@$PLAYWRIGHT_CORE_VERSION failed"
  [ -f "$pkg" ] || skip "npm did not install playwright-core into $CACHE"
fi
command -v node >/dev/null || skip "no node"
echo "CHROMIUM=$CHROMIUM"
echo "NODE_PATH=$CACHE/node_modules"
