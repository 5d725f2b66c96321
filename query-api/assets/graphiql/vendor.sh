#!/usr/bin/env bash
# Vendors GraphiQL's standalone page assets into vendor/ from the npm registry, at the versions
# pinned here (`npm pack`: the published tarballs, nothing installed, no install scripts run), and
# prints their SHA-256 sums for README.md. Run it to move to other versions, then update README.md
# and check the page (`cargo test -p query-api graphiql`, headless Chromium).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"
GRAPHIQL_VERSION=4.1.2
REACT_VERSION=18.3.1 # the last React line with UMD builds, which graphiql's UMD bundle needs

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
(cd "$tmp" && npm pack --silent "graphiql@$GRAPHIQL_VERSION" "react@$REACT_VERSION" "react-dom@$REACT_VERSION" >/dev/null)
for p in "graphiql-$GRAPHIQL_VERSION" "react-$REACT_VERSION" "react-dom-$REACT_VERSION"; do
  mkdir "$tmp/$p"
  tar xzf "$tmp/$p.tgz" -C "$tmp/$p"
done
rm -rf vendor
mkdir vendor
cp "$tmp/graphiql-$GRAPHIQL_VERSION/package/graphiql.min.js" "$tmp/graphiql-$GRAPHIQL_VERSION/package/graphiql.min.css" vendor/
cp "$tmp/graphiql-$GRAPHIQL_VERSION/package/LICENSE" vendor/LICENSE.graphiql
cp "$tmp/react-$REACT_VERSION/package/umd/react.production.min.js" vendor/
cp "$tmp/react-$REACT_VERSION/package/LICENSE" vendor/LICENSE.react
cp "$tmp/react-dom-$REACT_VERSION/package/umd/react-dom.production.min.js" vendor/
cp "$tmp/react-dom-$REACT_VERSION/package/LICENSE" vendor/LICENSE.react-dom
(cd vendor && sha256sum -- *.js *.css)
