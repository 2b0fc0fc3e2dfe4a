#!/usr/bin/env bash
# Evaluates every PromQL query of grafana/wsmtp.json against a real
# Prometheus that scrapes a real wsmtp, and fails unless each query returns
# a non-empty result.
#
# It starts, all on loopback: an SMTP sink for the downstream group, wsmtp
# with a temporary configuration and database, and Prometheus with a
# temporary configuration and storage. It sends mail that reaches every
# tier (spooled, routed, delivered to a Maildir and to the sink, passed
# through, and a rejected relay attempt), waits for several scrapes, then
# runs each query through Prometheus's HTTP API, with $instance as .* and
# $__rate_interval as 1m. Everything it started is stopped at the end.
#
# Usage: grafana/check-queries.sh [WSMTP_BINARY]
#   WSMTP_BINARY defaults to $CARGO_TARGET_DIR/debug/wsmtp, else
#   target/debug/wsmtp (build it with `cargo build`).
# Needs: prometheus (Debian package prometheus), python3, curl, jq, and the
# PostgreSQL server at 127.0.0.1:5432 (user postgres, no password), or
# WSMTP_CHECK_PG_HOST/WSMTP_CHECK_PG_PORT.
# Ports, overridable by environment: SMTP_PORT (25250), SINK_PORT (25260),
# ADMIN_PORT (29025), PROMETHEUS_PORT (29090).
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
binary=${1:-${CARGO_TARGET_DIR:-$root/target}/debug/wsmtp}
smtp_port=${SMTP_PORT:-25250}
sink_port=${SINK_PORT:-25260}
admin_port=${ADMIN_PORT:-29025}
prometheus_port=${PROMETHEUS_PORT:-29090}
pg_host=${WSMTP_CHECK_PG_HOST:-127.0.0.1}
pg_port=${WSMTP_CHECK_PG_PORT:-5432}
database=wsmtp_dashboard_check_$$

for tool in prometheus python3 curl jq; do
    command -v "$tool" >/dev/null || { echo "error: $tool not found" >&2; exit 2; }
done
[ -x "$binary" ] || { echo "error: wsmtp binary $binary not found; run cargo build" >&2; exit 2; }

work=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do
        kill "$pid" 2>/dev/null || true
    done
    for pid in "${pids[@]}"; do
        wait "$pid" 2>/dev/null || true
    done
    python3 - "$pg_host" "$pg_port" "$database" <<'EOF' || true
import socket, struct, sys
# DROP DATABASE through the simple query protocol, so no psql is needed.
host, port, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.create_connection((host, port), timeout=10)
params = b"user\0postgres\0database\0postgres\0\0"
s.sendall(struct.pack("!ii", 8 + len(params), 196608) + params)
def read_until_ready():
    while True:
        kind = s.recv(1)
        length = struct.unpack("!i", s.recv(4))[0]
        body = b""
        while len(body) < length - 4:
            body += s.recv(length - 4 - len(body))
        if kind == b"Z":
            return
read_until_ready()
query = f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'.encode() + b"\0"
s.sendall(b"Q" + struct.pack("!i", 4 + len(query)) + query)
read_until_ready()
EOF
    rm -rf "$work"
}
trap cleanup EXIT

wait_for() {
    local what=$1 url=$2
    for _ in $(seq 1 100); do
        if curl -fsS "$url" >/dev/null 2>&1; then return 0; fi
        sleep 0.2
    done
    echo "error: $what did not respond at $url within 20 s" >&2
    exit 1
}

# A downstream SMTP server that accepts every message and keeps nothing.
cat >"$work/sink.py" <<'EOF'
import asyncio, sys
async def session(reader, writer):
    writer.write(b"220 sink ESMTP\r\n")
    in_data = False
    while line := await reader.readline():
        if in_data:
            if line == b".\r\n":
                in_data = False
                writer.write(b"250 2.0.0 accepted\r\n")
            continue
        verb = line[:4].upper()
        if verb == b"EHLO":
            writer.write(b"250-sink\r\n250-8BITMIME\r\n250 PIPELINING\r\n")
        elif verb == b"DATA":
            in_data = True
            writer.write(b"354 go ahead\r\n")
        elif verb == b"QUIT":
            writer.write(b"221 2.0.0 bye\r\n")
            await writer.drain()
            break
        else:
            writer.write(b"250 2.0.0 ok\r\n")
        await writer.drain()
    writer.close()
