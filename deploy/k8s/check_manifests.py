#!/usr/bin/env python3
"""Checks rendered Kubernetes manifests (`kubectl kustomize` output) offline.

1. Every object validates against the Kubernetes OpenAPI schemas of the given
   versions (the `kubernetes-validate` package, strict: unknown fields fail).
   A ServiceMonitor (a prometheus-operator CRD, no built-in schema) is checked
   structurally instead: its selector must pick Services of the render and its
   endpoints name ports those Services have.
2. The objects agree with the binaries they run: every `--flag` in a
   container's command line and every PS_* variable it gets (env, and the keys
   of ConfigMaps it reads with envFrom) exists in the `--help` of that binary
   or subcommand (`server --help`, `worker train --help`); `$(VAR)` references
   name variables defined before them; the shard list (ranges expanded as the
   binaries do) has one entry per StatefulSet replica, names the pods behind
   the headless Service, and is the same for shards and workers; ports agree
   between the containers, the Services, the shard list, the metrics address
   and the Prometheus annotations; the probes hit the gRPC port, where the
   grpc.health.v1 service is; the world size equals the Job's completions and
   parallelism and the rank is the completion index; the checkpoint directory
   is the PersistentVolumeClaim's mount; the grace period exceeds the
   shutdown grace; the pods run non-root with a read-only root filesystem.
3. The binaries take those settings: `server` is started as the StatefulSet's
   last pod would be (its host name, the rendered variables; listening on
   loopback, a temporary checkpoint directory) and must report the shard index
   of its ordinal, the same expanded shard list and SERVING, then stop cleanly
   on SIGTERM; `worker train` is started with the rendered settings and must
   get past clap (no shard answers, so it then fails to connect, as expected).
   --no-start leaves this out.

Usage: check_manifests.py [--bin-dir target/release] [-k 1.37]... [--expect-shards N]
                          [--expect-workers N] [--no-start] [-v] RENDERED.yaml
Prints every failure and a last line "k8s-check FILE: N passed, M failed";
exits 1 when anything failed, 2 when it cannot run (binaries missing).
"""

import argparse
import importlib.util
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time

import yaml
from pathlib import Path

# The service name the shards report next to "" in grpc.health.v1
# (HEALTH_SERVICE_NAME in proto/src/lib.rs).
HEALTH_SERVICES = {None, "", "paramserver.v1.ParameterServer"}
COMPLETION_INDEX_FIELDS = {
    "metadata.annotations['batch.kubernetes.io/job-completion-index']",
    "metadata.labels['batch.kubernetes.io/job-completion-index']",
}
# A liveness probe on the health service would restart a shard that waits for
# its peers (NOT_SERVING); allow it only with at least this long a window.
MIN_GRPC_LIVENESS_WINDOW_S = 300
# Variables a binary reads without listing them in --help: the clients take the
# admin token from the environment only (`#[arg(skip)]` in client/src/access.rs).
HIDDEN_ENVS = {"worker train": {"PS_ADMIN_TOKEN"}, "ctl": {"PS_ADMIN_TOKEN"}}
POD_KINDS = {"StatefulSet", "Job", "Deployment", "DaemonSet", "ReplicaSet", "Pod"}


class Checks:
    def __init__(self, verbose):
        self.passed = 0
        self.failures = []
        self.verbose = verbose

    def check(self, ok, what, why=""):
        if ok:
            self.passed += 1
            if self.verbose:
                print(f"  ok    {what}")
        else:
            self.failures.append(f"{what}{': ' + why if why else ''}")
            print(f"  FAIL  {what}{': ' + why if why else ''}")
        return ok


# ---------------------------------------------------------------- the binaries


class Help:
    """What one binary or subcommand's `--help` says: flags, their value
    names, their environment variables and their defaults."""

    # Options start at column 2 ("  -h, --help") or 6 ("      --shards <SHARDS>");
    # descriptions are indented further.
    FLAG = re.compile(r"^  (?:-[A-Za-z0-9], |    )--([a-z0-9][a-z0-9-]*)(?:[ =]<([^>]+)>)?")
    ENV = re.compile(r"\[env: ([A-Z][A-Z0-9_]*)(?:=[^\]]*)?\]")
    DEFAULT = re.compile(r"\[default: ([^\]]*)\]")
    POSSIBLE = re.compile(r"\[possible values: ([^\]]*)\]")
    VALUE_ITEM = re.compile(r"^\s+- ([A-Za-z0-9][A-Za-z0-9_.-]*):")

    def __init__(self, name, text):
        self.name = name
        self.text = text
        self.flags = {}  # flag -> takes a value
        self.env_of = {}  # flag -> env var
        self.default_of = {}  # flag -> default
        self.values_of = {}  # flag -> the values it accepts, where clap lists them
        current, listing = None, False
        for line in text.splitlines():
            flag = self.FLAG.match(line)
            if flag:
                current, listing = flag.group(1), False
                self.flags[current] = flag.group(2) is not None
            if current is None:
                continue
            if line.strip() == "Possible values:":
                listing = True
                continue
            item = self.VALUE_ITEM.match(line) if listing else None
            if item:
                self.values_of.setdefault(current, set()).add(item.group(1))
            elif listing:
                listing = False
            for values in self.POSSIBLE.findall(line):
                self.values_of.setdefault(current, set()).update(v.strip() for v in values.split(","))
            for env in self.ENV.findall(line):
                self.env_of.setdefault(current, env)
            for default in self.DEFAULT.findall(line):
                self.default_of.setdefault(current, default)
        self.envs = set(self.env_of.values())
        self.flag_of = {env: flag for flag, env in self.env_of.items()}


