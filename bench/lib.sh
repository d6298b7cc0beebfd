# Shared by the bench scripts: a PKI made with the openssl CLI and an nginx receiver that
# requires a client certificate (one worker, as ../shared/bench/peers/run-peers.sh runs it).
# Source it, then call bench_scratch first: it makes $PKI (a scratch directory) and $PIDS (the
# processes to stop on exit).

# A scratch directory in $PKI, named after $1, and an EXIT trap that stops every process in
# $PIDS, runs `bench_extra_cleanup` when the script defines one, and removes the directory.
bench_scratch() {
  PKI=$(mktemp -d "/tmp/$1.XXXXXX")
  PIDS=()
  trap bench_cleanup EXIT
}

bench_cleanup() {
  for p in "${PIDS[@]:-}"; do [ -n "$p" ] && kill "$p" 2>/dev/null || true; done; sleep 0.3
  if declare -F bench_extra_cleanup >/dev/null; then bench_extra_cleanup; fi
  rm -rf "$PKI"
}

bench_tools() {
  export PATH="$PATH:/usr/sbin"
  command -v nginx >/dev/null && command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq nginx-light wrk >/dev/null; }
}

# ca.pem, server.{pem,key} (localhost, 127.0.0.1), client.{pem,key} in $PKI.
bench_pki() {
  ( cd "$PKI"
    key() { openssl ecparam -name prime256v1 -genkey -noout 2>/dev/null | openssl pkcs8 -topk8 -nocrypt -out "$1.key"; }
    key ca; openssl req -x509 -new -key ca.key -subj "/CN=Bench CA" -days 2 -out ca.pem \
      -addext basicConstraints=critical,CA:TRUE -addext keyUsage=critical,keyCertSign 2>/dev/null
    leaf() { key "$1"; openssl req -new -key "$1.key" -subj "/CN=$2" -out "$1.csr" 2>/dev/null
      printf 'subjectAltName=%s\nextendedKeyUsage=%s\n' "$3" "$4" > "$1.ext"
      openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -CAcreateserial -days 2 -extfile "$1.ext" -out "$1.pem" 2>/dev/null; }
    leaf server localhost "DNS:localhost,IP:127.0.0.1" serverAuth
    leaf client gateway.bench.test "DNS:gateway.bench.test" clientAuth )
}

# nginx on 127.0.0.1:9443 with ssl_verify_client on, answering 200 to everything.
bench_receiver() {
  mkdir -p "$PKI/rx/logs"
  cat > "$PKI/rx/nginx.conf" <<CONF
worker_processes 1; pid $PKI/rx/nginx.pid; error_log $PKI/rx/logs/error.log warn; daemon off;
events { worker_connections 8192; }
http { access_log off; keepalive_requests 1000000; client_body_temp_path $PKI/rx/body;
  server { listen 127.0.0.1:9443 ssl; ssl_certificate $PKI/server.pem; ssl_certificate_key $PKI/server.key;
    ssl_client_certificate $PKI/ca.pem; ssl_verify_client on; client_body_buffer_size 64k;
    location / { return 200 "ok"; } } }
CONF
  nginx -c "$PKI/rx/nginx.conf" -p "$PKI/rx" & PIDS+=($!)
}

# nginx as the peer proxy on 127.0.0.1:$1: a keep-alive pool of 64 mTLS connections to the
# receiver, our client certificate, the receiver's verified. Writes $PKI/px/nginx.conf; the
# caller starts it. $2: extra main-context directives (e.g. "master_process off; ").
bench_proxy_conf() {
  mkdir -p "$PKI/px/logs"
  cat > "$PKI/px/nginx.conf" <<CONF
worker_processes 1; ${2:-}pid $PKI/px/nginx.pid; error_log $PKI/px/logs/error.log warn; daemon off;
events { worker_connections 8192; }
http { access_log off; keepalive_requests 1000000; client_body_temp_path $PKI/px/body; proxy_temp_path $PKI/px/proxy;
  upstream rx { server 127.0.0.1:9443; keepalive 64; }
  server { listen 127.0.0.1:$1;
    location / { proxy_pass https://rx; proxy_http_version 1.1; proxy_set_header Connection "";
      proxy_ssl_certificate $PKI/client.pem; proxy_ssl_certificate_key $PKI/client.key;
      proxy_ssl_trusted_certificate $PKI/ca.pem; proxy_ssl_verify on; proxy_ssl_name localhost;
      proxy_ssl_session_reuse on; } } }
CONF
}

# HAProxy as the peer proxy on 127.0.0.1:$1 (one thread), configured as
# ../shared/bench/peers/run-peers.sh configures it. Writes $PKI/haproxy.cfg.
bench_haproxy_conf() {
  cat "$PKI/client.pem" "$PKI/client.key" > "$PKI/client-combined.pem"
  cat > "$PKI/haproxy.cfg" <<CONF
global
  nbthread 1
  maxconn 4096
defaults
  mode http
  timeout connect 2s
  timeout client 30s
  timeout server 30s
frontend fe
  bind 127.0.0.1:$1
  default_backend be
backend be
  http-reuse always
  server rx 127.0.0.1:9443 ssl crt $PKI/client-combined.pem ca-file $PKI/ca.pem verify required sni str(localhost) verifyhost localhost
CONF
}

