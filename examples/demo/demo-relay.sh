#!/usr/bin/env bash
# The demo behind `make demo-relay`: relay mode, all local. Run by pgtmp, which
# gives it a throwaway PostgreSQL in WALHOOK_TEST_DATABASE_URL and stops it when
# this script ends. It starts an embedded single-node NATS with JetStream
# (examples/demo/natsd), the sidecar (`walhook run` with a relay: section,
# which publishes to JetStream), two `walhook deliver` workers and the
# receiver. DEMO_ONCE=1 exits when the hooks are in; BIN (default bin) is
# where walhook, receiver and natsd are; DEMO_SLOT (default walhook) the slot.
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=${BIN:-bin}

work=$(mktemp -d)
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$work"
  echo "demo-relay: cleaned up"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

db=$WALHOOK_TEST_DATABASE_URL
psql_bin=${PG_BINDIR:-}/psql
[ -x "$psql_bin" ] || psql_bin=$(ls /usr/lib/postgresql/*/bin/psql 2>/dev/null | sort -V | tail -1)
[ -x "$psql_bin" ] || psql_bin=$(command -v psql)
psql=("$psql_bin" -X -q -v ON_ERROR_STOP=1 "$db")
secret="whsec_$(head -c 32 /dev/urandom | base64)"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null || echo $((20000 + RANDOM % 20000)); }
rport=$(port); sport=$(port); w1port=$(port); w2port=$(port)

wait_for() { # wait_for SECONDS COMMAND...: poll until COMMAND succeeds
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    if ((SECONDS > deadline)); then return 1; fi
    sleep 0.2
  done
}

echo "demo-relay: an embedded single-node NATS with JetStream"
"$bin/natsd" >"$work/nats.url" 2>"$work/nats.log" &
pids+=($!)
wait_for 30 test -s "$work/nats.url" || { cat "$work/nats.log"; exit 1; }
nats=$(head -1 "$work/nats.url")

cat >"$work/walhook.yaml" <<YAML
database_url: $db
slot: ${DEMO_SLOT:-walhook}
publication: ${DEMO_SLOT:-walhook}
defaults: {timeout: 5s, retry_initial: 200ms, retry_max_interval: 5s}
relay:
  url: $nats
  replicas: 1         # one NATS node; 3 in production (deploy/nats/values.yaml)
  partitions: 8
subscriptions:
  - id: crm
    events: ["contact.*"]
    target_url: http://127.0.0.1:$rport/hooks
    secret: $secret
YAML

echo "demo-relay: walhook setup"
"$bin/walhook" setup --config "$work/walhook.yaml"

"$bin/receiver" -listen "127.0.0.1:$rport" -secret "$secret" >"$work/received.jsonl" 2>"$work/receiver.log" &
pids+=($!)
# One config for all three; each process its own listen address.
WALHOOK_LISTEN=127.0.0.1:$w1port "$bin/walhook" deliver --config "$work/walhook.yaml" --log-format console 2>"$work/worker1.log" &
pids+=($!)
WALHOOK_LISTEN=127.0.0.1:$w2port "$bin/walhook" deliver --config "$work/walhook.yaml" --log-format console 2>"$work/worker2.log" &
pids+=($!)
WALHOOK_LISTEN=127.0.0.1:$sport "$bin/walhook" run --config "$work/walhook.yaml" --log-format console 2>"$work/walhook.log" &
pids+=($!)
sidecar=$!
wait_for 30 grep -q streaming "$work/walhook.log" || { cat "$work/walhook.log"; exit 1; }
for w in $w1port $w2port; do
  wait_for 30 curl -fsS "http://127.0.0.1:$w/readyz" || { cat "$work/worker1.log" "$work/worker2.log"; exit 1; }
done

echo "demo-relay: writing outbox rows in application transactions"
"${psql[@]}" >/dev/null <<'SQL'
CREATE TABLE contacts (id text PRIMARY KEY, name text NOT NULL);
BEGIN;
  INSERT INTO contacts SELECT 'c' || g, 'Contact ' || g FROM generate_series(1, 6) g;
  INSERT INTO walhook.outbox (event, resource_id, payload)
    SELECT 'contact.created', 'c' || g, jsonb_build_object('name', 'Contact ' || g) FROM generate_series(1, 6) g;
COMMIT;
BEGIN;
  UPDATE contacts SET name = 'Ada Lovelace' WHERE id = 'c1';
  INSERT INTO walhook.outbox (event, resource_id, payload) VALUES ('contact.updated', 'c1', '{"name": "Ada Lovelace"}');
COMMIT;
BEGIN;  -- rolled back: no hook
  INSERT INTO contacts VALUES ('c9', 'Nobody');
  INSERT INTO walhook.outbox (event, resource_id, payload) VALUES ('contact.created', 'c9', '{"name": "Nobody"}');
ROLLBACK;
BEGIN;  -- an outbox without a table: a logical decoding message
  DELETE FROM contacts WHERE id = 'c2';
  SELECT walhook.emit('contact.deleted', 'c2', '{}');
COMMIT;
SQL

want=8
received() { [ "$(wc -l <"$work/received.jsonl")" -ge "$want" ]; }
if ! wait_for 60 received; then
  echo "demo-relay: expected $want hooks, got:"; cat "$work/received.jsonl"
  for f in walhook worker1 worker2; do echo "--- $f"; cat "$work/$f.log"; done
  exit 1
fi
echo "demo-relay: the receiver verified and got:"
cat "$work/received.jsonl"
if grep -q Nobody "$work/received.jsonl"; then echo "demo-relay: the rolled-back contact was delivered"; exit 1; fi
echo "demo-relay: walhook status (the stream, its partitions and their owners):"
"$bin/walhook" status --config "$work/walhook.yaml"
if [[ "${DEMO_ONCE:-}" != "" ]]; then
  echo "demo-relay: ok"
  exit 0
fi
echo "demo-relay: the sidecar, two workers and NATS are still running; try:  $psql_bin '$db' -c \"INSERT INTO walhook.outbox (event, resource_id, payload) VALUES ('contact.updated', 'c1', '{}')\""
echo "demo-relay: metrics: http://127.0.0.1:$sport/metrics (sidecar), http://127.0.0.1:$w1port/metrics and :$w2port (workers)"
echo "demo-relay: Ctrl-C to stop and clean up"
tail -n 0 -f "$work/received.jsonl" &  # only what arrives from now
pids+=($!)
wait "$sidecar"
