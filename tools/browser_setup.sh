#!/usr/bin/env bash
# Browser-tier prerequisites: Debian chromium + npm playwright-core (never a browser download).
#   - /usr/bin/chromium (or $DCM_CHROMIUM): installed from Debian with apt-get when missing and we are root;
#   - playwright-core@$PLAYWRIGHT_CORE_VERSION in $DCM_BROWSER_CACHE/node_modules (outside the repo).
# On success prints two lines, CHROMIUM=<path> and NODE_PATH=<dir>, and exits 0.
# When something cannot be provided prints ONE line "SKIP: <why>" and exits 3 (other output → stderr).
# Idempotent and quick when everything is already there (no network then).
#
#   tools/browser_setup.sh --frontend
#       The newest ComfyUI frontend, which the browser tier runs besides the one the pinned ComfyUI
#       ships: the comfyui-frontend-package wheel pinned below (version + sha256), fetched with
#       `pip download` and unpacked into $DCM_BROWSER_CACHE/comfyui-frontend/<version> — never
#       installed into the venv, whose pinned 1.27.10 stays. Prints FRONTEND_VERSION=<v> and
#       FRONTEND_ROOT=<dir for --front-end-root>, or ONE line "SKIP: <why>" (exit 3).
#   tools/browser_setup.sh --newest-frontend
#       Bumping: prints the newest comfyui-frontend-package pip can see and its wheel's sha256, as
#       the two lines to paste below. ($DCM_CURRENT_FRONTEND=<version> tries another version
#       without editing, unhashed.)
set -uo pipefail
PLAYWRIGHT_CORE_VERSION="${PLAYWRIGHT_CORE_VERSION:-1.65.1}"
CACHE="${DCM_BROWSER_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/dcm-video/browser}"
CHROMIUM="${DCM_CHROMIUM:-/usr/bin/chromium}"
CURRENT_FRONTEND_VERSION=1.58.1
CURRENT_FRONTEND_SHA256=37912597537a731a8f421179618a736c24184c5bdbfa327f38b2fb7c291852d9

skip() { echo "SKIP: $*"; exit 3; }

# The Python whose pip fetches the frontend wheel: $DCM_PYTHON, else the repo's .venv, else python3.
python_with_pip() {
  local py="${DCM_PYTHON:-}"
  [ -n "$py" ] || { py="$(cd "$(dirname "$0")/.." && pwd)/.venv/bin/python"; [ -x "$py" ] || py=python3; }
  "$py" -m pip --version >/dev/null 2>&1 || return 1
  echo "$py"
}

if [ "${1:-}" = "--newest-frontend" ]; then
  py="$(python_with_pip)" || { echo "no python with pip (set DCM_PYTHON)" >&2; exit 1; }
  tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
  "$py" -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: -d "$tmp" \
    comfyui-frontend-package >&2 || { echo "pip download comfyui-frontend-package failed" >&2; exit 1; }
  whl="$(ls "$tmp"/comfyui_frontend_package-*.whl)"
  v="$(basename "$whl" | sed -n 's/^comfyui_frontend_package-\([^-]*\)-.*/\1/p')"
  echo "CURRENT_FRONTEND_VERSION=$v"
  echo "CURRENT_FRONTEND_SHA256=$(sha256sum "$whl" | cut -c1-64)"
  echo "(pinned now: $CURRENT_FRONTEND_VERSION; paste both lines into $0 to bump)" >&2
  exit 0
fi

if [ "${1:-}" = "--frontend" ]; then
  v="${DCM_CURRENT_FRONTEND:-$CURRENT_FRONTEND_VERSION}"
  sha=""; [ "$v" = "$CURRENT_FRONTEND_VERSION" ] && sha="$CURRENT_FRONTEND_SHA256"
  dir="$CACHE/comfyui-frontend/$v"
  root="$dir/comfyui_frontend_package/static"
  if [ ! -f "$dir/.complete" ] || [ ! -f "$root/index.html" ]; then
    py="$(python_with_pip)" || skip "comfyui-frontend-package $v: no python with pip to fetch it (set DCM_PYTHON)"
    echo "[browser_setup] pip download comfyui-frontend-package==$v into $dir" >&2
    mkdir -p "$CACHE/comfyui-frontend" || skip "cannot create $CACHE/comfyui-frontend"
    tmp="$(mktemp -d "$CACHE/comfyui-frontend/.tmp.XXXXXX")" || skip "cannot create a temp dir in $CACHE"
    trap 'rm -rf "$tmp"' EXIT
    "$py" -m pip download --disable-pip-version-check -q --no-deps --only-binary=:all: -d "$tmp/dl" \
      "comfyui-frontend-package==$v" >&2 || skip "pip download comfyui-frontend-package==$v failed (offline, or no such version)"
    whl="$(ls "$tmp"/dl/comfyui_frontend_package-*.whl 2>/dev/null | head -1)"
    [ -n "$whl" ] || skip "pip download comfyui-frontend-package==$v gave no wheel"
    if [ -n "$sha" ] && [ "$(sha256sum "$whl" | cut -c1-64)" != "$sha" ]; then
      skip "comfyui-frontend-package $v: the wheel's sha256 is not the pinned $sha"
    fi
    "$py" -m zipfile -e "$whl" "$tmp/x" >&2 || skip "cannot unpack $(basename "$whl")"
    [ -f "$tmp/x/comfyui_frontend_package/static/index.html" ] || skip "comfyui-frontend-package $v has no static/index.html"
    echo "$v $(sha256sum "$whl" | cut -c1-64)" > "$tmp/x/.complete"
    rm -rf "$dir" && mv "$tmp/x" "$dir" || skip "cannot move the frontend into $dir"
  fi
  echo "FRONTEND_VERSION=$v"
  echo "FRONTEND_ROOT=$root"
  exit 0
fi

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
