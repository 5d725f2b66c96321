# shellcheck shell=bash
# schemathesis (https://schemathesis.readthedocs.io) for ./dev test (sourced after lib.sh, never run):
# it reads the command API's OpenAPI document, generates requests from it (schema examples,
# boundary cases, fuzzing, call sequences) and fails when an answer is a 5xx, or has a status, a
# Content-Type, a body or headers that the document does not describe for its operation.
#
#   .local/schemathesis/      a Python virtualenv holding schemathesis $SCHEMATHESIS_VERSION from PyPI
#                             (created once; again when the version below changes)
#   target/schemathesis/      where st runs: the junit report of the last run and Hypothesis' example
#                             database (cases that failed are tried first the next time)
#
# Overrides (environment): SCHEMATHESIS_MAX_EXAMPLES (generated cases per operation in the fuzzing
# phase), SCHEMATHESIS_MAX_TIME (seconds for the whole run, shared by its phases).

SCHEMATHESIS_VERSION=4.32.5
SCHEMATHESIS_VENV="$LOCAL_DIR/schemathesis"
SCHEMATHESIS_DIR="$ROOT/target/schemathesis"
SCHEMATHESIS_CHECKS=not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance,response_headers_conformance
SCHEMATHESIS_MAX_EXAMPLES="${SCHEMATHESIS_MAX_EXAMPLES:-50}"
SCHEMATHESIS_MAX_TIME="${SCHEMATHESIS_MAX_TIME:-90}"

schemathesis_installed_version() {
  "$SCHEMATHESIS_VENV/bin/python" -c 'import importlib.metadata as m; print(m.version("schemathesis"))' 2>/dev/null
}

ensure_schemathesis() {
  if [ -x "$SCHEMATHESIS_VENV/bin/st" ] && [ "$(schemathesis_installed_version)" = "$SCHEMATHESIS_VERSION" ]; then
    return
  fi
  pip_venv "$SCHEMATHESIS_VENV" "schemathesis" "schemathesis==$SCHEMATHESIS_VERSION"
}

# Runs st against the API at BASE_URL (its document at /v1/openapi.json) as the holder of TOKEN;
# returns st's exit status (0: every check passed).
run_schemathesis() { # base_url token
  local url=$1 token=$2
  local -a args=(
    run "$url/v1/openapi.json"
    --checks "$SCHEMATHESIS_CHECKS"
    --max-examples "$SCHEMATHESIS_MAX_EXAMPLES"
    --max-time "$SCHEMATHESIS_MAX_TIME"
    --report junit --report-junit-path "$SCHEMATHESIS_DIR/junit.xml"
    --header "Authorization: Bearer $token"
  )
  mkdir -p "$SCHEMATHESIS_DIR"
  say "schemathesis $SCHEMATHESIS_VERSION against $url: checks $SCHEMATHESIS_CHECKS, at most $SCHEMATHESIS_MAX_EXAMPLES generated cases per operation, $SCHEMATHESIS_MAX_TIME s"
  say "  st ${args[*]/%$token/<token>}"
  local status=0
  # The hard limit only guards against a hung run; --max-time ends it normally well before.
  (cd "$SCHEMATHESIS_DIR" && timeout --kill-after=10 $((SCHEMATHESIS_MAX_TIME + 60)) "$SCHEMATHESIS_VENV/bin/st" "${args[@]}") || status=$?
  if [ "$status" = 124 ]; then
    warn "schemathesis did not finish within $((SCHEMATHESIS_MAX_TIME + 60)) s; stopped it"
  fi
  return "$status"
}
