#!/usr/bin/env bash
# Make the credentials an overlay's secretGenerator reads (never commit them: .gitignore has them):
#   bash scripts/k8s_secrets.sh deploy/k8s/overlays/cpu-demo ssd-demo
# writes OVERLAY/secrets/{registration-token,openai-api-keys,tls.crt,tls.key,ca.crt}: random tokens,
# a fresh CA (its key is left in OVERLAY/secrets/ca.key: move it somewhere safe) and one certificate
# for every pod, valid for the names pods and clients use in NAMESPACE. Existing files are kept.
set -euo pipefail
overlay=${1:?usage: k8s_secrets.sh OVERLAY_DIR NAMESPACE}
ns=${2:?usage: k8s_secrets.sh OVERLAY_DIR NAMESPACE}
out="$overlay/secrets"
mkdir -p "$out"
chmod 700 "$out"
umask 077
rand() { openssl rand -hex 32; }
[ -s "$out/registration-token" ] || rand > "$out/registration-token"
[ -s "$out/openai-api-keys" ] || echo "sk-$(rand)" > "$out/openai-api-keys"
if [ ! -s "$out/tls.crt" ]; then
  openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -days 365 -subj "/CN=ssd CA ($ns)" \
    -keyout "$out/ca.key" -out "$out/ca.crt" 2>/dev/null
  san="DNS:ssd-target,DNS:ssd-target.$ns,DNS:ssd-target.$ns.svc,DNS:ssd-target.$ns.svc.cluster.local"
  san="$san,DNS:ssd-target-headless.$ns.svc.cluster.local,DNS:*.ssd-target-headless.$ns.svc.cluster.local"
  san="$san,DNS:*.ssd-draft-headless.$ns.svc.cluster.local,DNS:localhost,IP:127.0.0.1"
  openssl req -newkey ec -pkeyopt ec_paramgen_curve:P-256 -nodes -subj "/CN=ssd ($ns)" \
    -keyout "$out/tls.key" -out "$out/tls.csr" 2>/dev/null
  openssl x509 -req -in "$out/tls.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial -days 365 \
    -extfile <(printf "subjectAltName=%s\nextendedKeyUsage=serverAuth,clientAuth\n" "$san") -out "$out/tls.crt" 2>/dev/null
  rm -f "$out/tls.csr" "$out/ca.srl"
fi
echo "credentials for $ns in $out (kubectl apply -k $overlay)"
