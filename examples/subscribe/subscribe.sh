#!/usr/bin/env bash
# REST Hooks from the subscriber's side, with curl:
#   subscribe.sh subscribe EVENT TARGET_URL [SECRET]   -> prints the subscription (id, secret)
#   subscribe.sh list
#   subscribe.sh rotate ID                              -> prints the new secret
#   subscribe.sh unsubscribe ID
# WALHOOK_URL (default http://127.0.0.1:8080) and WALHOOK_TOKEN (a bearer token:
# the admin token, or your own when walhook uses forward auth).
set -euo pipefail
api=${WALHOOK_URL:-http://127.0.0.1:8080}/v1/subscriptions
auth=(-H "Authorization: Bearer ${WALHOOK_TOKEN:?set WALHOOK_TOKEN}")
call() { curl -sS --fail-with-body "${auth[@]}" -H 'content-type: application/json' "$@"; echo; }

case "${1:-}" in
  subscribe)
    body=$(printf '{"event": "%s", "target_url": "%s"%s}' "$2" "$3" "${4:+, \"secret\": \"$4\"}")
    call -X POST "$api" -d "$body" ;;
  list)        call "$api" ;;
  rotate)      call -X POST "$api/$2/rotate-secret" ;;
  unsubscribe) call -X DELETE "$api/$2" ;;
  *) sed -n '2,8p' "$0"; exit 2 ;;
esac
