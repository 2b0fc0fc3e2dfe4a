#!/usr/bin/env bash
#
# Measures wsmtp's pass-through rate with the relay policy off and on:
# smtp-source sends 4 KiB messages to rcpt@example.net over 50 parallel
# sessions, and wsmtp relays each one live to smtp-sink.
#
#   off: no rules, no lists, no rate limits (the default class only counts
#        open connections).
#   on:  the 10,000 rules and the 1,000,000-entry network list that
#        bench/policy.rs writes, and every rate limit of the default class
#        set high enough never to refuse anything, so each connection,
#        message and recipient is counted. (The rules name a class
#        `customers`, which must exist.) The client (127.0.0.1) is in no
#        rule and not in the list, so every recipient walks all 10,000
#        rules: the slowest case.
#
# Each round runs both, off first, with a fresh wsmtp process each; the
# figures are the medians of the rounds. Prints a Markdown table.
#
# Usage: bench/policy.sh, as root (smtp-sink drops to the postfix user).
# Build first: cargo build --release --example bench_policy --bin wsmtp.
# Settings from the environment:
#   MESSAGES=20000   messages per run
#   RUNS=3           rounds
#   SESSIONS=50      parallel smtp-source sessions
#   WSMTP_PORT=24625 SINK_PORT=24626   (both on 127.0.0.1)
#   WSMTP_BIN=target/release/wsmtp
#   POLICY_BIN=target/release/examples/bench_policy
#   DECISIONS=20000  decisions the policy example times
#   KEEP_WORK=0      1 keeps the work directory (configs, logs)
#
# Everything listens on and connects to 127.0.0.1 only.

set -euo pipefail

MESSAGES=${MESSAGES:-20000}
RUNS=${RUNS:-3}
SESSIONS=${SESSIONS:-50}
WSMTP_PORT=${WSMTP_PORT:-24625}
SINK_PORT=${SINK_PORT:-24626}
WSMTP_BIN=${WSMTP_BIN:-target/release/wsmtp}
POLICY_BIN=${POLICY_BIN:-target/release/examples/bench_policy}
KEEP_WORK=${KEEP_WORK:-0}

WORK=$(mktemp -d /tmp/wsmtp-policy-bench.XXXXXX)
chmod 755 "$WORK"
SINK_PID=""
WSMTP_PID=""