# A Sallyport sidecar config on 127.0.0.1:$1, one route to the receiver. The audit log goes to
# an audit file ($PKI/sidecar-audit.jsonl), or to the SQLite store with SALLYPORT_AUDIT=store.
# Writes $PKI/sidecar.toml.
bench_sidecar_conf() {
  printf '[identity]\ncert = "%s/client.pem"\nkey = "%s/client.key"\n[egress]\nallow = ["127.0.0.0/8"]\n[store]\nurl = "sqlite://%s/sidecar.db"\n[sidecar]\nlisten = "127.0.0.1:%s"\n%s\n[[sidecar.routes]]\nprefix = "/"\nupstream = "https://localhost:9443"\nca = "%s/ca.pem"\n' \
    "$PKI" "$PKI" "$PKI" "$1" "$(bench_audit_line "$PKI")" "$PKI" > "$PKI/sidecar.toml"
}

# The sidecar's `audit_file` setting for a config in directory $1 (none with SALLYPORT_AUDIT=store).
bench_audit_line() {
  [ "${SALLYPORT_AUDIT:-file}" = store ] || printf 'audit_file = "%s/sidecar-audit.jsonl"' "$1"
}

# $PKI/post.lua: a wrk script that POSTs a random 1 KB JSON-typed body, as the peer script does.
bench_post_lua() {
  head -c 1024 /dev/urandom | base64 -w0 | head -c 1024 > "$PKI/body-1k"
  printf 'wrk.method = "POST"\nwrk.headers["Content-Type"] = "application/json"\nlocal f = io.open("%s/body-1k"); wrk.body = f:read("*a"); f:close()\n' "$PKI" > "$PKI/post.lua"
}

# $BIN: the sallyport binary to measure — $SALLYPORT_BIN when set (A/B of two builds), else
# this checkout's release build, built now. Needs $ROOT.
bench_sallyport_bin() {
  BIN=${SALLYPORT_BIN:-$ROOT/target/release/sallyport}
  [ -n "${SALLYPORT_BIN:-}" ] || (cd "$ROOT" && cargo build --release --quiet)
  [ -x "$BIN" ] || { echo "SALLYPORT_BIN is not an executable: $BIN" >&2; exit 1; }
  # Absolute: some scripts start it from another directory (the peer script, from its PKI's).
  BIN=$(realpath "$BIN")
}

# What cpu-sidecar.sh and floor-sidecar.sh measure, started and answering: the receiver,
# HAProxy on 127.0.0.1:18182 ($HP) and Sallyport on 127.0.0.1:18190 ($SP), with $PKI/post.lua
# written. Needs $ROOT; call after bench_scratch.
bench_start_pair() {
  bench_tools
  command -v haproxy >/dev/null || { apt-get update -qq && apt-get install -y -qq haproxy >/dev/null; }
  bench_pki
  bench_receiver
  bench_sallyport_bin
  bench_post_lua
  bench_haproxy_conf 18182
  bench_sidecar_conf 18190
  haproxy -f "$PKI/haproxy.cfg" -db >/dev/null 2>&1 & HP=$!; PIDS+=("$HP")
  "$BIN" sidecar --config "$PKI/sidecar.toml" 2>/dev/null & SP=$!; PIDS+=("$SP")
  bench_wait_ports 18182 18190
}

# Wait (up to 10 s each) until every port given answers HTTP on 127.0.0.1.
bench_wait_ports() {
  local port
  for port in "$@"; do
    for _ in $(seq 40); do curl -s -o /dev/null "http://127.0.0.1:$port/" && break; sleep 0.25; done
  done
}

# The config lines of segment s1 and dataflow rx (to the bench receiver, one mapped attribute),
# shared by every export bench's serve config.
bench_rx_dataflow() {
  cat <<CONF
[[segments]]
id = "s1"
name = "S"
[[dataflows]]
name = "rx"
endpoint = "https://localhost:9443/profiles"
ca = "$PKI/ca.pem"
segments = ["s1"]
attributes = [{ source = "person.name.firstName", target = "firstName" }]
CONF
}

# A `serve` config for the export benchmarks in $PKI/$1.toml: the bench client identity, the
# public listener on 127.0.0.1:$2, the admin API on 127.0.0.1:$3 (token from
# BENCH_ADMIN_TOKEN), the SQLite store $PKI/$1.db, and one dataflow "rx" to the receiver on
# :9443; $4, when given, adds keys to the dataflow.
bench_serve_conf() {
  cat > "$PKI/$1.toml" <<CONF
[identity]
cert = "$PKI/client.pem"
key = "$PKI/client.key"
[egress]
allow = ["127.0.0.0/8"]
[public]
listen = "127.0.0.1:$2"
[admin]
listen = "127.0.0.1:$3"
token_env = "BENCH_ADMIN_TOKEN"
[store]
url = "sqlite://$PKI/$1.db"
$(bench_rx_dataflow)
${4:-}
CONF
}

# Wait up to 10 s for something to listen on 127.0.0.1:$1.
bench_wait_port() {
  for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/"$1") 2>/dev/null && return 0; sleep 0.1; done
  return 1
}
