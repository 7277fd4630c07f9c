#!/usr/bin/env bash
# Builds the images docker-compose.yml needs without any registry:
#   paramserver:latest             server, worker and ctl built on this host, plus
#                                  the shared libraries they link, FROM scratch;
#   paramserver-prometheus:latest  Prometheus from Debian's `prometheus` package.
# An image is rebuilt only when its inputs (files and Dockerfile) change.
# Users with a registry can use deploy/Dockerfile and prom/prometheus instead.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
stage="$root/target/docker"
mkdir -p "$stage"

log() { printf '[build-images] %s\n' "$*"; }

# Copies a binary and every shared library it links into a root filesystem.
add_binary() {
  local rootfs=$1 binary=$2 destination=$3
  install -D -m 0755 "$binary" "$rootfs$destination"
  strip --strip-debug "$rootfs$destination" 2>/dev/null || true
  ldd "$binary" | awk '/=>/ { print $3 } /^[[:space:]]*\// { print $1 }' | while read -r lib; do
    [ -e "$lib" ] && install -D -m 0755 "$(readlink -f "$lib")" "$rootfs$lib"
  done
}

# Builds image $1 from context $2 and Dockerfile $3 unless one with the same input hash exists.
build_image() {
  local tag=$1 context=$2 dockerfile=$3 hash current
  hash=$( (cd "$context" && find . -type f -print0 | sort -z | xargs -0 sha256sum; sha256sum < "$dockerfile") | sha256sum | cut -c1-32)
  current=$(docker image inspect "$tag" --format '{{ index .Config.Labels "paramserver.inputs" }}' 2>/dev/null || true)
  if [ "$current" = "$hash" ]; then
    log "$tag is up to date ($hash)"
    return
  fi
  log "building $tag ($hash)"
  docker build -q -t "$tag" --label "paramserver.inputs=$hash" -f "$dockerfile" "$context" >/dev/null
}

log "building the release binaries"
cargo build --release --quiet --bin server --bin worker --bin ctl

ps_context="$stage/paramserver"
rm -rf "$ps_context" && mkdir -p "$ps_context/rootfs/etc" "$ps_context/rootfs/tmp" "$ps_context/state"
chmod 1777 "$ps_context/rootfs/tmp"
for bin in server worker ctl; do
  add_binary "$ps_context/rootfs" "target/release/$bin" "/usr/local/bin/$bin"
done
printf 'root:x:0:0:root:/root:/sbin/nologin\nps:x:10001:10001:paramserver:/tmp:/sbin/nologin\n' > "$ps_context/rootfs/etc/passwd"
printf 'root:x:0:\nps:x:10001:\n' > "$ps_context/rootfs/etc/group"
build_image paramserver:latest "$ps_context" "$root/deploy/local/paramserver.Dockerfile"

prom_context="$stage/prometheus"
deb_dir="$stage/debs"
mkdir -p "$deb_dir"
if ! ls "$deb_dir"/prometheus_*.deb >/dev/null 2>&1; then
  log "downloading Debian's prometheus package"
  (cd "$deb_dir" && { apt-get download prometheus 2>/dev/null || { apt-get update -qq && apt-get download prometheus; }; })
fi
rm -rf "$prom_context" && mkdir -p "$prom_context/rootfs/etc/prometheus" "$prom_context/data" "$prom_context/rootfs/tmp"
chmod 1777 "$prom_context/rootfs/tmp"
unpacked="$stage/prometheus-deb"
rm -rf "$unpacked" && dpkg-deb -x "$deb_dir"/prometheus_*.deb "$unpacked"
add_binary "$prom_context/rootfs" "$unpacked/usr/bin/prometheus" /usr/bin/prometheus
cp "$root/deploy/prometheus.yml" "$prom_context/rootfs/etc/prometheus/prometheus.yml"
printf 'root:x:0:0:root:/root:/sbin/nologin\nnobody:x:65534:65534:nobody:/nonexistent:/sbin/nologin\n' > "$prom_context/rootfs/etc/passwd"
printf 'root:x:0:\nnogroup:x:65534:\n' > "$prom_context/rootfs/etc/group"
build_image paramserver-prometheus:latest "$prom_context" "$root/deploy/local/prometheus.Dockerfile"

docker image ls --format '{{.Repository}}:{{.Tag}}  {{.Size}}' | grep -E '^paramserver(-prometheus)?:latest' | sed 's/^/[build-images] /'
