# shellcheck shell=bash
# Chromium for ./dev test (sourced after lib.sh, never run): the query API's GraphiQL test
# (query-api/tests/api/graphiql.rs) loads the page in headless Chromium and checks that it renders
# from the query API's own assets. Debian's `chromium` package, installed with apt-get when missing.
# CHROMIUM (exported) names the binary the test starts; set it to use another Chromium.

ensure_chromium() {
  if [ -n "${CHROMIUM:-}" ]; then
    command -v "$CHROMIUM" >/dev/null || die "CHROMIUM=$CHROMIUM is not an executable"
  else
    command -v chromium >/dev/null || apt_install chromium
    CHROMIUM=$(command -v chromium) || die "apt-get installed chromium, but there is no chromium on the PATH"
  fi
  export CHROMIUM
}
