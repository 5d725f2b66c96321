# shellcheck shell=bash
# The event catalogue's checkers for ./dev test (sourced after lib.sh, never run): the official
# AsyncAPI parser (@asyncapi/parser) validates schemas/asyncapi.json, and Ajv validates event data
# read from the log against schemas/events/*.json (schemas/tools/check.mjs runs both).
#
#   .local/asyncapi/node_modules/   the packages pinned in schemas/tools/package.json, from npm
#                                   (installed once; again when that file changes)
#
# ensure_asyncapi_tools exports ASYNCAPI_NODE_PATH (the node_modules folder), which the tests pass
# to node as NODE_PATH; without it those tests fail naming this script. Needs node (>= 18) and npm;
# installs Debian's nodejs and npm when they are missing.

ASYNCAPI_DIR="$LOCAL_DIR/asyncapi"

asyncapi_tools_digest() { sha256sum "$ROOT/schemas/tools/package.json" | cut -c1-16; }

ensure_asyncapi_tools() {
  command -v node >/dev/null || apt_install nodejs
  command -v npm >/dev/null || apt_install npm
  if [ -d "$ASYNCAPI_DIR/node_modules/@asyncapi/parser" ] && [ "$(cat "$ASYNCAPI_DIR/package.digest" 2>/dev/null)" = "$(asyncapi_tools_digest)" ]; then
    export ASYNCAPI_NODE_PATH="$ASYNCAPI_DIR/node_modules"
    return
  fi
  say "installing @asyncapi/parser, ajv and ajv-formats (schemas/tools/package.json) from npm into $(shown "$ASYNCAPI_DIR") (first run only)"
  local t0 log="$LOCAL_DIR/asyncapi-install.log"
  t0=$(now_ms)
  rm -rf "$ASYNCAPI_DIR"
  mkdir -p "$ASYNCAPI_DIR"
  cp "$ROOT/schemas/tools/package.json" "$ASYNCAPI_DIR/package.json"
  if ! (cd "$ASYNCAPI_DIR" && npm install --no-audit --no-fund --omit=dev --loglevel=error) >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    rm -rf "$ASYNCAPI_DIR"
    die "could not install the AsyncAPI tools (full output: $(shown "$log")); the npm registry must be reachable (proxy: npm config set registry / https-proxy)"
  fi
  asyncapi_tools_digest >"$ASYNCAPI_DIR/package.digest"
  export ASYNCAPI_NODE_PATH="$ASYNCAPI_DIR/node_modules"
  say "installed the AsyncAPI tools in $(since "$t0")"
}
