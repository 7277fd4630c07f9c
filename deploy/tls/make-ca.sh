#!/usr/bin/env bash
# Makes a private CA and the certificates a TLS deployment needs, with openssl:
#   ca.pem                      the CA (give it to clients: --tls-ca, and to shards: --tls-client-ca / --tls-ca)
#   server.pem, server.key      the shards' certificate (--tls-cert, --tls-key), valid for every NAME
#   client.pem, client.key      a client certificate for mutual TLS (--tls-client-cert, --tls-client-key)
# Usage: deploy/tls/make-ca.sh DIR [NAME...]
#   NAME: the host names and IP addresses clients use to reach the shards
#   (default: localhost 127.0.0.1). Keys are ECDSA P-256; certificates last 30 days.
# For tests and the compose file; a production deployment uses its own PKI.
set -euo pipefail

if [ $# -lt 1 ]; then
    echo "usage: $0 DIR [NAME...]" >&2
    exit 2
fi
dir=$1
shift
names=("$@")
[ ${#names[@]} -gt 0 ] || names=(localhost 127.0.0.1)
command -v openssl >/dev/null || { echo "$0: openssl is needed (apt-get install openssl)" >&2; exit 1; }

mkdir -p "$dir"
cd "$dir"
umask 077

san=""
for name in "${names[@]}"; do
    if [[ $name =~ ^[0-9.]+$ || $name == *:* ]]; then san+="IP:$name,"; else san+="DNS:$name,"; fi
done
san=${san%,}

key() { openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$1" 2>/dev/null; }

key ca.key
openssl req -x509 -new -key ca.key -days 30 -subj "/CN=paramserver local CA" \
    -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign,cRLSign" \
    -out ca.pem

# issue NAME SUBJECT EXTENSIONS: a certificate signed by the CA.
issue() {
    key "$1.key"
    openssl req -new -key "$1.key" -subj "$2" -out "$1.csr"
    printf '%s\n' "$3" > "$1.ext"
    openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 30 \
        -extfile "$1.ext" -out "$1.pem" 2>/dev/null
    rm -f "$1.csr" "$1.ext"
}
issue server "/CN=paramserver shard" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth,clientAuth
subjectAltName=$san"
issue client "/CN=paramserver client" "basicConstraints=CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=clientAuth"
rm -f ca.srl
# The CA key is only needed to issue more certificates; keep it out of containers.
chmod 644 ca.pem server.pem client.pem
chmod 600 ca.key
chmod 644 server.key client.key
echo "CA and certificates for ${names[*]} in $dir"