log() { printf '%s %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

cleanup() {
    local pid
    for pid in $WSMTP_PID $SINK_PID; do
        kill "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [[ $KEEP_WORK == 1 ]]; then
        log "work directory kept: $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT

for tool in smtp-source smtp-sink awk; do
    command -v "$tool" >/dev/null || die "$tool is missing (smtp-source and smtp-sink come with Postfix)"
done
[[ -x $WSMTP_BIN ]] || die "$WSMTP_BIN is missing; run cargo build --release"
[[ -x $POLICY_BIN ]] || die "$POLICY_BIN is missing; run cargo build --release --example bench_policy"

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_for_port() {
    local port=$1 pid=$2 i
    for ((i = 0; i < 600; i++)); do
        port_open "$port" && return 0
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

# The rules and the list, written by the policy benchmark (which also
# prints its decision and load figures into policy-example.txt).
log "writing 10,000 rules and 1,000,000 list entries"
POLICY_DIR="$WORK/policy" DECISIONS="${DECISIONS:-20000}" "$POLICY_BIN" >"$WORK/policy-example.txt"

common_config() {
    cat <<EOF
hostname: wsmtp-bench.localdomain
listeners:
  - address: 127.0.0.1:$WSMTP_PORT
limits:
  max_connections: 1000
  max_connections_per_ip: 1000
relay:
  relay_domains:
    - domain: example.net
      group: sink
downstream_groups:
  - name: sink
    hosts: [127.0.0.1:$SINK_PORT]
log:
  format: text
  filter: info
EOF
}

mkdir -p "$WORK/off" "$WORK/on"
common_config >"$WORK/off/config.yaml"
{
    common_config
    cat <<EOF
rules: $WORK/policy/rules
lists:
  - {name: big, kind: networks, file: $WORK/policy/lists/big.cidr}
rate_limits:
  default:
    connections_per_ip: 10000000/1m
    messages_per_ip: 10000000/1h
    recipients_per_ip: 10000000/1h
    messages_per_sender: 10000000/1h
    recipients_per_sender: 10000000/1h
  customers:
    messages_per_ip: 10000000/1h
EOF
} >"$WORK/on/config.yaml"
for mode in off on; do
    "$WSMTP_BIN" check --config "$WORK/$mode/config.yaml" >&2 || die "invalid $mode configuration"
done

smtp-sink -u postfix -c -4 -m 1024 "127.0.0.1:$SINK_PORT" 1024 >"$WORK/smtp-sink.log" 2>&1 &
SINK_PID=$!
wait_for_port "$SINK_PORT" "$SINK_PID" || die "smtp-sink did not start"

# CPU seconds (user + system) of process $1.
cpu_seconds() {
    awk -v ticks="$(getconf CLK_TCK)" '{ sub(/.*\) /, ""); split($0, f, " "); printf "%.2f", (f[12] + f[13]) / ticks }' "/proc/$1/stat"
}

declare -A RATE CPU HWM
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
for ((run = 1; run <= RUNS; run++)); do
    for mode in off on; do
        log "run $run, policy $mode"
        "$WSMTP_BIN" serve --roles listener --config "$WORK/$mode/config.yaml" \
            2>"$WORK/wsmtp-$mode-$run.log" &
        WSMTP_PID=$!
        wait_for_port "$WSMTP_PORT" "$WSMTP_PID" || die "wsmtp did not start; see $WORK/wsmtp-$mode-$run.log"
        start=$EPOCHREALTIME
        smtp-source -4 -s "$SESSIONS" -m "$MESSAGES" -l 4096 \
            -f sender@example.org -t rcpt@example.net "127.0.0.1:$WSMTP_PORT" \
            >>"$WORK/smtp-source.log" 2>&1 || die "smtp-source failed"
        end=$EPOCHREALTIME
        CPU[$mode,$run]=$(cpu_seconds "$WSMTP_PID")
        HWM[$mode,$run]=$(awk '/^VmHWM:/ { printf "%.0f", $2 / 1024 }' "/proc/$WSMTP_PID/status")
        kill "$WSMTP_PID"
        wait "$WSMTP_PID" || true
        WSMTP_PID=""
        passed=$(grep -c 'passed through' "$WORK/wsmtp-$mode-$run.log" || true)
        [[ $passed == "$MESSAGES" ]] || die "wsmtp passed $passed of $MESSAGES messages in run $run ($mode)"
        RATE[$mode,$run]=$(awk -v n="$MESSAGES" -v a="$start" -v b="$end" 'BEGIN { printf "%.1f", n / (b - a) }')
        log "  ${RATE[$mode,$run]} msg/s, ${CPU[$mode,$run]} CPU s, VmHWM ${HWM[$mode,$run]} MiB"
    done
done
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

median() { printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

echo "Policy benchmark: $MESSAGES messages of 4 KiB per run, $SESSIONS sessions, $RUNS rounds (medians)."
echo "Load average at start $LOAD_START, at end $LOAD_END."
echo
echo "| policy | messages/s | wsmtp CPU ms per message | VmHWM MiB | runs (messages/s) |"
echo "| --- | --- | --- | --- | --- |"
for mode in off on; do
    rates=() cpus=() hwms=()
    for ((run = 1; run <= RUNS; run++)); do
        rates+=("${RATE[$mode,$run]}")
        cpus+=("$(awk -v c="${CPU[$mode,$run]}" -v n="$MESSAGES" 'BEGIN { printf "%.3f", c * 1000 / n }')")
        hwms+=("${HWM[$mode,$run]}")
    done
    echo "| $mode | $(median "${rates[@]}") | $(median "${cpus[@]}") | $(median "${hwms[@]}") | ${rates[*]} |"
done
echo
echo "The policy example's own output:"
echo
echo '```'
cat "$WORK/policy-example.txt"
echo '```'
