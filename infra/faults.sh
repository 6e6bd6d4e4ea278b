#!/usr/bin/env bash
# The fault suite, longer than CI runs it, printing what happened:
#   - FAULT_KILLS worker processes SIGKILLed mid-job while jobs keep arriving (default 500);
#   - a private Postgres restarted under FAULT_SECONDS of enqueues and status polls (default 30);
#   - ROUNDS rounds of the SQS scenarios against moto: SQS down at enqueue then the outbox,
#     every message delivered three times, no-slot deferral, hand-off of freed slots (default 5).
# Needs what .ci/run installs (it reuses .ci/.venv for moto); run .ci/run once first.
set -euo pipefail
cd "$(dirname "$0")/.."
export FAULT_KILLS=${FAULT_KILLS:-500} FAULT_SECONDS=${FAULT_SECONDS:-30}
rounds=${ROUNDS:-5}

cargo test -p local --test faults -- --nocapture --test-threads=1 2>&1 |
  grep -E '^(faults|postgres restart):|^test |test result'

port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
.ci/.venv/bin/moto_server -H 127.0.0.1 -p "$port" >/dev/null 2>&1 &
moto=$!
trap 'kill $moto 2>/dev/null || true' EXIT
for _ in $(seq 1 40); do curl -sf -o /dev/null "http://127.0.0.1:$port/moto-api/" && break; sleep 0.5; done
export MOTO_ENDPOINT="http://127.0.0.1:$port"
passed=0 failed=0
for round in $(seq 1 "$rounds"); do
  if cargo test -q -p shared --test it -- queue:: reliability:: >/tmp/mj-faults-round.log 2>&1; then
    passed=$((passed + 1))
  else
    failed=$((failed + 1)); tail -30 /tmp/mj-faults-round.log
  fi
done
echo "sqs scenarios: $rounds rounds, $passed passed, $failed failed"
[ "$failed" = 0 ]
