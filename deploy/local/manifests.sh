# shellcheck shell=bash
# Offline checks of the deploy files (sourced by ./dev after lib.sh, or run directly):
#   - deploy/k8s/*.yaml with kubeconform $KUBECONFORM_VERSION in strict mode (an unknown field, a
#     duplicate key or a wrong type fails) against the JSON schemas vendored in deploy/schemas/: the
#     Kubernetes $KUBERNETES_SCHEMA_VERSION kinds the manifests use and the CRDs of Strimzi,
#     CloudNativePG, the Prometheus operator and Dapr. No network: a kind without a vendored schema
#     fails too.
#   - deploy/docker-compose.yml against the Compose Specification's JSON schema
#     (deploy/schemas/validate_compose.py, jsonschema $JSONSCHEMA_VERSION).
#
#   deploy/local/manifests.sh check [DIR]   checks DIR/k8s/*.yaml and DIR/docker-compose.yml (default:
#                                            deploy/); exit status 0 when all are valid, 1 otherwise
#   deploy/local/manifests.sh tools         only installs the tools (prints their paths)
#
#   .local/kubeconform/bin/kubeconform   installed once with `go install` from the Go module proxy
#                                        (again when the version below changes); KUBECONFORM=PATH
#                                        uses another binary of the same version
#   .local/compose-check/                a Python virtualenv with jsonschema and PyYAML from PyPI
#
# tests/tests/deploy.rs runs `check` on deploy/ and on copies with a typo, which must fail.

if [ "${BASH_SOURCE[0]}" = "$0" ]; then # run, not sourced
  set -euo pipefail
  ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
  # shellcheck source=deploy/local/lib.sh
  source "$ROOT/deploy/local/lib.sh"
fi

KUBECONFORM_VERSION=v0.8.0
KUBERNETES_SCHEMA_VERSION=1.35.0
JSONSCHEMA_VERSION=4.26.0
PYYAML_VERSION=6.0.3
KUBECONFORM_DIR="$LOCAL_DIR/kubeconform"
COMPOSE_CHECK_VENV="$LOCAL_DIR/compose-check"
DEPLOY_SCHEMAS="$ROOT/deploy/schemas"

# Whether BINARY is kubeconform $KUBECONFORM_VERSION (go install records the module's version).
kubeconform_is_wanted() { # binary
  [ -x "$1" ] && go version -m "$1" 2>/dev/null | grep -qE "^[[:space:]]+mod[[:space:]]+github.com/yannh/kubeconform[[:space:]]+$KUBECONFORM_VERSION([[:space:]]|$)"
}

ensure_kubeconform() {
  # The Go toolchain: on the PATH, where the official tarball puts it, or Debian's (kubeconform
  # $KUBECONFORM_VERSION needs Go >= 1.26: a go from 1.21 on fetches that toolchain through the module
  # proxy by itself, an older one fails the install with a message).
  if ! command -v go >/dev/null; then
    if [ -x /usr/local/go/bin/go ]; then PATH="/usr/local/go/bin:$PATH"; else apt_install golang-go; fi
  fi
  local candidate
  for candidate in "${KUBECONFORM:-}" "$KUBECONFORM_DIR/bin/kubeconform" "$(command -v kubeconform || true)" "$(go env GOPATH 2>/dev/null)/bin/kubeconform"; do
    if [ -n "$candidate" ] && kubeconform_is_wanted "$candidate"; then
      KUBECONFORM=$candidate
      export KUBECONFORM
      return
    fi
  done
  [ -z "${KUBECONFORM:-}" ] || warn "KUBECONFORM=$KUBECONFORM is not kubeconform $KUBECONFORM_VERSION; installing that one"
  say "installing kubeconform $KUBECONFORM_VERSION into $(shown "$KUBECONFORM_DIR")/bin (go install, from the Go module proxy; first run only)"
  local t0 log="$LOCAL_DIR/kubeconform-install.log"
  t0=$(now_ms)
  mkdir -p "$KUBECONFORM_DIR/bin"
  if ! GOBIN="$KUBECONFORM_DIR/bin" go install "github.com/yannh/kubeconform/cmd/kubeconform@$KUBECONFORM_VERSION" >"$log" 2>&1; then
    tail -n 20 "$log" >&2
    die "could not install kubeconform $KUBECONFORM_VERSION (full output: $(shown "$log")); the Go module proxy must be reachable (GOPROXY)"
  fi
  KUBECONFORM="$KUBECONFORM_DIR/bin/kubeconform"
  export KUBECONFORM
  say "installed kubeconform $KUBECONFORM_VERSION in $(since "$t0")"
}

compose_check_installed() {
  "$COMPOSE_CHECK_VENV/bin/python" -c '
import importlib.metadata as m, sys
sys.exit(0 if (m.version("jsonschema"), m.version("PyYAML")) == tuple(sys.argv[1:]) else 1)' "$JSONSCHEMA_VERSION" "$PYYAML_VERSION" 2>/dev/null
}

ensure_compose_check() {
  compose_check_installed && return
  pip_venv "$COMPOSE_CHECK_VENV" "the compose checker" "jsonschema==$JSONSCHEMA_VERSION" "PyYAML==$PYYAML_VERSION"
}

# Both tools, once at a time (./dev test and the Rust test may ask together).
ensure_manifest_tools() {
  mkdir -p "$LOCAL_DIR"
  exec {_manifest_lock}>"$LOCAL_DIR/manifest-tools.lock"
  flock "$_manifest_lock"
  ensure_kubeconform
  ensure_compose_check
  flock -u "$_manifest_lock"
}

# Checks DIR/k8s/*.yaml and DIR/docker-compose.yml against the vendored schemas; returns 1 if any
# is invalid (kubeconform's and the compose checker's messages name the resource, path and field).
check_manifests() { # [dir]
  local dir=${1:-$ROOT/deploy} status=0
  local -a manifests=("$dir"/k8s/*.yaml)
  [ -e "${manifests[0]}" ] || die "no manifests in $dir/k8s"
  ensure_manifest_tools
  local -a args=(
    -strict -summary
    -kubernetes-version "$KUBERNETES_SCHEMA_VERSION"
    -schema-location "$DEPLOY_SCHEMAS/kubernetes/{{.NormalizedKubernetesVersion}}-standalone{{.StrictSuffix}}/{{.ResourceKind}}{{.KindSuffix}}.json"
    -schema-location "$DEPLOY_SCHEMAS/crds/{{.Group}}/{{.ResourceKind}}_{{.ResourceAPIVersion}}.json"
  )
  say "kubeconform $KUBECONFORM_VERSION (strict, Kubernetes $KUBERNETES_SCHEMA_VERSION and the vendored CRD schemas) on $(shown "$dir")/k8s/*.yaml"
  "$KUBECONFORM" "${args[@]}" "${manifests[@]}" || status=1
  say "the Compose Specification's schema on $(shown "$dir")/docker-compose.yml"
  "$COMPOSE_CHECK_VENV/bin/python" "$DEPLOY_SCHEMAS/validate_compose.py" "$DEPLOY_SCHEMAS/compose-spec/compose-spec.json" "$dir/docker-compose.yml" || status=1
  return "$status"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  case "${1:-}" in
    check) shift; check_manifests "$@" ;;
    tools) ensure_manifest_tools; printf 'kubeconform: %s\npython: %s\n' "$KUBECONFORM" "$COMPOSE_CHECK_VENV/bin/python" ;;
    *) die "usage: deploy/local/manifests.sh check [DEPLOY_DIR] | tools" ;;
  esac
fi
