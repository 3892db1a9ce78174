#!/usr/bin/env bash
# The demo behind `make demo`: run by pgtmp, which gives it a throwaway PostgreSQL
# in WALHOOK_TEST_DATABASE_URL and stops it when this script ends.
set -euo pipefail
cd "$(dirname "$0")/../.."

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
  echo "demo: cleaned up"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

db=$WALHOOK_TEST_DATABASE_URL
# The server packages from npm (make test-pg) ship no psql; Debian's speaks to every version.
psql_bin=$PG_BINDIR/psql
[ -x "$psql_bin" ] || psql_bin=$(ls /usr/lib/postgresql/*/bin/psql 2>/dev/null | sort -V | tail -1)
[ -x "$psql_bin" ] || psql_bin=$(command -v psql)
psql=("$psql_bin" -X -q -v ON_ERROR_STOP=1 "$db")
secret="whsec_$(head -c 32 /dev/urandom | base64)"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null || echo $((20000 + RANDOM % 20000)); }
rport=$(port); wport=$(port)

cat >"$work/walhook.yaml" <<YAML
database_url: $db
listen: 127.0.0.1:$wport
defaults: {timeout: 5s, retry_initial: 200ms, retry_max_interval: 5s}
subscriptions:
  - id: crm
    events: ["contact.*"]
    target_url: http://127.0.0.1:$rport/hooks
    secret: $secret
YAML

echo "demo: walhook setup"
bin/walhook setup --config "$work/walhook.yaml"

bin/receiver -listen "127.0.0.1:$rport" -secret "$secret" >"$work/received.jsonl" 2>"$work/receiver.log" &
pids+=($!)
bin/walhook run --config "$work/walhook.yaml" --log-format console 2>"$work/walhook.log" &
pids+=($!)

wait_for() { # wait_for SECONDS COMMAND...: poll until COMMAND succeeds
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS > deadline)); then return 1; fi
    sleep 0.2
  done
}
wait_for 30 grep -q streaming "$work/walhook.log" || { cat "$work/walhook.log"; exit 1; }

echo "demo: writing outbox rows in application transactions"
"${psql[@]}" >/dev/null <<'SQL'
CREATE TABLE contacts (id text PRIMARY KEY, name text NOT NULL);
BEGIN;
  INSERT INTO contacts VALUES ('c1', 'Ada');
  INSERT INTO walhook.outbox (event, resource_id, payload) VALUES ('contact.created', 'c1', '{"name": "Ada"}');
COMMIT;
BEGIN;
  UPDATE contacts SET name = 'Ada Lovelace' WHERE id = 'c1';
  INSERT INTO walhook.outbox (event, resource_id, payload) VALUES ('contact.updated', 'c1', '{"name": "Ada Lovelace"}');
COMMIT;
BEGIN;  -- rolled back: no hook
  INSERT INTO contacts VALUES ('c2', 'Nobody');
  INSERT INTO walhook.outbox (event, resource_id, payload) VALUES ('contact.created', 'c2', '{"name": "Nobody"}');
ROLLBACK;
BEGIN;  -- an outbox without a table: a logical decoding message
  DELETE FROM contacts WHERE id = 'c1';
  SELECT walhook.emit('contact.deleted', 'c1', '{}');
COMMIT;
SQL

want=3
received() { [ "$(wc -l <"$work/received.jsonl")" -ge "$want" ]; }
if ! wait_for 30 received; then
  echo "demo: expected $want hooks, got:"; cat "$work/received.jsonl"; cat "$work/walhook.log"; exit 1
fi
echo "demo: the receiver verified and got:"
cat "$work/received.jsonl"
if [[ "${DEMO_ONCE:-}" != "" ]]; then
  echo "demo: ok"
  exit 0
fi
echo "demo: walhook is still running; try:  $psql_bin '$db' -c \"INSERT INTO walhook.outbox (event, resource_id, payload) VALUES ('contact.updated', 'c1', '{}')\""
echo "demo: the operator console: http://127.0.0.1:$wport/console"
echo "demo: Ctrl-C to stop and clean up"
tail -n 0 -f "$work/received.jsonl" &  # only what arrives from now: the first hooks are printed above
pids+=($!)
wait "${pids[1]}"
