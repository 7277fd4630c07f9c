#!/usr/bin/env bash
# End-to-end test of the compose deployment on the local Docker engine:
# builds the images, starts 2 shards, 3 workers and Prometheus, kills shard 1
# with SIGKILL in the middle of a sync run and starts it again (it restores its
# checkpoint and every shard rolls back to it), stops it and rewrites its
# checkpoints for three shards with `ctl reshard` (docker-compose.three-shards.yml;
# shard 0 must first refuse the two-shard checkpoints; the run resumes on three),
# stops the whole deployment and starts it again (the run resumes), moves it back
# to two shards while it trains (`ctl resize`), stops one worker, and checks that the run
# completes, the final accuracy, that starting it again on the finished run ends
# every worker with 0, what Prometheus scraped, and that `down -v`
# leaves nothing; then runs the same deployment with PS_MODE=federated, over
# mutual TLS (deploy/tls/make-ca.sh, docker-compose.tls.yml) with separate
# worker and admin tokens.
# Skips (loudly, exit 0) when no Docker engine answers.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! docker info >/dev/null 2>&1; then
  echo "=================================================================="
  echo "SKIPPED deploy/test-compose.sh: no Docker engine answers here."
  echo "=================================================================="
  exit 0
fi
if docker compose version >/dev/null 2>&1; then compose=(docker compose); else compose=(docker-compose); fi
started=$(date +%s)
say() { printf '[test-compose %3ss] %s\n' "$(( $(date +%s) - started ))" "$*"; }
failure=""
fail() { failure="$*"; say "FAIL: $*"; exit 1; }

project="pstest$$"
export WORKERS=3 PS_STEPS=${PS_STEPS:-16000} PS_LEASE=2s
PROM_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
export PROM_PORT
dc() { "${compose[@]}" -p "$project" -f deploy/docker-compose.yml "$@"; }
cleanup() {
  local status=$?
  if [ $status -ne 0 ]; then
    say "logs of the failed run:"
    dc logs --tail 30 2>&1 | sed 's/^/    /' || true
    # Again after the logs, so that a tail of this output still says what failed.
    say "FAIL: ${failure:-exit status $status}"
  fi
  dc down -v --remove-orphans >/dev/null 2>&1 || true
  # Shard 2's volume is declared in the three-shard override only.
  dc3 down -v --remove-orphans >/dev/null 2>&1 || true
  exit $status
}
trap cleanup EXIT

deploy/build-images.sh 2>&1 | grep -v -i -E 'deprecated|buildx|^\s*$|docs.docker.com' || true
say "starting 2 shards, $WORKERS workers and Prometheus ($PS_STEPS sync steps, lease $PS_LEASE) with ${compose[*]}"
dc up -d --scale worker=$WORKERS >/dev/null 2>&1 || { dc up -d --scale worker=$WORKERS; fail "compose up"; }