async def main():
    server = await asyncio.start_server(session, "127.0.0.1", int(sys.argv[1]))
    async with server:
        await server.serve_forever()
asyncio.run(main())
EOF
python3 "$work/sink.py" "$sink_port" &
pids+=($!)

mkdir -p "$work/rules"
cat >"$work/config.yaml" <<EOF
hostname: mx.check.example
rules: rules
dnsbl:
  - zone: bl.check.example
listeners:
  - address: 127.0.0.1:$smtp_port
relay:
  local_domains: [example.com]
  relay_domains:
    - domain: example.net
      group: legacy
  relay_networks: [127.0.0.1/32]
  outbound_group: legacy
downstream_groups:
  - name: legacy
    tls: none
    hosts: [127.0.0.1:$sink_port]
queue:
  url: postgres://postgres@$pg_host:$pg_port/$database
router:
  poll_interval: 100ms
delivery:
  poll_interval: 100ms
admin:
  address: 127.0.0.1:$admin_port
  queue_interval: 2s
log:
  filter: warn
EOF
"$binary" --config "$work/config.yaml" migrate >/dev/null
"$binary" --config "$work/config.yaml" accounts add alice --address alice@example.com \
    --maildir "$work/maildir/alice" >/dev/null
"$binary" --config "$work/config.yaml" serve 2>"$work/wsmtp.log" &
pids+=($!)
wait_for "wsmtp's admin listener" "http://127.0.0.1:$admin_port/readyz"

python3 - "$smtp_port" <<'EOF'
import smtplib, sys
port = int(sys.argv[1])
body = "Subject: dashboard check\r\n\r\nhello\r\n"
with smtplib.SMTP("127.0.0.1", port) as smtp:
    for _ in range(3):
        smtp.sendmail("me@example.org", ["alice@example.com", "bob@example.net"], body)
    smtp.sendmail("me@example.org", ["bob@example.net"], body)
with smtplib.SMTP("127.0.0.1", port, source_address=("127.0.0.2", 0)) as smtp:
    try:
        smtp.sendmail("me@example.org", ["carol@example.org"], body)
    except smtplib.SMTPRecipientsRefused:
        pass
    else:
        sys.exit("the relay attempt from 127.0.0.2 was accepted")
EOF

cat >"$work/prometheus.yml" <<EOF
global:
  scrape_interval: 2s
scrape_configs:
  - job_name: wsmtp
    static_configs:
      - targets: ["127.0.0.1:$admin_port"]
EOF
prometheus --config.file="$work/prometheus.yml" --storage.tsdb.path="$work/prometheus" \
    --web.listen-address="127.0.0.1:$prometheus_port" 2>"$work/prometheus.log" &
pids+=($!)
wait_for "Prometheus" "http://127.0.0.1:$prometheus_port/-/ready"
# Enough scrapes for rate() over one minute to have several samples.
sleep 20

passed=0
failed=0
while IFS= read -r expression; do
    query=${expression//\$__rate_interval/1m}
    query=${query//\$instance/.*}
    answer=$(curl -fsS "http://127.0.0.1:$prometheus_port/api/v1/query" --data-urlencode "query=$query" || echo '{}')
    count=$(jq '.data.result | length' <<<"$answer" 2>/dev/null || echo 0)
    if [ "$(jq -r .status <<<"$answer" 2>/dev/null)" = success ] && [ "$count" -gt 0 ]; then
        passed=$((passed + 1))
    else
        failed=$((failed + 1))
        echo "EMPTY OR FAILED: $query"
        echo "  $answer"
    fi
done < <(jq -r '.panels[] | .targets[]?.expr' "$root/grafana/wsmtp.json")
echo "dashboard queries: $passed passed, $failed failed"
[ "$failed" -eq 0 ]
