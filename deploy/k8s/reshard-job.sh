#!/usr/bin/env bash
# Prints the objects that rewrite a model's checkpoints, in place on the
# StatefulSet's claims, from FROM shards to TO shards, for `kubectl apply -f -`
# (the whole procedure is in docs/resharding.md):
#
#   deploy/k8s/reshard-job.sh --model digits-mlp --from 2 --to 3 | kubectl apply -f -
#
# - one PersistentVolumeClaim per new ordinal (checkpoints-paramserver-I for
#   FROM <= I < TO), as the StatefulSet's volumeClaimTemplate would make it, so
#   the StatefulSet takes it over when scaled to TO;
# - a Job, paramserver-reshard, whose pod mounts claims 0 to max(FROM, TO) - 1
#   and runs `ctl reshard` on them: shard I of the new cluster gets claim I,
#   and the old checkpoints are kept under .before-reshard/ on their claims.
#
# Run it with the shards stopped (scaled to 0). The pod mounts every claim at
# once, so ReadWriteOnce claims must be attachable to one node (one zone).
set -euo pipefail

model="" from="" to="" storage=1Gi image=paramserver:latest name=paramserver
usage() {
  echo "usage: $0 --model NAME --from N --to M [--storage 1Gi] [--image paramserver:latest] [--name paramserver]" >&2
  exit 2
}
while [ $# -gt 0 ]; do
  case "$1" in
    --model) model=$2 ;;
    --from) from=$2 ;;
    --to) to=$2 ;;
    --storage) storage=$2 ;;
    --image) image=$2 ;;
    --name) name=$2 ;;
    -h|--help) usage ;;
    *) echo "unknown argument: $1" >&2; usage ;;
  esac
  [ $# -ge 2 ] || usage
  shift 2
done
[ -n "$model" ] && [ -n "$from" ] && [ -n "$to" ] || usage
case "$from$to" in *[!0-9]*) echo "--from and --to are shard counts" >&2; exit 2 ;; esac
[ "$from" -ge 1 ] && [ "$to" -ge 1 ] || { echo "--from and --to must be at least 1" >&2; exit 2; }
[ "$from" != "$to" ] || { echo "--from and --to are the same: nothing to reshard" >&2; exit 2; }
claims=$(( from > to ? from : to ))

list() { # $1: count -> /checkpoints/0,/checkpoints/1,...
  local i out=""
  for (( i = 0; i < $1; i++ )); do out+="${out:+,}/checkpoints/$i"; done
  echo "$out"
}

for (( i = from; i < to; i++ )); do
  cat <<EOF
---
apiVersion: v1
kind: PersistentVolumeClaim
metadata:
  name: checkpoints-$name-$i
  labels:
    app.kubernetes.io/name: $name
    app.kubernetes.io/component: shard
spec:
  accessModes: [ReadWriteOnce]
  resources:
    requests:
      storage: $storage
EOF
done

cat <<EOF
---
apiVersion: batch/v1
kind: Job
metadata:
  name: $name-reshard
  labels:
    app.kubernetes.io/name: $name
    app.kubernetes.io/component: reshard
spec:
  backoffLimit: 0
  ttlSecondsAfterFinished: 86400
  template:
    metadata:
      labels:
        app.kubernetes.io/name: $name
        app.kubernetes.io/component: reshard
    spec:
      restartPolicy: Never
      enableServiceLinks: false
      automountServiceAccountToken: false
      securityContext:
        runAsNonRoot: true
        runAsUser: 10001
        runAsGroup: 10001
        fsGroup: 10001
        fsGroupChangePolicy: OnRootMismatch
        seccompProfile:
          type: RuntimeDefault
      containers:
        - name: reshard
          image: $image
          imagePullPolicy: IfNotPresent
          command: ["ctl", "reshard", "--model", "$model", "--from", "$(list "$from")", "--to", "$(list "$to")"]
          securityContext:
            allowPrivilegeEscalation: false
            readOnlyRootFilesystem: true
            capabilities:
              drop: [ALL]
          volumeMounts:
EOF
for (( i = 0; i < claims; i++ )); do
  cat <<EOF
            - name: shard-$i
              mountPath: /checkpoints/$i
EOF
done
echo "      volumes:"
for (( i = 0; i < claims; i++ )); do
  cat <<EOF
        - name: shard-$i
          persistentVolumeClaim:
            claimName: checkpoints-$name-$i
EOF
done