shards=shard0:50051,shard1:50051
status_json() { dc exec -T shard0 ctl --shards "$shards" status --model digits-mlp --json 2>/dev/null; }
# Prints a number read from the status JSON with a Python expression over `s` (the list of shards).
status_value() { status_json | python3 -c "import json,sys; s=json.load(sys.stdin); print($1)" 2>/dev/null; }
prom() { curl -fsS --get "http://127.0.0.1:$PROM_PORT/api/v1/query" --data-urlencode "query=$1" | python3 -c '
import json, sys
result = json.load(sys.stdin)["data"]["result"]
print(result[0]["value"][1] if result else "none")'; }

say "waiting for all workers to join and train"
for _ in $(seq 120); do
  version=$(status_value 'min(m["min_version"] for x in s for m in x["models"])' || true)
  live=$(status_value 'min(len(m["live_workers"]) for x in s for m in x["models"])' || true)
  [ "${live:-0}" = "$WORKERS" ] && [ "${version:-0}" -ge 100 ] && break
  sleep 0.5
done
[ "${live:-0}" = "$WORKERS" ] || fail "only ${live:-0} of $WORKERS workers joined"
say "version $version with $live live workers"

# Checked while the run has most of its steps ahead: a worker that has finished
# is no longer a target.
say "checking what Prometheus scraped"
for _ in $(seq 60); do
  # Targets up in a scrape of the last 10 s, not any sample in the 5-minute
  # lookback (a Prometheus restarted on its volume would count gone containers).
  shards_up=$(prom 'count(timestamp(up{job="shard"} == 1) > time() - 10)' || true)
  workers_up=$(prom 'count(timestamp(up{job="worker"} == 1) > time() - 10)' || true)
  pushes=$(prom 'sum(ps_pushes_total)' || true)
  worker_steps=$(prom 'sum(ps_worker_steps_total)' || true)
  if [ "$shards_up" = 2 ] && [ "$workers_up" = "$WORKERS" ] && [ "${pushes:-none}" != none ] && [ "${worker_steps:-none}" != none ]; then break; fi
  sleep 1
done
[ "$shards_up" = 2 ] || fail "Prometheus sees $shards_up of 2 shards up"
[ "$workers_up" = "$WORKERS" ] || fail "Prometheus sees $workers_up of $WORKERS workers up"
python3 -c "import sys; sys.exit(0 if float('$pushes') > 0 and float('$worker_steps') > 0 else 1)" || fail "no pushes scraped ($pushes, $worker_steps)"
say "Prometheus: up{job=shard}=$shards_up, up{job=worker}=$workers_up, sum(ps_pushes_total)=$pushes, sum(ps_worker_steps_total)=$worker_steps"

shard1=$(dc ps -q shard1)
say "killing shard 1 (SIGKILL) at version $(status_value 'min(m["min_version"] for x in s for m in x["models"])'), then starting it again on its checkpoint volume"
docker kill -s KILL "$shard1" >/dev/null
# Docker's restart policy does not apply to a container killed through the API; start it as an orchestrator would.
sleep 1
docker start "$shard1" >/dev/null
for _ in $(seq 120); do
  epochs=$(status_value 'sorted(set((m["epoch"], m["recovering"]) for x in s for m in x["models"]))' || true)
  [ "${epochs:-}" = "[(2, False)]" ] && break
  sleep 0.5
done
[ "${epochs:-}" = "[(2, False)]" ] || fail "the shards did not recover into epoch 2 together (epoch, recovering: ${epochs:-none})"
# Read whole first: `grep -q` on a pipe would stop `docker logs` early, which pipefail reports as a failure.
shard1_log=$(docker logs "$shard1" 2>&1)
grep -q "recovered: every shard continues" <<<"$shard1_log" || fail "shard 1 logged no recovery"
say "shard 1 restarted and recovered: $(grep 'rolling every shard back' <<<"$shard1_log" | tail -n 1 | sed 's/.*model=/model=/')"

# The operator who outgrows two shards: stop, reshard in place (the named
# volumes stay each shard's), start with the three-shard override. Without the
# reshard, shards 0 and 1 refuse the two-shard checkpoints.
say "stopping at version $(status_value 'min(m["min_version"] for x in s for m in x["models"])') to move to three shards"
dc stop -t 1 worker >/dev/null 2>&1 || fail "compose stop worker"
dc stop >/dev/null 2>&1 || fail "compose stop"
dc3() { "${compose[@]}" -p "$project" -f deploy/docker-compose.yml -f deploy/docker-compose.three-shards.yml "$@"; }
refused=$(timeout 60 "${compose[@]}" -p "$project" -f deploy/docker-compose.yml -f deploy/docker-compose.three-shards.yml run -T --rm --no-deps shard0 2>&1) && fail "shard 0 started as one of three on two-shard checkpoints: $refused"
grep -q "ctl reshard" <<<"$refused" || fail "shard 0 refused the two-shard checkpoints without saying what to do: $refused"
say "shard 0 as one of three on the two-shard checkpoints: refused ($(grep -o 'written by shard [0-9]* of [0-9]*' <<<"$refused" | head -n 1))"
resharded=$(dc3 run -T --rm --no-deps -v "${project}_shard0-checkpoints:/c0" -v "${project}_shard1-checkpoints:/c1" shard2 \
  ctl reshard --model digits-mlp --from /c0,/c1 --to /c0,/c1,/var/lib/paramserver 2>&1) || fail "ctl reshard: $resharded"
said=$(grep -m 1 'resharded model' <<<"$resharded") || fail "ctl reshard said: $resharded"
say "$said"
before=$(sed -E 's/.* at version ([0-9]+) .*/\1/' <<<"$said")
dc3 up -d --scale worker=$WORKERS >/dev/null 2>&1 || { dc3 up -d --scale worker=$WORKERS; fail "compose up with three shards"; }
dc() { dc3 "$@"; }
shards=shard0:50051,shard1:50051,shard2:50051
for _ in $(seq 240); do
  version=$(status_value 'min(m["min_version"] for x in s for m in x["models"])' || true)
  count=$(status_value 'len(s)' || true)
  [ "${count:-0}" = 3 ] && [ "${version:-0}" -ge $((before + 100)) ] && break
  sleep 0.5
done
[ "${count:-0}" = 3 ] && [ "${version:-0}" -ge $((before + 100)) ] || fail "the run did not resume on three shards (shards ${count:-none}, version ${version:-none}); worker logs: $(dc logs --tail 5 worker 2>&1 | tail -n 6)"
say "resumed on three shards from version $before: version $version"

# The whole deployment stopped and started again with the same command, volumes
# kept: the shards restore their checkpoints with the old workers as members, whose
# ranks free as their leases lapse; the new worker replicas (no --rank) wait for
# them and the run goes on.
before=$(status_value 'min(m["min_version"] for x in s for m in x["models"])')
say "docker-compose down (volumes kept) at version $before, then the same up again"
dc down >/dev/null 2>&1 || fail "compose down"
dc up -d --scale worker=$WORKERS >/dev/null 2>&1 || { dc up -d --scale worker=$WORKERS; fail "compose up again"; }
for _ in $(seq 240); do
  version=$(status_value 'min(m["min_version"] for x in s for m in x["models"])' || true)
  live=$(status_value 'min(len(m["live_workers"]) for x in s for m in x["models"])' || true)
  epochs=$(status_value 'sorted(set(m["epoch"] for x in s for m in x["models"]))' || true)
  [ "${live:-0}" = "$WORKERS" ] && [ "${version:-0}" -ge $((before + 100)) ] && break
  sleep 0.5
done
[ "${version:-0}" -ge $((before + 100)) ] || fail "the run did not resume after down and up (version ${version:-none}, live ${live:-0}, epochs ${epochs:-none}); worker logs: $(dc logs --tail 5 worker 2>&1 | tail -n 6)"
[ "${live:-0}" = "$WORKERS" ] || fail "only ${live:-0} of $WORKERS new workers train after down and up"
say "resumed after down and up: version $version with $live new workers (epochs $epochs)"

# Back to two shards while the workers train: `ctl resize` (in a one-off container on
# the compose network) holds the run at a step boundary, moves shard 2's blocks with
# their optimizer state to shards 0 and 1, and the workers follow to the two-shard list.
# Shard 2, dropped, is stopped; nothing restarts. The operator's compose files are the
# two-shard ones again: the next `up` (on the finished run, below) recreates shards 0
# and 1 with the two-shard list, and they restore the layout they switched to.
before=$(status_value 'min(m["min_version"] for x in s for m in x["models"])')
resized=$(dc run -T --rm --no-deps shard2 ctl --shards shard0:50051,shard1:50051,shard2:50051 \
  resize --to shard0:50051,shard1:50051 2>&1) || fail "ctl resize: $resized"
said=$(grep -m 1 'resized from 3 to 2 shards' <<<"$resized") || fail "ctl resize said: $resized"
say "$said"
shards=shard0:50051,shard1:50051
dc stop -t 5 shard2 >/dev/null 2>&1 || fail "compose stop shard2"
dc() { "${compose[@]}" -p "$project" -f deploy/docker-compose.yml "$@"; }
for _ in $(seq 240); do
  version=$(status_value 'min(m["min_version"] for x in s for m in x["models"])' || true)
  count=$(status_value 'len(s)' || true)
  [ "${count:-0}" = 2 ] && [ "${version:-0}" -ge $((before + 100)) ] && break
  sleep 0.5
done
[ "${count:-0}" = 2 ] && [ "${version:-0}" -ge $((before + 100)) ] || fail "the run did not go on on two shards after ctl resize (shards ${count:-none}, version ${version:-none}); worker logs: $(dc logs --tail 5 worker 2>&1 | tail -n 6)"
say "training went on on two shards without a restart: version $version"

# At once: a fast machine finishes the remaining steps in well under a minute.
victim=$(dc ps -q worker | tail -n 1)
version=$(status_value 'min(m["min_version"] for x in s for m in x["models"])')
[ "${version:-$PS_STEPS}" -lt $((PS_STEPS - 200)) ] || fail "the run is at version ${version:-none} of $PS_STEPS, too near its end to stop a worker in its middle (raise PS_STEPS)"
say "stopping worker container ${victim:0:12} in the middle of the run (version $version)"
docker stop -t 1 "$victim" >/dev/null
survivors=$(dc ps -q worker | grep -v "$victim" || true)

say "waiting for the remaining workers to finish"
for container in $survivors; do
  code=$(timeout 600 docker wait "$container") || fail "worker ${container:0:12} did not finish"
  [ "$code" = 0 ] || fail "worker ${container:0:12} exited with $code"
done
version=$(status_value 'min(m["min_version"] for x in s for m in x["models"])')
expired=$(status_value 'min(m["workers_expired"] for x in s for m in x["models"])')
[ "$version" = "$PS_STEPS" ] || fail "the run stopped at version $version of $PS_STEPS"
[ "${expired:-0}" -ge 1 ] || fail "the shards did not drop the stopped worker (workers_expired=$expired)"
checkpoint=$(status_value 'min(m["checkpoint_version"] for x in s for m in x["models"])')
[ "${checkpoint:-0}" -ge $((PS_STEPS - 100)) ] || fail "the newest checkpoint is at version $checkpoint"
say "run complete: version $version, workers_expired=$expired on every shard, newest checkpoint $checkpoint"

for _ in $(seq 30); do
  dropped=$(prom 'min(ps_workers_expired_total)' || true)
  [ "${dropped:-none}" != none ] && [ "${dropped%.*}" -ge 1 ] && break
  sleep 1
done
[ "${dropped:-none}" != none ] && [ "${dropped%.*}" -ge 1 ] || fail "Prometheus shows no dropped worker"
say "Prometheus: min(ps_workers_expired_total)=$dropped"
segment_bytes=$(prom 'sum(ps_bytes_received_total{transport="segment"})' || true)
[ "${segment_bytes:-none}" != none ] && [ "${segment_bytes%.*}" -gt 0 ] || fail "no gradient came through the local channel's segments (ps_bytes_received_total{transport=\"segment\"}: ${segment_bytes:-none})"
say "Prometheus: $(printf '%.0f' "$segment_bytes") gradient bytes came through shared-memory segments (workers and shards share the local-sockets volume)"

accuracy=$(dc exec -T shard0 worker evaluate --shards "$shards" --min-version "$PS_STEPS" --min-accuracy 0.9) || fail "accuracy check: $accuracy"
say "$accuracy"

# A finished run started again: the workers find it finished, say so and exit 0.
say "the same up once more on the finished run"
dc up -d --scale worker=$WORKERS >/dev/null 2>&1 || fail "compose up on the finished run"
for container in $(dc ps -aq worker); do
  code=$(timeout 300 docker wait "$container") || fail "worker ${container:0:12} did not end on the finished run"
  [ "$code" = 0 ] || fail "worker ${container:0:12} exited with $code on the finished run: $(docker logs --tail 5 "$container" 2>&1)"
done
say "every worker found the run finished and exited 0: $(docker logs "$(dc ps -aq worker | head -n 1)" 2>&1 | grep -o 'the run is finished[^"]*' | head -n 1)"