def run_help(bin_dir, argv):
    path = os.path.join(bin_dir, argv[0])
    # A clean environment: clap prints the values of set variables in its markers.
    env = {"PATH": "/usr/bin:/bin", "COLUMNS": "200", "NO_COLOR": "1"}
    result = subprocess.run([path, *argv[1:], "--help"], env=env, capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        return None
    return Help(" ".join(argv), result.stdout)


class Binaries:
    def __init__(self, bin_dir, start):
        self.bin_dir = bin_dir
        self.start = start
        self.cache = {}

    def help(self, argv):
        key = tuple(argv)
        if key not in self.cache:
            self.cache[key] = run_help(self.bin_dir, list(argv))
        return self.cache[key]


# ------------------------------------------------------------------- helpers


def parse_duration_s(text):
    """Seconds of a humantime duration such as 30s, 1m 30s, 500ms."""
    units = {"ms": 0.001, "s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}
    total, matched = 0.0, False
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)\s*([a-z]+)", str(text)):
        if unit not in units:
            return None
        total += float(number) * units[unit]
        matched = True
    return total if matched else None


def load_expand_shards():
    """The Python client's shard-list expansion (the servers' rules), loaded
    from its file alone: the package itself needs grpc and numpy."""
    path = Path(__file__).resolve().parents[2] / "client" / "python" / "paramserver" / "shards.py"
    spec = importlib.util.spec_from_file_location("paramserver_shards", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.expand_shards


expand_shards = load_expand_shards()


def port_of(address):
    try:
        return int(str(address).rsplit(":", 1)[1])
    except (IndexError, ValueError):
        return None


def labels_match(selector, labels):
    return bool(selector) and all((labels or {}).get(k) == v for k, v in selector.items())


def name_of(obj):
    return f"{obj.get('kind')}/{obj.get('metadata', {}).get('name')}"


# --------------------------------------------------------- containers' settings


class Invocation:
    """A container's command line and environment, as the binary sees them."""

    def __init__(self, checks, binaries, objects, owner, container):
        self.checks = checks
        self.where = f"{name_of(owner)} container {container.get('name')}"
        self.container = container
        self.argv = list(container.get("command") or []) + list(container.get("args") or [])
        self.help = None
        self.extra_envs = set()
        self.flags = {}
        self.env = {}
        self.raw_env = {}
        if not checks.check(bool(container.get("command")), f"{self.where}: names its binary in `command`"):
            return
        binary = os.path.basename(self.argv[0])
        rest = self.argv[1:]
        if binary == "worker":
            if not checks.check(bool(rest) and not rest[0].startswith("-"), f"{self.where}: worker gets a subcommand"):
                return
            program, rest = [binary, rest[0]], rest[1:]
        elif binary in ("server", "ctl"):
            program = [binary]
        else:
            checks.check(False, f"{self.where}: runs a binary of this project", f"'{binary}' is not server, worker or ctl")
            return
        self.program = " ".join(program)
        self.help = binaries.help(program)
        if not checks.check(self.help is not None, f"{self.where}: `{self.program} --help` works"):
            return
        self._parse_args(rest)
        self._environment(objects)
        if self.program == "worker train" and self.setting("mode") == "federated":
            # `worker train --mode federated` reads the PS_FED_* variables of `worker federated`.
            federated = binaries.help(["worker", "federated"])
            self.extra_envs = federated.envs if federated else set()
        self.check_values()
        for name in self.env:
            if name.startswith("PS_"):
                checks.check(
                    name in self.help.envs or name in self.extra_envs or name in HIDDEN_ENVS.get(self.program, ()),
                    f"{self.where}: {name} is a variable of `{self.program}`",
                    f"no [env: {name}] in `{self.program} --help`",
                )

    def check_values(self):
        """Settings whose values clap lists (tasks, modes, optimizers, encodings) hold one of them."""
        for flag, values in sorted(self.help.values_of.items()):
            value = self.setting(flag)
            if value is None or value.startswith("<"):
                continue
            self.checks.check(
                value in values,
                f"{self.where}: --{flag} {value} is a value `{self.program}` accepts",
                f"possible values: {', '.join(sorted(values))}",
            )

    def _parse_args(self, rest):
        i = 0
        while i < len(rest):
            token = rest[i]
            i += 1
            if not token.startswith("--"):
                self.checks.check(False, f"{self.where}: argument '{token}'", "only --flags are expected after the subcommand")
                continue
            flag, equals, value = token[2:].partition("=")
            if not self.checks.check(
                flag in self.help.flags,
                f"{self.where}: --{flag} is a flag of `{self.program}`",
                f"`{self.program} --help` has no --{flag}",
            ):
                continue
            if self.help.flags[flag] and not equals:
                value = rest[i] if i < len(rest) else None
                i += 1
            self.flags[flag] = value if self.help.flags[flag] else "true"

    def _environment(self, objects):
        """The container's environment as the kubelet builds it: envFrom first,
        then env in order, $(VAR) expanded from what is defined before."""
        for source in self.container.get("envFrom") or []:
            ref = source.get("configMapRef")
            if ref is None:
                continue
            config = objects.get(("ConfigMap", ref.get("name")))
            if not self.checks.check(
                config is not None or ref.get("optional"),
                f"{self.where}: envFrom ConfigMap {ref.get('name')} is in the render",
            ):
                continue
            prefix = source.get("prefix", "")
            for key, value in ((config or {}).get("data") or {}).items():
                self.env[prefix + key] = str(value)
                self.raw_env[prefix + key] = str(value)
        for entry in self.container.get("env") or []:
            name = entry["name"]
            if "value" in entry:
                raw = str(entry["value"])

                def expand(match):
                    var = match.group(1)
                    self.checks.check(
                        var in self.env,
                        f"{self.where}: $({var}) in {name} is defined before it",
                        "the kubelet leaves a reference to a later or unknown variable as it is",
                    )
                    return self.env.get(var, match.group(0))

                value = re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", expand, raw)
            else:
                source = entry.get("valueFrom") or {}
                if "fieldRef" in source:
                    value = f"<fieldRef {source['fieldRef'].get('fieldPath')}>"
                elif "configMapKeyRef" in source:
                    ref = source["configMapKeyRef"]
                    config = objects.get(("ConfigMap", ref.get("name"))) or {}
                    value = (config.get("data") or {}).get(ref.get("key"), f"<configMap {ref.get('name')}>")
                else:
                    value = f"<{next(iter(source), 'unset')}>"
                raw = value
            self.env[name] = value
            self.raw_env[name] = raw

    def setting(self, flag):
        """A flag's effective value: the command line, else its variable, else its default."""
        if self.help is None:
            return None
        if flag in self.flags:
            return self.flags[flag]
        env = self.help.env_of.get(flag)
        if env and env in self.env:
            return self.env[env]
        return self.help.default_of.get(flag)

    def port(self, name):
        for port in self.container.get("ports") or []:
            if port.get("name") == name:
                return port.get("containerPort")
        return None

    def resolve_port(self, port):
        return self.port(port) if isinstance(port, str) else port


# ------------------------------------------------------- the binaries, started


def run_environment(inv, tmp, overrides):
    """The container's variables for a local run: symbolic values (downward
    API) dropped, files under the container's mounts moved into tmp."""
    env = {"PATH": "/usr/bin:/bin"}
    mounts = [m.get("mountPath", "").rstrip("/") for m in inv.container.get("volumeMounts") or []]
    for name, value in inv.env.items():
        if value.startswith("<"):
            continue
        if name.endswith("_FILE") and any(value.startswith(m + "/") for m in mounts):
            path = os.path.join(tmp, value.lstrip("/"))
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "w") as f:
                f.write(f"token-for-{name.lower()}-0123456789\n")
            value = path
        env[name] = value
    env.update(overrides)
    return env


def start_server(checks, inv, bin_dir, statefulset, replicas, shards):
    """Starts the server as the last pod of the StatefulSet would (its host
    name, the container's settings and command line), only listening on
    loopback with a temporary checkpoint directory: it must parse everything,
    take the ordinal as its index, expand the same shard list and report
    SERVING (nothing to restore); then SIGTERM must stop it cleanly."""
    ordinal = replicas - 1
    host = f"{statefulset['metadata']['name']}-{ordinal}"
    with tempfile.TemporaryDirectory(prefix="k8s-check-") as tmp:
        env = run_environment(inv, tmp, {
            "HOSTNAME": host,
            "PS_LISTEN": "127.0.0.1:0",
            "PS_METRICS_ADDR": "127.0.0.1:0",
            "PS_CHECKPOINT_DIR": os.path.join(tmp, "checkpoints"),
            "RUST_LOG": "info",
        })
        argv = [os.path.join(bin_dir, "server"), *inv.argv[1:]]
        process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = queue.Queue()
        threading.Thread(target=lambda: [lines.put(l) for l in process.stdout] + [lines.put(None)], daemon=True).start()
        seen = []

        def wait_for(text, seconds=30):
            deadline = time.time() + seconds
            while time.time() < deadline:
                try:
                    line = lines.get(timeout=max(0.0, deadline - time.time()))
                except queue.Empty:
                    break
                if line is None:
                    break
                seen.append(line)
                if text in line:
                    return line
            return None

        try:
            line = wait_for("shard listening")
            if checks.check(line is not None, f"{inv.where}: `server` starts with these settings as pod {host}",
                            "".join(seen[-5:]).strip() or "no output"):
                index = re.search(r"\bshard=(\d+)", line)
                checks.check(index is not None and int(index.group(1)) == ordinal,
                             f"{inv.where}: pod {host} takes shard index {ordinal}", line.strip())
                listed = re.search(r"shards=\[([^\]]*)\]", line)
                listed = [s.strip().strip('"') for s in listed.group(1).split(",")] if listed else None
                checks.check(listed == shards, f"{inv.where}: `server` expands the shard list as checked here",
                             f"{listed} vs {shards}")
                checks.check(wait_for("health: SERVING") is not None,
                             f"{inv.where}: `server` reports SERVING with nothing to restore")
                # The SIGTERM handler is installed as serving begins: give it a moment.
                time.sleep(1)
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
            try:
                code = process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                code = process.wait()
        checks.check(code == 0, f"{inv.where}: `server` stops cleanly on SIGTERM", f"exit code {code}")


def start_worker(checks, inv, bin_dir):
    """Starts `worker train` with the container's settings (rank 0, a short
    start timeout, metrics on loopback): clap must accept every value. No
    shard answers here, so it then fails to connect, which is expected."""
    with tempfile.TemporaryDirectory(prefix="k8s-check-") as tmp:
        env = run_environment(inv, tmp, {"PS_WORKER_RANK": "0", "PS_START_TIMEOUT": "1s"})
        args = list(inv.argv[1:])
        for i, arg in enumerate(args):
            if arg == "--metrics-addr" and i + 1 < len(args):
                args[i + 1] = "127.0.0.1:0"
            elif arg.startswith("--metrics-addr="):
                args[i] = "--metrics-addr=127.0.0.1:0"
        if "PS_METRICS_ADDR" in env:
            env["PS_METRICS_ADDR"] = "127.0.0.1:0"
        process = subprocess.Popen([os.path.join(bin_dir, "worker"), *args], env=env,
                                   stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        try:
            output, _ = process.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            process.kill()
            output, _ = process.communicate()
        # clap exits with 2 and "error: ..." on a value it does not accept.
        refused = process.returncode == 2 or re.search(r"^error: ", output, re.M)
        checks.check(not refused, f"{inv.where}: `{inv.program}` accepts these settings",
                     output.strip().splitlines()[0] if output.strip() else f"exit code {process.returncode}")


# ---------------------------------------------------------------------- checks


def check_schemas(checks, docs, versions):
    import kubernetes_validate
    from kubernetes_validate.utils import SchemaNotFoundError

    for doc in docs:
        if doc.get("kind") == "ServiceMonitor":
            continue  # no built-in schema: check_service_monitor
        for version in versions:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
                checks.check(True, f"{name_of(doc)} validates against Kubernetes {version}")
            except SchemaNotFoundError as error:
                checks.check(False, f"{name_of(doc)} has a schema in Kubernetes {version}", error.message)
            except Exception as error:  # ValidationError and friends
                path = ".".join(str(p) for p in getattr(error, "path", []) or [])
                checks.check(
                    False,
                    f"{name_of(doc)} validates against Kubernetes {version}",
                    f"{path}: {getattr(error, 'message', error)}",
                )


def pod_specs(docs):
    for doc in docs:
        kind = doc.get("kind")
        if kind == "Pod":
            yield doc, doc.get("metadata", {}), doc.get("spec", {})
        elif kind in POD_KINDS:
            template = doc.get("spec", {}).get("template", {})
            yield doc, template.get("metadata", {}), template.get("spec", {})


def check_security(checks, owner, pod):
    where = name_of(owner)
    context = pod.get("securityContext") or {}
    for container in pod.get("containers") or []:
        own = container.get("securityContext") or {}
        at = f"{where} container {container.get('name')}"

        def setting(key):
            return own.get(key, context.get(key))

        checks.check(setting("runAsNonRoot") is True, f"{at}: runAsNonRoot")
        checks.check(setting("runAsUser") == 10001, f"{at}: runs as user 10001", f"runAsUser {setting('runAsUser')}")
        checks.check(setting("runAsGroup") == 10001, f"{at}: runs as group 10001", f"runAsGroup {setting('runAsGroup')}")
        checks.check(
            (setting("seccompProfile") or {}).get("type") == "RuntimeDefault", f"{at}: seccompProfile RuntimeDefault"
        )
        checks.check(own.get("allowPrivilegeEscalation") is False, f"{at}: allowPrivilegeEscalation false")
        checks.check(own.get("readOnlyRootFilesystem") is True, f"{at}: readOnlyRootFilesystem")
        checks.check("ALL" in ((own.get("capabilities") or {}).get("drop") or []), f"{at}: drops ALL capabilities")
        mounts = {m.get("mountPath") for m in container.get("volumeMounts") or []}
        checks.check("/tmp" in mounts, f"{at}: /tmp is a writable volume (read-only root)")
        checks.check(bool((container.get("resources") or {}).get("requests")), f"{at}: has resource requests")
        checks.check(
            bool(((container.get("resources") or {}).get("limits") or {}).get("memory")), f"{at}: has a memory limit"
        )
        gpus = ((container.get("resources") or {}).get("limits") or {}).get("nvidia.com/gpu")
        if gpus:
            tolerated = any(t.get("key") == "nvidia.com/gpu" for t in pod.get("tolerations") or [])
            checks.check(tolerated, f"{at}: asks for a GPU and tolerates the nvidia.com/gpu taint")


def check_file_paths(checks, inv):
    """Settings that name files (token files, TLS material) point into a mounted volume."""
    mounts = [m.get("mountPath", "").rstrip("/") + "/" for m in inv.container.get("volumeMounts") or []]
    for name, value in inv.env.items():
        if name.startswith("PS_") and (name.endswith("_FILE") or name.startswith("PS_TLS_")) and name != "PS_TLS_DOMAIN":
            checks.check(
                any(value.startswith(m) for m in mounts),
                f"{inv.where}: {name}={value} lies in a mounted volume",
            )


def check_probe(checks, inv, kind, probe, grpc_port):
    where = f"{inv.where}: {kind}"
    if "grpc" in probe:
        checks.check(
            probe["grpc"].get("port") == grpc_port,
            f"{where} asks the health service on the gRPC port {grpc_port}",
            f"port {probe['grpc'].get('port')}",
        )
        checks.check(
            probe["grpc"].get("service") in HEALTH_SERVICES,
            f"{where} asks for a service the shard reports",
            f"service {probe['grpc'].get('service')!r}",
        )
        return "grpc"
    if "tcpSocket" in probe:
        port = inv.resolve_port(probe["tcpSocket"].get("port"))
        checks.check(port == grpc_port, f"{where} opens the gRPC port {grpc_port}", f"port {port}")
        return "tcp"
    checks.check(False, f"{where} hits the gRPC port", f"neither grpc nor tcpSocket: {sorted(probe)}")
    return None


def check_shards(checks, docs, objects, binaries, statefulset, pod_meta, pod, expect):
    where = name_of(statefulset)
    spec = statefulset.get("spec", {})
    replicas = spec.get("replicas", 1)
    if expect is not None:
        checks.check(replicas == expect, f"{where}: {expect} replicas as asked", f"{replicas}")
    checks.check(spec.get("podManagementPolicy") == "Parallel", f"{where}: podManagementPolicy Parallel",
                 "with OrderedReady a restarted shard 0 waits for peers that are never started")
    service = objects.get(("Service", spec.get("serviceName")))
    if checks.check(service is not None, f"{where}: its serviceName {spec.get('serviceName')} is a Service of the render"):
        checks.check(service["spec"].get("clusterIP") == "None", f"{where}: Service {spec.get('serviceName')} is headless")
        checks.check(service["spec"].get("publishNotReadyAddresses") is True,
                     f"{where}: Service {spec.get('serviceName')} publishes not-ready addresses")
        checks.check(labels_match(service["spec"].get("selector"), pod_meta.get("labels")),
                     f"{where}: Service {spec.get('serviceName')} selects its pods")
    budgets = [d for d in docs if d.get("kind") == "PodDisruptionBudget"
               and labels_match(d["spec"].get("selector", {}).get("matchLabels"), pod_meta.get("labels"))]
    checks.check(len(budgets) == 1, f"{where}: one PodDisruptionBudget covers the shards", f"{len(budgets)}")
    for budget in budgets:
        allowed = budget["spec"].get("maxUnavailable")
        if allowed is None:
            allowed = replicas - int(budget["spec"].get("minAvailable", replicas))
        checks.check(allowed == 1, f"{where}: the budget allows one shard down at a time", f"{allowed}")
    claims = {t["metadata"]["name"] for t in spec.get("volumeClaimTemplates") or []}
    servers = []
    for container in pod.get("containers") or []:
        inv = Invocation(checks, binaries, objects, statefulset, container)
        if inv.help is None or inv.program != "server":
            continue
        servers.append(inv)
        grpc_port = inv.port("grpc")
        checks.check(grpc_port is not None, f"{inv.where}: has a port named grpc")
        try:
            shards = expand_shards((inv.setting("shards") or "").split(","))
        except ValueError as error:
            checks.check(False, f"{inv.where}: the shard list expands", str(error))
            continue
        inv.shards = shards
        checks.check(len(shards) == replicas, f"{inv.where}: the shard list has one entry per replica ({replicas})",
                     f"{len(shards)} entries: {shards}")
        name, service_name = statefulset["metadata"]["name"], spec.get("serviceName")
        for i, entry in enumerate(shards):
            host = entry.rsplit(":", 1)[0]
            checks.check(host == f"{name}-{i}.{service_name}" or host.startswith(f"{name}-{i}.{service_name}."),
                         f"{inv.where}: shard {i} is pod {name}-{i} of Service {service_name}", entry)
        ports = {port_of(entry) for entry in shards}
        checks.check(ports == {grpc_port}, f"{inv.where}: the shard list's port is the grpc containerPort {grpc_port}",
                     f"{sorted(p for p in ports if p)}")
        if inv.setting("listen"):
            checks.check(port_of(inv.setting("listen")) == grpc_port, f"{inv.where}: --listen is on the grpc port")
        index = inv.setting("shard-index")
        checks.check(index == "hostname" or (replicas == 1 and index == "0"),
                     f"{inv.where}: the shard index comes from the pod ordinal (hostname)", f"{index}")
        if service is not None:
            for port in service["spec"].get("ports") or []:
                target = inv.resolve_port(port.get("targetPort", port.get("port")))
                if port.get("name") == "grpc":
                    checks.check(target == grpc_port and port.get("port") == grpc_port,
                                 f"{inv.where}: Service port grpc is the shard list's port {grpc_port}",
                                 f"port {port.get('port')} -> {target}")
        check_metrics(checks, inv, pod_meta, service)
        # Probes: the health service is on the gRPC port.
        ready = inv.container.get("readinessProbe")
        if checks.check(ready is not None, f"{inv.where}: has a readiness probe"):
            checks.check(check_probe(checks, inv, "readinessProbe", ready, grpc_port) == "grpc",
                         f"{inv.where}: readiness is the grpc.health.v1 answer")
        live = inv.container.get("livenessProbe")
        if checks.check(live is not None, f"{inv.where}: has a liveness probe"):
            kind = check_probe(checks, inv, "livenessProbe", live, grpc_port)
            if kind == "grpc":
                window = live.get("failureThreshold", 3) * live.get("periodSeconds", 10)
                checks.check(window >= MIN_GRPC_LIVENESS_WINDOW_S,
                             f"{inv.where}: a gRPC liveness probe tolerates {MIN_GRPC_LIVENESS_WINDOW_S} s of NOT_SERVING",
                             f"{window} s would restart a recovering shard")
        if inv.container.get("startupProbe"):
            check_probe(checks, inv, "startupProbe", inv.container["startupProbe"], grpc_port)
        # Checkpoints on the claim.
        directory = inv.setting("checkpoint-dir")
        mounts = {m["mountPath"].rstrip("/"): m["name"] for m in inv.container.get("volumeMounts") or []}
        if checks.check(bool(directory), f"{inv.where}: has a checkpoint directory"):
            checks.check(mounts.get(directory.rstrip("/")) in claims,
                         f"{inv.where}: the checkpoint directory {directory} is a volumeClaimTemplate's mount",
                         f"mounts {mounts}, claims {sorted(claims)}")
        grace = parse_duration_s(inv.setting("shutdown-grace"))
        period = pod.get("terminationGracePeriodSeconds", 30)
        checks.check(grace is not None and period > grace,
                     f"{inv.where}: terminationGracePeriodSeconds {period} exceeds the shutdown grace {inv.setting('shutdown-grace')}")
        check_file_paths(checks, inv)
        if binaries.start:
            start_server(checks, inv, binaries.bin_dir, statefulset, replicas, shards)
    checks.check(len(servers) == 1, f"{where}: runs one server container", f"{len(servers)}")
    return servers[0] if servers else None


def check_metrics(checks, inv, pod_meta, service):
    address = inv.setting("metrics-addr")
    annotations = pod_meta.get("annotations") or {}
    if address in (None, "", "off"):
        checks.check(annotations.get("prometheus.io/scrape") != "true",
                     f"{inv.where}: no scrape annotation without a metrics address")
        return
    port = port_of(address)
    checks.check(port == inv.port("metrics"), f"{inv.where}: the metrics address {address} is the port named metrics",
                 f"containerPort {inv.port('metrics')}")
    checks.check(annotations.get("prometheus.io/scrape") == "true", f"{inv.where}: pods carry prometheus.io/scrape")
    checks.check(str(annotations.get("prometheus.io/port")) == str(port),
                 f"{inv.where}: prometheus.io/port is the metrics port {port}", f"{annotations.get('prometheus.io/port')}")
    checks.check(annotations.get("prometheus.io/path", "/metrics") == "/metrics", f"{inv.where}: prometheus.io/path")
    if service is not None:
        for service_port in service["spec"].get("ports") or []:
            if service_port.get("name") == "metrics":
                target = inv.resolve_port(service_port.get("targetPort", service_port.get("port")))
                checks.check(target == port, f"{inv.where}: Service port metrics reaches {port}", f"{target}")


def check_workers(checks, docs, objects, binaries, job, pod_meta, pod, shards, expect):
    where = name_of(job)
    spec = job.get("spec", {})
    completions = spec.get("completions")
    if expect is not None:
        checks.check(completions == expect, f"{where}: {expect} completions as asked", f"{completions}")
    checks.check(spec.get("completionMode") == "Indexed", f"{where}: is an Indexed Job (completion index = rank)")
    checks.check(spec.get("parallelism") == completions, f"{where}: parallelism equals completions",
                 f"{spec.get('parallelism')} vs {completions}")
    for container in pod.get("containers") or []:
        inv = Invocation(checks, binaries, objects, job, container)
        if inv.help is None:
            continue
        if not checks.check(inv.program == "worker train", f"{inv.where}: runs `worker train`", inv.program):
            continue
        checks.check(str(inv.setting("world-size")) == str(completions),
                     f"{inv.where}: the world size is the number of completions ({completions})",
                     f"{inv.setting('world-size')}")
        rank = inv.setting("rank")
        fields = {f"<fieldRef {f}>" for f in COMPLETION_INDEX_FIELDS}
        checks.check(rank in fields, f"{inv.where}: the rank is the completion index",
                     f"rank {rank!r} (raw {inv.raw_env.get('PS_WORKER_RANK')!r})")
        try:
            worker_shards = expand_shards((inv.setting("shards") or "").split(","))
        except ValueError as error:
            checks.check(False, f"{inv.where}: the shard list expands", str(error))
            worker_shards = None
        if shards is not None:
            checks.check(worker_shards == shards, f"{inv.where}: the shard list is the shards' own",
                         f"{worker_shards} vs {shards}")
        check_metrics(checks, inv, pod_meta, None)
        check_file_paths(checks, inv)
        if binaries.start:
            start_worker(checks, inv, binaries.bin_dir)
        yield inv


def check_services(checks, docs):
    pods = [(owner, meta, spec) for owner, meta, spec in pod_specs(docs)]
    for service in (d for d in docs if d.get("kind") == "Service"):
        selected = [p for p in pods if labels_match(service["spec"].get("selector"), p[1].get("labels"))]
        if not checks.check(bool(selected), f"{name_of(service)} selects pods of the render"):
            continue
        for port in service["spec"].get("ports") or []:
            target = port.get("targetPort", port.get("port"))
            for owner, _, spec in selected:
                found = any(
                    (p.get("name") == target if isinstance(target, str) else p.get("containerPort") == target)
                    for c in spec.get("containers") or [] for p in c.get("ports") or []
                )
                checks.check(found, f"{name_of(service)} port {port.get('name')} reaches a container port of {name_of(owner)}",
                             f"targetPort {target}")


def check_service_monitor(checks, docs):
    services = [d for d in docs if d.get("kind") == "Service"]
    for monitor in (d for d in docs if d.get("kind") == "ServiceMonitor"):
        where = name_of(monitor)
        checks.check(monitor.get("apiVersion") == "monitoring.coreos.com/v1", f"{where}: apiVersion monitoring.coreos.com/v1")
        spec = monitor.get("spec") or {}
        known = {"selector", "endpoints", "jobLabel", "namespaceSelector", "targetLabels", "podTargetLabels",
                 "sampleLimit", "scrapeProtocols", "attachMetadata"}
        checks.check(set(spec) <= known, f"{where}: spec has only ServiceMonitor fields", f"{sorted(set(spec) - known)}")
        selector = (spec.get("selector") or {}).get("matchLabels")
        selected = [s for s in services if labels_match(selector, s["metadata"].get("labels"))]
        checks.check(bool(selected), f"{where}: its selector picks Services of the render", f"{selector}")
        endpoints = spec.get("endpoints") or []
        checks.check(bool(endpoints), f"{where}: has endpoints")
        for endpoint in endpoints:
            for service in selected:
                names = {p.get("name") for p in service["spec"].get("ports") or []}
                checks.check(endpoint.get("port") in names,
                             f"{where}: endpoint port {endpoint.get('port')!r} is a port of {name_of(service)}",
                             f"ports {sorted(n for n in names if n)}")
            checks.check(endpoint.get("path", "/metrics") == "/metrics", f"{where}: scrapes /metrics")
        if spec.get("jobLabel"):
            for service in selected:
                checks.check(spec["jobLabel"] in (service["metadata"].get("labels") or {}),
                             f"{where}: jobLabel {spec['jobLabel']} is a label of {name_of(service)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("rendered", help="kubectl kustomize output")
    parser.add_argument("--bin-dir", default="target/release", help="where server and worker are (default target/release)")
    parser.add_argument("-k", "--kubernetes-version", action="append", dest="versions",
                        help="validate against this Kubernetes version (repeatable; default 1.29 and 1.37)")
    parser.add_argument("--expect-shards", type=int)
    parser.add_argument("--expect-workers", type=int)
    parser.add_argument("--no-start", action="store_true",
                        help="do not start server and worker with the rendered settings (only read --help)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args()
    versions = args.versions or ["1.29", "1.37"]

    missing = [b for b in ("server", "worker") if not os.access(os.path.join(args.bin_dir, b), os.X_OK)]
    if missing:
        print(f"check_manifests: {', '.join(missing)} not found in {args.bin_dir}: build them "
              f"(cargo build --bin server --bin worker) or pass --bin-dir", file=sys.stderr)
        return 2
    with open(args.rendered) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    objects = {(d.get("kind"), d.get("metadata", {}).get("name")): d for d in docs}
    checks = Checks(args.verbose)
    binaries = Binaries(args.bin_dir, not args.no_start)

    check_schemas(checks, docs, versions)
    known = {"ConfigMap", "Secret", "Service", "StatefulSet", "Job", "PodDisruptionBudget", "ServiceMonitor"}
    for doc in docs:
        checks.check(doc.get("kind") in known, f"{name_of(doc)} is a kind this checker knows")
    shards = None
    statefulsets = [(o, m, s) for o, m, s in pod_specs(docs) if o["kind"] == "StatefulSet"]
    jobs = [(o, m, s) for o, m, s in pod_specs(docs) if o["kind"] == "Job"]
    checks.check(len(statefulsets) == 1, "the render has one StatefulSet of shards", f"{len(statefulsets)}")
    checks.check(len(jobs) == 1, "the render has one Job of workers", f"{len(jobs)}")
    server = None
    for owner, meta, spec in statefulsets:
        check_security(checks, owner, spec)
        server = check_shards(checks, docs, objects, binaries, owner, meta, spec, args.expect_shards)
        shards = getattr(server, "shards", None)
    for owner, meta, spec in jobs:
        check_security(checks, owner, spec)
        for worker in check_workers(checks, docs, objects, binaries, owner, meta, spec, shards, args.expect_workers):
            if server is not None:
                # Tokens: a worker registers the model (an admin call) and trains (a worker call).
                for needed in ("PS_ADMIN_TOKEN", "PS_AUTH_TOKEN"):
                    if any(n in server.env for n in (needed, needed + "_FILE")):
                        has = any(n in worker.env for n in ("PS_ADMIN_TOKEN", "PS_ADMIN_TOKEN_FILE",
                                                            needed, needed + "_FILE"))
                        checks.check(has, f"{worker.where}: has a token the shards accept ({needed})")
    check_services(checks, docs)
    check_service_monitor(checks, docs)

    print(f"k8s-check {args.rendered}: {checks.passed} passed, {len(checks.failures)} failed")
    return 1 if checks.failures else 0


if __name__ == "__main__":
    sys.exit(main())
