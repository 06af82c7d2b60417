#!/usr/bin/env bash
# End-to-end test of the desktop app (run by scripts/test.sh; also on its own):
# hosts a small local run with the `starling` CLI, starts the real app under
# Xvfb through tauri-driver + WebKitWebDriver, and lets tests/e2e/app.mjs join,
# watch it train, change the upload cap, pause and resume. Screenshots land in
# runs/e2e-screenshots (override with STARLING_E2E_SHOTS); the host's, the
# driver's and the app's output in runs/e2e-logs.
#
# STARLING_E2E_VOLUNTEERS=N adds N headless volunteers to the run;
# STARLING_E2E_FINAL_SHOT=FILE (with STARLING_E2E_FINAL_WAIT seconds, default
# 60) lets the run go on after the test and saves the dashboard to FILE
# (how docs/img/dashboard.png is made).
#
# Needs: the Debian packages xvfb, xauth, dbus, webkit2gtk-driver (test.sh
# installs them) and tauri-driver 2 (installed here with cargo if missing).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
target="${CARGO_TARGET_DIR:-$root/target}"
shots="${STARLING_E2E_SHOTS:-$root/runs/e2e-screenshots}"
logs="$root/runs/e2e-logs"
rm -rf "$shots" "$logs"
mkdir -p "$shots" "$logs"

# tauri-driver 2 (3.x is alpha); kept next to the build so reruns reuse it.
driver="$(command -v tauri-driver || true)"
if [ -z "$driver" ]; then
  driver="$target/tools/bin/tauri-driver"
  [ -x "$driver" ] || cargo install tauri-driver --version '^2' --locked --root "$target/tools"
fi

# The app embeds the page's bundle when it is compiled.
[ -d ui/node_modules ] || npm ci --prefix ui --no-audit --no-fund
npm run build --prefix ui
# The same targets (and so the same dependency features) as `cargo test
# --workspace`, which test.sh runs first: nothing but the two binaries is new.
cargo build --workspace --bins --tests
starling="$target/debug/starling"
app="$target/debug/starling-app"

work=$(mktemp -d /tmp/starling-e2e.XXXXXX)
host_pid=""
cleanup() {
  local rc=$?
  for pid in $host_pid; do
    kill "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$work"
  exit $rc
}
trap cleanup EXIT

"$starling" host tests/e2e/run.toml --state-dir "$work/host" --ticket-file "$work/ticket" \
  --listen 127.0.0.1:0 --device cpu >"$logs/host.log" 2>&1 &
host_pid=$!
for _ in $(seq 120); do
  [ -s "$work/ticket" ] && break
  kill -0 "$host_pid" 2>/dev/null || { cat "$logs/host.log" >&2; echo "the host exited" >&2; exit 1; }
  sleep 0.5
done
[ -s "$work/ticket" ] || { echo "the host printed no ticket within 60 s" >&2; exit 1; }
for i in $(seq "${STARLING_E2E_VOLUNTEERS:-0}"); do
  "$starling" join "$(cat "$work/ticket")" --key-file "$work/v$i/node.key" --listen 127.0.0.1:0 \
    --device cpu >"$logs/volunteer$i.log" 2>&1 &
  host_pid="$host_pid $!"
done

# A free port for the driver (WebKitWebDriver takes the one after it).
port=$(node -e 'const s = require("net").createServer().listen(0, "127.0.0.1", () => { console.log(s.address().port); s.close(); })')
export STARLING_APP_DIR="$work/app"
export STARLING_E2E_APP="$app" STARLING_E2E_TICKET="$(cat "$work/ticket")"
export STARLING_E2E_DRIVER="http://127.0.0.1:$port" STARLING_E2E_SHOTS="$shots"
export STARLING_E2E_DRIVER_BIN="$driver" STARLING_E2E_NATIVE_PORT=$((port + 1)) STARLING_E2E_LOGS="$logs"

# Inside dbus-run-session, or GLib's helpers keep the pipe open after the test;
# the driver's output goes to a file and it outlives the session by a moment,
# so that the app it started is gone before the driver is.
set +e
timeout 900 xvfb-run -a -s '-screen 0 1280x800x24' dbus-run-session -- bash -c '
  "$STARLING_E2E_DRIVER_BIN" --port "${STARLING_E2E_DRIVER##*:}" --native-port "$STARLING_E2E_NATIVE_PORT" \
    --native-driver /usr/bin/WebKitWebDriver >"$STARLING_E2E_LOGS/driver.log" 2>&1 &
  driver=$!
  node tests/e2e/app.mjs
  rc=$?
  sleep 2
  kill $driver 2>/dev/null
  wait $driver 2>/dev/null
  exit $rc
' </dev/null
rc=$?
set -e
if [ $rc -ne 0 ]; then
  echo "--- host log (tail) ---" >&2; tail -n 40 "$logs/host.log" >&2
  echo "--- driver log (tail) ---" >&2; tail -n 40 "$logs/driver.log" >&2
  echo "e2e failed (rc $rc); screenshots in $shots" >&2
  exit $rc
fi
echo "e2e passed; screenshots in $shots"