say "docker-compose down -v"
# With the override too: shard 2's volume, left from the three-shard part of the run, is declared there.
dc3 down -v --remove-orphans >/dev/null 2>&1
left="$(docker ps -aq --filter "label=com.docker.compose.project=$project")$(docker network ls -q --filter "label=com.docker.compose.project=$project")$(docker volume ls -q --filter "label=com.docker.compose.project=$project")"
[ -z "$left" ] || fail "left behind: $left"

# The same deployment in federated mode, over mutual TLS with worker and admin
# tokens: the worker replicas share the clients.
project="${project}fed"
certs=$(mktemp -d)
chmod 755 "$certs"  # the containers run as user 10001
deploy/tls/make-ca.sh "$certs" shard0 shard1 localhost 127.0.0.1 >/dev/null
export PS_TLS_DIR=$certs PS_AUTH_TOKEN="worker-$$-$RANDOM" PS_ADMIN_TOKEN="admin-$$-$RANDOM"
dc() { "${compose[@]}" -p "$project" -f deploy/docker-compose.yml -f deploy/docker-compose.tls.yml "$@"; }
shards=shard0:50051,shard1:50051
say "federated over mutual TLS with worker and admin tokens: 2 shards and $WORKERS worker replicas acting for 20 clients, FedSpeed, 30 rounds"
export PS_MODE=federated PS_FED_ALGORITHM=fedspeed PS_FED_ROUNDS=30 PS_FED_CLIENTS=20
dc up -d --scale worker=$WORKERS shard0 shard1 worker >/dev/null 2>&1 || { dc up -d --scale worker=$WORKERS shard0 shard1 worker; fail "compose up (federated)"; }
for container in $(dc ps -q worker); do
  code=$(timeout 600 docker wait "$container") || fail "federated worker ${container:0:12} did not finish"
  [ "$code" = 0 ] || fail "federated worker ${container:0:12} exited with $code"
