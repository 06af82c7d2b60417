#!/usr/bin/env bash
# The project's test command (README): installs what the tests need on a fresh
# Debian/Ubuntu machine, then checks formatting and lints and runs every test.
# The wgpu tests run on Mesa's lavapipe (Vulkan on the CPU) when no GPU exists.
set -euo pipefail
cd "$(dirname "$0")/.."

# lavapipe for wgpu; WebKitGTK, the tray library and friends for the Tauri
# app; Node.js for its page (Debian's nodejs if the machine has none).
need=()
# Xvfb, D-Bus and WebKitWebDriver for the app's end-to-end test; iproute2 for
# the ledger check in a network namespace.
pkgs=(mesa-vulkan-drivers libvulkan1 libwebkit2gtk-4.1-dev libayatana-appindicator3-dev
  librsvg2-dev libxdo-dev libssl-dev build-essential pkg-config
  xvfb xauth dbus-daemon webkit2gtk-driver iproute2)
command -v npm >/dev/null 2>&1 || pkgs+=(nodejs npm)
for pkg in "${pkgs[@]}"; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  sudo=""; [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${need[@]}"
fi

# lavapipe complains without a runtime dir; its shader cache makes reruns fast.
export XDG_RUNTIME_DIR="${XDG_RUNTIME_DIR:-/tmp/xdg-runtime-$(id -u)}"
mkdir -p "$XDG_RUNTIME_DIR" && chmod 700 "$XDG_RUNTIME_DIR"

# The app's page: its unit tests, then the bundle the Tauri build embeds.
# Vitest 4 needs Node.js 20 or newer (Debian 12's own nodejs is 18).
node_major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$node_major" -lt 20 ]; then
  echo "Node.js $(node --version) is too old for the UI tests: install Node.js 20 or newer" >&2
  exit 1
fi
npm ci --prefix ui --no-audit --no-fund
npm test --prefix ui
npm run build --prefix ui

cargo fmt --all --check
cargo clippy --workspace --all-targets -- -D warnings
# CI has lavapipe, so the GPU tests must run rather than skip.
export STARLING_REQUIRE_GPU=1
cargo test --workspace

# A volunteer's ledger against the kernel's counters, in a network
# namespace (skipped with a message where namespaces are not allowed).
bash scripts/netns-ledger.sh "${CARGO_TARGET_DIR:-target}/debug/starling"

# The real app window, driven through WebDriver against a local run
# (screenshots in runs/e2e-screenshots).
bash scripts/e2e.sh

# The CUDA backend cannot be built offline (Burn 0.22's cubecl-llvm downloads
# LLVM in its build script; DOCS_RS=1 skips that), so CI keeps it type-checked.
# Its own target dir: the feature set differs from the main build.
DOCS_RS=1 CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-target}/cuda-check" \
  cargo check -p starling-train --features cuda