done
fed_status() { dc exec -T shard0 ctl --shards "$shards" status --model digits-mlp-fed --json 2>/dev/null | python3 -c "import json,sys; s=json.load(sys.stdin); print($1)"; }
rounds=$(fed_status 'min(m["federated"]["round"] - 1 for x in s for m in x["models"])')
finished=$(fed_status 'all(m["federated"]["finished"] for x in s for m in x["models"])')
[ "$rounds" = 30 ] && [ "$finished" = True ] || fail "federated run stopped at round $rounds (finished: $finished)"
# The worker token alone may not checkpoint: the admin role is enforced over TLS too.
denied=$(dc exec -T -e PS_ADMIN_TOKEN= shard0 ctl --shards "$shards" checkpoint --model digits-mlp-fed 2>&1) && fail "a worker token checkpointed: $denied"
echo "$denied" | grep -q "admin token" || fail "the checkpoint was refused for another reason: $denied"
say "over TLS: ctl checkpoint with the worker token alone is refused ($(echo "$denied" | grep -o 'PermissionDenied\|permission denied\|needs the admin token' | head -1))"
shard_log=$(dc logs shard0 2>&1)
case "$shard_log" in *"$PS_ADMIN_TOKEN"*|*"$PS_AUTH_TOKEN"*) fail "a token appears in a shard's log" ;; esac
accuracy=$(dc exec -T shard0 worker evaluate --shards "$shards" --model digits-mlp-fed --min-version 30 --min-accuracy 0.85) || fail "federated accuracy: $accuracy"
say "federated run complete: $rounds rounds applied on both shards; $accuracy"
dc down -v --remove-orphans >/dev/null 2>&1
left="$(docker ps -aq --filter "label=com.docker.compose.project=$project")$(docker network ls -q --filter "label=com.docker.compose.project=$project")"
[ -z "$left" ] || fail "left behind: $left"
rm -rf "$certs"

trap - EXIT
say "PASSED: nothing left behind ($(( $(date +%s) - started )) s)"
