#!/usr/bin/env bash
#
# Benchmarks wsmtp against Postfix on this machine, side by side in one run:
#
#   (a) pass-through rate: 4 KiB messages relayed to smtp-sink, with 1 and
#       with 10 recipients per message, 50 parallel sessions. wsmtp replies
#       250 only after the sink has, so its rate is smtp-source's elapsed
#       time. Postfix's rate is end to end: from the start of smtp-source
#       until its log shows every recipient as status=sent.
#   (b) spool rate: the same load for a local domain. wsmtp stores it in a
#       fresh PostgreSQL database (synchronous commit). Postfix puts it in
#       its hold queue, so it accepts and fsyncs the mail and does nothing
#       else, the same work wsmtp does.
#   (c) peak RSS (VmHWM) of a fresh wsmtp process passing one 4 KiB and one
#       100 MiB message through, plus the 100 MiB message's transfer time
#       through wsmtp and through Postfix.
#   (d) end to end delivery: the load of (a) and (b) for a local domain
#       whose catch-all account relays to the sink's group. wsmtp spools
#       every message in PostgreSQL, routes it and delivers it to the sink
#       with its delivery tier (all roles in one process). Postfix relays
#       the same load through its queue to the same sink. The rate runs from
#       the start of smtp-source until the sink has every message and the
#       queue is empty. Per-message latency percentiles (acceptance to
#       delivery) come from both servers' logs through bench/latency.py.
#
# Every figure is the median of RUNS runs. The results go to stdout and
# replace the text between the result markers in docs/benchmarks.md.
#
# Usage: bench/run.sh, as root. Settings come from the environment:
#   SECTIONS=abcd    the tests to run, e.g. SECTIONS=d for (d) alone. Only
#                    a run of all four writes docs/benchmarks.md, unless
#                    DOC is set explicitly.
#   MESSAGES=20000   messages per rate run
#   RUNS=3           runs per figure (the median is reported)
#   SESSIONS=50      parallel smtp-source sessions
#   WSMTP_PORT=24525 SINK_PORT=24526 POSTFIX_PORT=24527  (all on 127.0.0.1)
#   PG_URL=postgres://postgres@127.0.0.1:5432   PostgreSQL, without database
#   BENCH_DB=wsmtp_bench   dropped and recreated for every spool run
#   WSMTP_BIN=target/release/wsmtp   (build it first: cargo build --release)
#   WSMTP_COMMIT=     commit WSMTP_BIN was built from, for the report;
#                     empty reports the repository's HEAD
#   DOC=docs/benchmarks.md   where results are written; DOC= skips it
#   STEP_TIMEOUT=900  seconds allowed for each load step
#   POSTFIX_CONCURRENCY=20  Postfix's parallel deliveries to the sink
#                     (default_destination_concurrency_limit, default 20)
#   KEEP_WORK=0       1 keeps the work directory (logs, configs) at exit
#   E2E_EXTRA_CONFIG= a YAML file appended to the configuration of test (d),
#                     e.g. with a router: or delivery: section, for
#                     experiments. Empty keeps wsmtp's defaults there.
#
# Requirements: bash 5, psql, PostgreSQL 13 or newer, Postfix 3.4 or newer
# with smtp-source and smtp-sink, and python3 for (d). On Debian and Ubuntu the script
# installs Postfix with apt-get when it is missing, without letting it
# configure or keep running a system instance.
#
# Safety: Postfix runs as a separate instance with its own configuration,
# queue and log (postfix -c DIR), generated from bench/postfix/. The system
# instance in /etc/postfix is not changed. Before starting the instance the
# script checks that its only inet service is on 127.0.0.1, that it relays
# only to the sink on 127.0.0.1 and that DNS lookups are disabled. Every
# process the script starts is stopped at exit.

set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH_DIR=$ROOT/bench

SECTIONS=${SECTIONS:-abcd}
MESSAGES=${MESSAGES:-20000}
RUNS=${RUNS:-3}
SESSIONS=${SESSIONS:-50}
MESSAGE_SIZE=4096
BIG_MESSAGE_SIZE=104857600
WSMTP_PORT=${WSMTP_PORT:-24525}
SINK_PORT=${SINK_PORT:-24526}
POSTFIX_PORT=${POSTFIX_PORT:-24527}
PG_URL=${PG_URL:-postgres://postgres@127.0.0.1:5432}
BENCH_DB=${BENCH_DB:-wsmtp_bench}
WSMTP_BIN=${WSMTP_BIN:-$ROOT/target/release/wsmtp}
# A run of some sections alone would replace the results of the others in
# the document, so it writes there only when DOC is set explicitly.
if [[ -z ${DOC+set} && $SECTIONS != abcd ]]; then
    DOC=""
    DOC_SKIPPED=1
else
    DOC=${DOC-$ROOT/docs/benchmarks.md}
    DOC_SKIPPED=0
fi
STEP_TIMEOUT=${STEP_TIMEOUT:-900}
# Postfix's parallel deliveries to the sink; 20 is Postfix's default.
POSTFIX_CONCURRENCY=${POSTFIX_CONCURRENCY:-20}
KEEP_WORK=${KEEP_WORK:-0}
E2E_EXTRA_CONFIG=${E2E_EXTRA_CONFIG:-}
WSMTP_COMMIT=${WSMTP_COMMIT:-}

# The 100 MiB memory test must stay within this much of the 4 KiB one.
RSS_TARGET_KIB=32768
SENDER=bench@example.org
RELAY_DOMAIN=example.net
LOCAL_DOMAIN=example.com
# Downstream group of the sink in bench/wsmtp.yaml.in.
SINK_GROUP=sink

POSTFIX_INSTANCE=postfix-wsmtp-bench
POSTFIX_QUEUE=/var/spool/$POSTFIX_INSTANCE
POSTFIX_DATA=/var/lib/$POSTFIX_INSTANCE
# Postfix accepts a maillog_file only below maillog_file_prefixes, which
# default to /var and /dev/stdout.
MAILLOG=/var/log/$POSTFIX_INSTANCE.log

WORK=""
# Configuration and serve options of the next wsmtp process. The end to end
# test (d) overrides both with local variables.
WSMTP_CONFIG=""
WSMTP_SERVE_OPTIONS=()
WSMTP_PID=""
SINK_PID=""
TAIL_PID=""
GREP_PID=""
POSTFIX_STARTED=0
# Set once this run has created the Postfix queue, data directory and log,
# so cleanup never deletes those of an instance that another run started.
POSTFIX_FILES_OWNED=0

# Counts runs that failed or were discarded; a run with failures keeps the
# work directory for inspection.
FAILED_RUNS=0

log() {
    printf '%s %s\n' "$(date +%H:%M:%S)" "$*" >&2
}

die() {
    log "error: $*"
    exit 1
}

# ---------------------------------------------------------------- cleanup

# Sends SIGTERM to one process, waits up to 40 s (wsmtp's shutdown grace is
# 30 s), then sends SIGKILL.
stop_pid() {
    local pid=$1
    kill -0 "$pid" 2>/dev/null || return 0
    kill -TERM "$pid" 2>/dev/null || true
    local i
    for ((i = 0; i < 400; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "process $pid ignored SIGTERM; sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
}

postfix_master_pid() {
    local file=$POSTFIX_QUEUE/pid/master.pid
    [[ -r $file ]] || return 1
    local pid
    pid=$(tr -d ' \n' <"$file")
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 1
    echo "$pid"
}

stop_postfix() {
    [[ $POSTFIX_STARTED == 1 ]] || return 0
    local master
    master=$(postfix_master_pid) || master=""
    postfix -c "$WORK/postfix" stop >&2 || true
    if [[ -n $master ]]; then
        local i
        for ((i = 0; i < 200; i++)); do
            kill -0 "$master" 2>/dev/null || break
            sleep 0.1
        done
    fi
    POSTFIX_STARTED=0
}

drop_bench_db() {
    PGOPTIONS="-c client_min_messages=warning" psql "$PG_URL/postgres" -qX -v ON_ERROR_STOP=1 \
        -c "DROP DATABASE IF EXISTS \"$BENCH_DB\" WITH (FORCE)" >/dev/null
}

cleanup() {
    local status=$?
    set +e
    [[ -n $TAIL_PID ]] && stop_pid "$TAIL_PID"
    [[ -n $GREP_PID ]] && stop_pid "$GREP_PID"
    [[ -n $WSMTP_PID ]] && stop_pid "$WSMTP_PID"
    stop_postfix
    [[ -n $SINK_PID ]] && stop_pid "$SINK_PID"
    if [[ -n $WORK ]]; then
        drop_bench_db 2>/dev/null
        if [[ $POSTFIX_FILES_OWNED == 1 ]]; then
            rm -rf "$POSTFIX_QUEUE" "$POSTFIX_DATA"
            [[ -f $MAILLOG ]] && mv "$MAILLOG" "$WORK/postfix-maillog"
        fi
        if [[ $KEEP_WORK == 1 || $status != 0 || $FAILED_RUNS != 0 ]]; then
            log "logs and configurations kept in $WORK"
        else
            rm -rf "$WORK"
        fi
    fi
    exit "$status"
}

# ---------------------------------------------------------------- setup

require_tools() {
    [[ $EUID == 0 ]] || die "run as root: Postfix needs it to start an instance"
    ((BASH_VERSINFO[0] >= 5)) || die "bash 5 or newer is required (for EPOCHREALTIME)"
    command -v psql >/dev/null || die "psql not found; install the PostgreSQL client"
    [[ -x $WSMTP_BIN ]] || die "$WSMTP_BIN not found; run cargo build --release in $ROOT"

    if ! command -v postfix >/dev/null || ! command -v smtp-source >/dev/null; then
        command -v apt-get >/dev/null || die "Postfix (with smtp-source and smtp-sink) is missing; install it"
        log "installing Postfix with apt-get"
        # "No configuration" leaves /etc/postfix/main.cf out, so the package
        # does not set up a system instance that listens on port 25.
        echo "postfix postfix/main_mailer_type select No configuration" | debconf-set-selections
        DEBIAN_FRONTEND=noninteractive apt-get install -y postfix >&2
        # Stop a system instance in case the package started one anyway.
        postfix status >/dev/null 2>&1 && postfix stop >&2
        if command -v systemctl >/dev/null; then
            systemctl stop postfix >/dev/null 2>&1 || true
        fi
    fi
    local tool
    for tool in postfix postconf postsuper smtp-source smtp-sink timeout tail grep awk stat; do
        command -v "$tool" >/dev/null || die "$tool not found"
    done
}

# Returns success when something accepts TCP connections on 127.0.0.1:$1.
port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

wait_for_port() {
    local port=$1 pid=$2 i
    for ((i = 0; i < 300; i++)); do
        port_open "$port" && return 0
        kill -0 "$pid" 2>/dev/null || return 1
        sleep 0.1
    done
    return 1
}

# Fills in @NAME@ placeholders of template $1 and writes the result to $2.
# @LOG_FORMAT@ becomes $3, text by default.
render() {
    sed -e "s|@WSMTP_PORT@|$WSMTP_PORT|g" \
        -e "s|@LOG_FORMAT@|${3:-text}|g" \
        -e "s|@SINK_PORT@|$SINK_PORT|g" \
        -e "s|@POSTFIX_PORT@|$POSTFIX_PORT|g" \
        -e "s|@DATABASE_URL@|$PG_URL/$BENCH_DB|g" \
        -e "s|@QUEUE_DIR@|$POSTFIX_QUEUE|g" \
        -e "s|@DATA_DIR@|$POSTFIX_DATA|g" \
        -e "s|@MAILLOG@|$MAILLOG|g" \
        -e "s|@POSTFIX_CONCURRENCY@|$POSTFIX_CONCURRENCY|g" \
        "$1" >"$2"
}

# The sink counts received messages, that is SMTP transactions (-c). After
# every session and every final dot it writes "sess=N quit=N mesg=N" and a
# carriage return to its output.
start_sink() {
    local -a command=(smtp-sink -u postfix -c -4 -m 1024 "127.0.0.1:$SINK_PORT" 1024)
    note_command "${command[*]}"
    "${command[@]}" >"$WORK/smtp-sink.log" 2>&1 &
    SINK_PID=$!
    wait_for_port "$SINK_PORT" "$SINK_PID" || die "smtp-sink did not start; see $WORK/smtp-sink.log"
}

# Prints the number of messages the sink has received since it started.
sink_messages() {
    local tail
    # The "." keeps a trailing carriage return in the command substitution.
    tail=$(tail -c 256 "$WORK/smtp-sink.log"; echo .)
    # Everything after the last carriage return is a counter line that is
    # still being written, or the "." alone.
    tail=${tail%$'\r'*}
    tail=${tail##*$'\r'}
    if [[ $tail =~ mesg=([0-9]+)$ ]]; then
        echo "${BASH_REMATCH[1]}"
    else
        echo 0
    fi
}

# Exits unless Postfix parameter $1 of the bench instance has the value $2.
expect_setting() {
    local actual
    actual=$(postconf -c "$WORK/postfix" -h "$1")
    [[ $actual == "$2" ]] || die "unsafe Postfix setting $1 = '$actual' (expected '$2')"
}

# Exits unless the Postfix instance's configuration is the safe loopback-only
# one: one inet service on 127.0.0.1, no DNS, relaying only to the sink, no
# local delivery.
check_postfix_config() {
    local conf=$WORK/postfix
    postconf -c "$conf" -n >"$WORK/postconf-n.txt"
    postconf -c "$conf" -M >"$WORK/postconf-M.txt"

    expect_setting inet_interfaces loopback-only
    expect_setting inet_protocols ipv4
    expect_setting mynetworks 127.0.0.0/8
    expect_setting relayhost "[127.0.0.1]:$SINK_PORT"
    expect_setting default_transport smtp
    expect_setting relay_transport smtp
    expect_setting smtp_dns_support_level disabled
    expect_setting smtp_host_lookup native
    expect_setting smtp_bind_address 127.0.0.1
    expect_setting mydestination ""
    expect_setting local_transport "error:local delivery disabled"
    expect_setting smtpd_relay_restrictions "permit_mynetworks, reject"

    local inet_services
    inet_services=$(awk '$2 == "inet" { print $1 }' "$WORK/postconf-M.txt")
    [[ $inet_services == "127.0.0.1:$POSTFIX_PORT" ]] ||
        die "Postfix must have exactly one inet service, on 127.0.0.1:$POSTFIX_PORT; found: $inet_services"
    log "Postfix configuration checked: one inet service on 127.0.0.1:$POSTFIX_PORT, relayhost [127.0.0.1]:$SINK_PORT, no DNS"
}

start_postfix() {
    local conf=$WORK/postfix
    mkdir -p "$conf"
    render "$BENCH_DIR/postfix/main.cf.in" "$conf/main.cf"
    render "$BENCH_DIR/postfix/master.cf.in" "$conf/master.cf"
    check_postfix_config

    if postfix_master_pid >/dev/null; then
        die "a Postfix instance already uses $POSTFIX_QUEUE; stop it with postfix -c <its config directory> stop"
    fi
    POSTFIX_FILES_OWNED=1
    rm -rf "$POSTFIX_QUEUE" "$POSTFIX_DATA"
    install -d -m 755 -o root "$POSTFIX_QUEUE"
    install -d -m 700 -o postfix "$POSTFIX_DATA"
    : >"$MAILLOG"

    postfix -c "$conf" check >&2 || die "postfix check failed; see $WORK/postfix-maillog"
    note_command "postfix -c WORK/postfix start   # WORK is the script's work directory"
    POSTFIX_STARTED=1
    postfix -c "$conf" start >&2 || die "postfix start failed; see $WORK/postfix-maillog"
    local master
    master=$(postfix_master_pid) || die "Postfix master is not running; see $WORK/postfix-maillog"
    wait_for_port "$POSTFIX_PORT" "$master" || die "Postfix does not listen on 127.0.0.1:$POSTFIX_PORT"
}

start_wsmtp() {
    local label=$1
    local command="DATABASE_URL=$PG_URL/$BENCH_DB wsmtp serve --config $(basename "$WSMTP_CONFIG")"
    ((${#WSMTP_SERVE_OPTIONS[@]} == 0)) || command+=" ${WSMTP_SERVE_OPTIONS[*]}"
    note_command "$command"
    env -u RUST_LOG DATABASE_URL="$PG_URL/$BENCH_DB" \
        "$WORK/wsmtp" serve --config "$WSMTP_CONFIG" "${WSMTP_SERVE_OPTIONS[@]}" 2>"$WORK/wsmtp-$label.log" &
    WSMTP_PID=$!
    wait_for_port "$WSMTP_PORT" "$WSMTP_PID" || die "wsmtp did not start; see $WORK/wsmtp-$label.log"
}

stop_wsmtp() {
    [[ -n $WSMTP_PID ]] && stop_pid "$WSMTP_PID"
    WSMTP_PID=""
}

# Drops the bench database and creates it again with the queue schema, so
# every spool run starts from empty tables. With the argument "relay" the
# catch-all account sends its mail to the sink's group instead of a Maildir.
fresh_bench_db() {
    local mode=${1:-maildir}
    drop_bench_db
    env -u RUST_LOG DATABASE_URL="$PG_URL/$BENCH_DB" \
        "$WORK/wsmtp" migrate --config "$WSMTP_CONFIG" >>"$WORK/migrate.log" 2>&1 ||
        die "wsmtp migrate failed; see $WORK/migrate.log"
    # Builds with an account directory accept only addresses it contains at
    # a local domain, so one account takes the catch-all @example.com. The
    # listener alone never delivers to its Maildir.
    local -a mailbox=(--maildir "$WORK/maildir")
    [[ $mode == relay ]] && mailbox=(--relay-group "$SINK_GROUP")
    if "$WORK/wsmtp" accounts --help >/dev/null 2>&1; then
        env -u RUST_LOG DATABASE_URL="$PG_URL/$BENCH_DB" \
            "$WORK/wsmtp" accounts --config "$WSMTP_CONFIG" \
            add bench --address "@$LOCAL_DOMAIN" "${mailbox[@]}" >>"$WORK/migrate.log" 2>&1 ||
            die "adding the catch-all account for $LOCAL_DOMAIN failed; see $WORK/migrate.log"
    elif [[ $mode == relay ]]; then
        die "this wsmtp build has no account directory, which the end to end test needs"
    fi
}

bench_sql() {
    psql "$PG_URL/$BENCH_DB" -qXAt -v ON_ERROR_STOP=1 -c "$1"
}

# ---------------------------------------------------------------- measuring

COMMANDS_FILE=""

# Records a command line once, for the report.
note_command() {
    grep -qxF -- "$1" "$COMMANDS_FILE" 2>/dev/null || echo "$1" >>"$COMMANDS_FILE"
}

# Appends one measurement: key, run number, value.
record() {
    printf '%s\t%s\t%s\n' "$1" "$2" "$3" >>"$WORK/results.tsv"
}

# Prints the sum of utime and stime (and of reaped children) of the given
# PIDs, in clock ticks. Processes that exited meanwhile are skipped.
cpu_ticks() {
    local pid
    for pid in "$@"; do
        cat "/proc/$pid/stat" 2>/dev/null || true
    done | sed 's/^.*) //' | awk '{ sum += $12 + $13 + $14 + $15 } END { print sum + 0 }'
}

# Prints the CPU ticks of the Postfix instance: the master, its live children, and (through
# the master's cutime and cstime) every child that has exited.
postfix_cpu_ticks() {
    local master
    master=$(postfix_master_pid) || { echo 0; return; }
    # shellcheck disable=SC2046
    cpu_ticks "$master" $(ps -o pid= --ppid "$master")
}

# Prints the CPU ticks of the PostgreSQL backends serving the bench database.
pg_backend_cpu_ticks() {
    # shellcheck disable=SC2046
    cpu_ticks $(pgrep -f "^postgres: .* $BENCH_DB " || true)
}

ticks_to_ms_per_message() {
    awk -v ticks="$1" -v hz="$CLK_TCK" -v n="$2" 'BEGIN { printf "%.3f", ticks * 1000 / hz / n }'
}

vmhwm_kib() {
    awk '/^VmHWM:/ { print $2 }' "/proc/$1/status"
}

SOURCE_START=""
SOURCE_END=""

# Runs smtp-source against 127.0.0.1:$1 and sets SOURCE_START and
# SOURCE_END (seconds since the epoch). Arguments: port, messages, sessions,
# message size, recipients per message, recipient domain.
run_source() {
    local port=$1 count=$2 sessions=$3 size=$4 recipients=$5 domain=$6
    local -a command=(smtp-source -4 -s "$sessions" -m "$count" -l "$size")
    ((recipients > 1)) && command+=(-r "$recipients")
    command+=(-f "$SENDER" -t "rcpt@$domain" "127.0.0.1:$port")
    note_command "${command[*]}"
    SOURCE_START=$EPOCHREALTIME
    if ! timeout "$STEP_TIMEOUT" "${command[@]}" >>"$WORK/smtp-source.log" 2>&1; then
        log "smtp-source failed or timed out: ${command[*]} (see $WORK/smtp-source.log)"
        FAILED_RUNS=$((FAILED_RUNS + 1))
        return 1
    fi
    SOURCE_END=$EPOCHREALTIME
}

elapsed() {
    awk -v a="$1" -v b="$2" 'BEGIN { printf "%.3f", b - a }'
}

rate() {
    awk -v n="$1" -v s="$2" 'BEGIN { printf "%.1f", n / s }'
}

# Measures wsmtp's pass-through rate; a fresh process relays to the sink.
wsmtp_passthrough_run() {
    local run=$1 recipients=$2 key="a.rcpt$2"
    start_wsmtp "pass-r$recipients-$run"
    local cpu_before=$(cpu_ticks "$WSMTP_PID")
    if run_source "$WSMTP_PORT" "$MESSAGES" "$SESSIONS" "$MESSAGE_SIZE" "$recipients" "$RELAY_DOMAIN"; then
        local cpu_after=$(cpu_ticks "$WSMTP_PID")
        local seconds=$(elapsed "$SOURCE_START" "$SOURCE_END")
        local passed
        passed=$(grep -c 'passed through' "$WORK/wsmtp-pass-r$recipients-$run.log" || true)
        if [[ $passed == "$MESSAGES" ]]; then
            record "$key.wsmtp.rate" "$run" "$(rate "$MESSAGES" "$seconds")"
            record "$key.wsmtp.cpu" "$run" "$(ticks_to_ms_per_message $((cpu_after - cpu_before)) "$MESSAGES")"
            log "wsmtp pass-through, $recipients rcpt, run $run: $seconds s, $(rate "$MESSAGES" "$seconds") msg/s"
        else
            log "wsmtp logged $passed of $MESSAGES messages as passed through; run $run discarded"
            FAILED_RUNS=$((FAILED_RUNS + 1))
        fi
    fi
    stop_wsmtp
}

# Measures wsmtp's spool rate with a fresh database and a fresh process.
wsmtp_spool_run() {
    local run=$1 recipients=$2 key="b.rcpt$2"
    fresh_bench_db
    start_wsmtp "spool-r$recipients-$run"
    local cpu_before=$(cpu_ticks "$WSMTP_PID") pg_before=$(pg_backend_cpu_ticks)
    if run_source "$WSMTP_PORT" "$MESSAGES" "$SESSIONS" "$MESSAGE_SIZE" "$recipients" "$LOCAL_DOMAIN"; then
        local cpu_after=$(cpu_ticks "$WSMTP_PID") pg_after=$(pg_backend_cpu_ticks)
        local seconds=$(elapsed "$SOURCE_START" "$SOURCE_END")
        local ready stored_recipients
        ready=$(bench_sql "SELECT count(*) FROM messages WHERE state = 'ready'")
        stored_recipients=$(bench_sql "SELECT count(*) FROM recipients")
        if [[ $ready == "$MESSAGES" && $stored_recipients == $((MESSAGES * recipients)) ]]; then
            record "$key.wsmtp.rate" "$run" "$(rate "$MESSAGES" "$seconds")"
            record "$key.wsmtp.cpu" "$run" "$(ticks_to_ms_per_message $((cpu_after - cpu_before)) "$MESSAGES")"
            record "$key.postgres.cpu" "$run" "$(ticks_to_ms_per_message $((pg_after - pg_before)) "$MESSAGES")"
            log "wsmtp spool, $recipients rcpt, run $run: $seconds s, $(rate "$MESSAGES" "$seconds") msg/s"
        else
            log "queue contains $ready ready messages and $stored_recipients recipients, expected $MESSAGES and $((MESSAGES * recipients)); run $run discarded"
            FAILED_RUNS=$((FAILED_RUNS + 1))
        fi
    fi
    stop_wsmtp
}

postfix_queue_files() {
    find "$POSTFIX_QUEUE/maildrop" "$POSTFIX_QUEUE/incoming" "$POSTFIX_QUEUE/active" \
        "$POSTFIX_QUEUE/deferred" "$POSTFIX_QUEUE/hold" -type f 2>/dev/null | wc -l
}

# Deletes held mail from the previous hold run and waits until the queue is
# empty.
empty_postfix_queue() {
    postsuper -c "$WORK/postfix" -d ALL >/dev/null 2>&1 || true
    local i
    for ((i = 0; i < 300; i++)); do
        [[ $(postfix_queue_files) == 0 ]] && return 0
        sleep 0.1
    done
    die "the Postfix queue did not become empty"
}

# Measures Postfix relaying to the sink. The rate is end to end: from the
# start of smtp-source until the log contains status=sent for every
# recipient. A FIFO feeds the new log lines to grep -m, which exits at the
# last expected line.
# Arguments: run, recipients, messages, sessions, size, result key, and
# optionally "latency" to record the latency percentiles of the run too.
postfix_relay_run() {
    local run=$1 recipients=$2 count=$3 sessions=$4 size=$5 key=$6 latency=${7:-}
    local expected=$((count * recipients))
    empty_postfix_queue
    [[ -n $latency ]] && record "$key.postfix.load" "$run" "$(load_1min)"

    local offset fifo=$WORK/maillog.fifo
    offset=$(stat -c %s "$MAILLOG")
    rm -f "$fifo"
    mkfifo "$fifo"
    tail -c +$((offset + 1)) -F "$MAILLOG" >"$fifo" 2>/dev/null &
    TAIL_PID=$!
    # GNU grep 3.8 (Debian 12) does not exit after -m matches when its output
    # is /dev/null, so the count goes to a file.
    timeout "$STEP_TIMEOUT" grep -c -m "$expected" -F 'status=sent' <"$fifo" >"$WORK/sent-count" &
    GREP_PID=$!

    local cpu_before=$(postfix_cpu_ticks)
    local ok=0 delivered_at=""
    if run_source "$POSTFIX_PORT" "$count" "$sessions" "$size" "$recipients" "$RELAY_DOMAIN"; then
        if wait "$GREP_PID"; then
            delivered_at=$EPOCHREALTIME
            ok=1
        else
            log "Postfix did not log $expected deliveries within $STEP_TIMEOUT s"
            FAILED_RUNS=$((FAILED_RUNS + 1))
        fi
    fi
    stop_pid "$GREP_PID"
    stop_pid "$TAIL_PID"
    GREP_PID=""
    TAIL_PID=""
    rm -f "$fifo"
    ((ok)) || return 0
    local cpu_after=$(postfix_cpu_ticks)

    local failures
    failures=$(tail -c +$((offset + 1)) "$MAILLOG" |
        grep -cE 'status=(deferred|bounced|expired)|postfix/[a-z-]+\[[0-9]+\]: (error|fatal|panic):' || true)
    if [[ $failures != 0 ]]; then
        log "Postfix logged $failures deferrals, bounces or errors during run $run; run discarded (see $WORK/postfix-maillog)"
        FAILED_RUNS=$((FAILED_RUNS + 1))
        return 0
    fi
    if [[ -n $latency ]]; then
        tail -c +$((offset + 1)) "$MAILLOG" >"$WORK/maillog-$key-$run"
        if ! record_latency postfix "$key" "$run" "$WORK/maillog-$key-$run" "$count" "$expected"; then
            log "run $run discarded (see $WORK/maillog-$key-$run)"
            FAILED_RUNS=$((FAILED_RUNS + 1))
            return 0
        fi
    fi
    local accepted_seconds=$(elapsed "$SOURCE_START" "$SOURCE_END")
    local total_seconds=$(elapsed "$SOURCE_START" "$delivered_at")
    record "$key.postfix.rate" "$run" "$(rate "$count" "$total_seconds")"
    record "$key.postfix.accepted" "$run" "$(rate "$count" "$accepted_seconds")"
    record "$key.postfix.seconds" "$run" "$total_seconds"
    record "$key.postfix.cpu" "$run" "$(ticks_to_ms_per_message $((cpu_after - cpu_before)) "$count")"
    log "Postfix relay, $recipients rcpt, $count x $size B, run $run: accepted in $accepted_seconds s, delivered in $total_seconds s, $(rate "$count" "$total_seconds") msg/s end to end"
}

# Measures how fast Postfix accepts mail into its hold queue, from
# smtp-source's elapsed time.
postfix_hold_run() {
    local run=$1 recipients=$2 key="b.rcpt$2"
    empty_postfix_queue
    local cpu_before=$(postfix_cpu_ticks)
    run_source "$POSTFIX_PORT" "$MESSAGES" "$SESSIONS" "$MESSAGE_SIZE" "$recipients" "$LOCAL_DOMAIN" || return 0
    local cpu_after=$(postfix_cpu_ticks)
    local seconds=$(elapsed "$SOURCE_START" "$SOURCE_END")
    local held
    held=$(find "$POSTFIX_QUEUE/hold" -type f | wc -l)
    if [[ $held != "$MESSAGES" ]]; then
        log "Postfix hold queue has $held messages, expected $MESSAGES; run $run discarded"
        FAILED_RUNS=$((FAILED_RUNS + 1))
        return 0
    fi
    record "$key.postfix.rate" "$run" "$(rate "$MESSAGES" "$seconds")"
    record "$key.postfix.cpu" "$run" "$(ticks_to_ms_per_message $((cpu_after - cpu_before)) "$MESSAGES")"
    log "Postfix hold, $recipients rcpt, run $run: $seconds s, $(rate "$MESSAGES" "$seconds") msg/s"
}

load_1min() {
    cut -d ' ' -f 1 /proc/loadavg
}

# Runs bench/latency.py on a log and records the percentiles under
# $key.$kind.p50 and so on, in seconds. Arguments: wsmtp or postfix, key,
# run, log file, expected messages, expected delivered recipients. Returns
# failure, and records nothing, when the log does not show every message
# and recipient delivered.
record_latency() {
    local kind=$1 key=$2 run=$3 file=$4 messages=$5 recipients=$6
    local output
    if ! output=$(python3 "$BENCH_DIR/latency.py" "$kind" "$file" 2>>"$WORK/latency.log"); then
        log "bench/latency.py failed on $file; see $WORK/latency.log"
        return 1
    fi
    local count delivered p50 p90 p99 max incomplete undelivered duplicates
    IFS=$'\t' read -r count delivered p50 p90 p99 max incomplete undelivered duplicates <<<"$output"
    if [[ $count != "$messages" || $delivered != "$recipients" || $incomplete != 0 || $undelivered != 0 || $duplicates != 0 ]]; then
        log "$kind log of run $run shows $count messages and $delivered recipients delivered (expected $messages and $recipients), $incomplete incomplete messages, $undelivered other outcomes, $duplicates duplicate deliveries"
        return 1
    fi
    record "$key.$kind.p50" "$run" "$p50"
    record "$key.$kind.p90" "$run" "$p90"
    record "$key.$kind.p99" "$run" "$p99"
    record "$key.$kind.max" "$run" "$max"
    log "$kind latency, run $run: p50 $p50 s, p90 $p90 s, p99 $p99 s, max $max s"
}

# Records where wsmtp's end to end time went, from bench/latency.py
# wsmtp-stages. Arguments: key, run, log file.
record_stages() {
    local key=$1 run=$2 file=$3 output
    if ! output=$(python3 "$BENCH_DIR/latency.py" wsmtp-stages "$file" 2>>"$WORK/latency.log"); then
        log "bench/latency.py wsmtp-stages failed on $file; see $WORK/latency.log"
        return 0
    fi
    local spooled_end routed_end delivered_end wait_p50 wait_p99 deliver_p50 deliver_p99
    IFS=$'\t' read -r spooled_end routed_end delivered_end wait_p50 wait_p99 deliver_p50 deliver_p99 <<<"$output"
    record "$key.stages.spooled_end" "$run" "$spooled_end"
    record "$key.stages.routed_end" "$run" "$routed_end"
    record "$key.stages.delivered_end" "$run" "$delivered_end"
    record "$key.stages.wait_p50" "$run" "$wait_p50"
    record "$key.stages.wait_p99" "$run" "$wait_p99"
    record "$key.stages.deliver_p50" "$run" "$deliver_p50"
    record "$key.stages.deliver_p99" "$run" "$deliver_p99"
    log "wsmtp stages, run $run: last spooled at $spooled_end s, last routed at $routed_end s, last delivered at $delivered_end s; spooled to routed p50 $wait_p50 s, routed to delivered p50 $deliver_p50 s"
}

# Records the sequential scans of the deliveries table during a run. Call
# it after wsmtp has stopped. Backends report their statistics when they
# exit, so it first waits up to 5 s for wsmtp's connections to end.
# Arguments: key, run.
record_scans() {
    local scans i
    for ((i = 0; i < 50; i++)); do
        [[ $(bench_sql "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()") == 0 ]] && break
        sleep 0.1
    done
    scans=$(bench_sql "SELECT seq_scan || ' ' || seq_tup_read FROM pg_stat_user_tables WHERE relname = 'deliveries'") || return 0
    record "$1.deliveries.seq_scan" "$2" "${scans% *}"
    record "$1.deliveries.seq_tup_read" "$2" "${scans#* }"
}

DELIVERED_AT=""

# Waits until the sink has received $1 messages since it started and the
# wsmtp queue is empty, and sets DELIVERED_AT. The sink's counter is read
# every 100 ms, which costs a tail process each time, and the queue only
# once the counter has reached $1. So DELIVERED_AT is up to about 0.15 s
# late.
wait_for_delivery() {
    local target=$1 deadline=$((SECONDS + STEP_TIMEOUT))
    DELIVERED_AT=""
    while ((SECONDS < deadline)); do
        kill -0 "$WSMTP_PID" 2>/dev/null || return 1
        if (($(sink_messages) >= target)) && [[ $(bench_sql "SELECT count(*) FROM messages") == 0 ]]; then
            DELIVERED_AT=$EPOCHREALTIME
            return 0
        fi
        # A sleep ended by a signal must not end the script through set -e.
        sleep 0.1 || true
    done
    return 1
}

# Measures wsmtp end to end: a fresh database whose catch-all account at the
# local domain relays to the sink's group, and a fresh process with all
# roles. The rate runs from the start of smtp-source until the queue is
# empty and the sink has every message.
wsmtp_e2e_run() {
    local run=$1 recipients=$2 key="d.rcpt$2"
    local WSMTP_CONFIG=$WORK/wsmtp-e2e.yaml
    local -a WSMTP_SERVE_OPTIONS=()
    local label="e2e-r$recipients-$run"
    fresh_bench_db relay
    record "$key.wsmtp.load" "$run" "$(load_1min)"
    start_wsmtp "$label"

    local sink_before=$(sink_messages)
    local cpu_before=$(cpu_ticks "$WSMTP_PID") pg_before=$(pg_backend_cpu_ticks)
    if ! run_source "$WSMTP_PORT" "$MESSAGES" "$SESSIONS" "$MESSAGE_SIZE" "$recipients" "$LOCAL_DOMAIN"; then
        stop_wsmtp
        return 0
    fi
    if ! wait_for_delivery $((sink_before + MESSAGES)); then
        # The true rate of an unfinished run is below MESSAGES divided by the
        # time so far, which the report gives as an upper bound.
        local queued seconds_so_far
        queued=$(bench_sql "SELECT count(*) FROM messages")
        seconds_so_far=$(elapsed "$SOURCE_START" "$EPOCHREALTIME")
        stop_wsmtp
        record_scans "$key" "$run"
        record "$key.wsmtp.unfinished" "$run" "$queued"
        record "$key.wsmtp.accepted" "$run" "$(rate "$MESSAGES" "$(elapsed "$SOURCE_START" "$SOURCE_END")")"
        record "$key.wsmtp.bound" "$run" "$(rate "$MESSAGES" "$seconds_so_far")"
        log "wsmtp did not deliver $MESSAGES messages within $STEP_TIMEOUT s of the end of smtp-source: $queued messages still queued after $seconds_so_far s, the sink has $(($(sink_messages) - sink_before)); run $run discarded"
        FAILED_RUNS=$((FAILED_RUNS + 1))
        return 0
    fi
    local cpu_after=$(cpu_ticks "$WSMTP_PID") pg_after=$(pg_backend_cpu_ticks)
    stop_wsmtp
    record_scans "$key" "$run"

    # The sink counts transactions. wsmtp may send the recipients of one
    # message in several transactions, so the count may exceed MESSAGES.
    # The log check below finds recipients delivered twice.
    local received=$(($(sink_messages) - sink_before))
    if ((received < MESSAGES)); then
        log "the sink received $received messages from wsmtp, expected $MESSAGES; run $run discarded"
        FAILED_RUNS=$((FAILED_RUNS + 1))
        return 0
    fi
    if ! record_latency wsmtp "$key" "$run" "$WORK/wsmtp-$label.log" "$MESSAGES" $((MESSAGES * recipients)); then
        log "run $run discarded (see $WORK/wsmtp-$label.log)"
        FAILED_RUNS=$((FAILED_RUNS + 1))
        return 0
    fi
    record "$key.wsmtp.transactions" "$run" "$received"
    record_stages "$key" "$run" "$WORK/wsmtp-$label.log"

    local accepted_seconds=$(elapsed "$SOURCE_START" "$SOURCE_END")
    local total_seconds=$(elapsed "$SOURCE_START" "$DELIVERED_AT")
    record "$key.wsmtp.rate" "$run" "$(rate "$MESSAGES" "$total_seconds")"
    record "$key.wsmtp.accepted" "$run" "$(rate "$MESSAGES" "$accepted_seconds")"
    record "$key.wsmtp.seconds" "$run" "$total_seconds"
    record "$key.wsmtp.cpu" "$run" "$(ticks_to_ms_per_message $((cpu_after - cpu_before)) "$MESSAGES")"
    record "$key.postgres.cpu" "$run" "$(ticks_to_ms_per_message $((pg_after - pg_before)) "$MESSAGES")"
    log "wsmtp end to end, $recipients rcpt, run $run: accepted in $accepted_seconds s, delivered in $total_seconds s, $(rate "$MESSAGES" "$total_seconds") msg/s end to end"
}

# Sends one message through a fresh wsmtp process and records VmHWM after
# start and after the message. Arguments: run, size, domain, key.
wsmtp_memory_run() {
    local run=$1 size=$2 domain=$3 key=$4
    [[ $domain == "$LOCAL_DOMAIN" ]] && fresh_bench_db
    start_wsmtp "memory-$key-$run"
    local idle=$(vmhwm_kib "$WSMTP_PID")
    if run_source "$WSMTP_PORT" 1 1 "$size" 1 "$domain"; then
        local peak=$(vmhwm_kib "$WSMTP_PID")
        record "c.$key.idle" "$run" "$idle"
        record "c.$key.peak" "$run" "$peak"
        record "c.$key.seconds" "$run" "$(elapsed "$SOURCE_START" "$SOURCE_END")"
        log "wsmtp $key, run $run: VmHWM $idle KiB at start, $peak KiB after the message"
    fi
    stop_wsmtp
}

# ---------------------------------------------------------------- report

# Median of the values recorded under key $1, printed with format $2
# (default %.0f); empty when there are none.
median() {
    awk -F '\t' -v key="$1" '$1 == key { print $3 }' "$WORK/results.tsv" | sort -g |
        awk -v format="${2:-%.0f}" '{ v[NR] = $1 } END {
            if (NR == 0) exit
            m = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
            printf format "\n", m
        }'
}

# All values of a key in run order, comma-separated, printed with format
# $2 (default: rounded to integers).
values() {
    awk -F '\t' -v key="$1" -v format="${2:-%.0f}" '$1 == key { printf "%s" format, sep, $3; sep = ", " }' "$WORK/results.tsv"
}

count_values() {
    awk -F '\t' -v key="$1" '$1 == key { n++ } END { print n + 0 }' "$WORK/results.tsv"
}

runs_text() {
    if ((RUNS == 1)); then echo "1 run"; else echo "median of $RUNS runs"; fi
}

ratio() {
    [[ -n $1 && -n $2 ]] || { echo "n/a"; return; }
    awk -v a="$1" -v b="$2" 'BEGIN { printf "%.2f", a / b }'
}

# "met" when $1 >= $2, "not met" otherwise, "n/a" without a figure.
verdict_at_least() {
    [[ -n $1 && $1 != "n/a" ]] || { echo "n/a"; return; }
    awk -v a="$1" -v b="$2" 'BEGIN { print (a >= b) ? "met" : "not met" }'
}

or_na() {
    if [[ -n $1 ]]; then echo "$1"; else echo "n/a"; fi
}

or_none() {
    if [[ -n $1 ]]; then echo "$1"; else echo "no finished run"; fi
}

kib_to_mib() {
    [[ -n $1 ]] || { echo "n/a"; return; }
    awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'
}

# The load averages recorded at the start of each round, separated by "; ".
round_loads() {
    awk -F '\t' '$1 == "round.load" { printf "%s%s", sep, $3; sep = "; " }' "$WORK/results.tsv"
}

machine_report() {
    local cpu memory pg_version postfix_version commit
    cpu=$(awk -F ': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)
    memory=$(awk '/^MemTotal:/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)
    pg_version=$(psql "$PG_URL/postgres" -qXAt -c 'SHOW server_version')
    postfix_version=$(postconf -c "$WORK/postfix" -h mail_version)
    if [[ -n $WSMTP_COMMIT ]]; then
        commit="commit $WSMTP_COMMIT"
    else
        commit="the repository was at commit $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)"
        if [[ -n $(git --no-optional-locks -C "$ROOT" status --porcelain -- src migrations Cargo.toml Cargo.lock 2>/dev/null) ]]; then
            commit="$commit with uncommitted changes to the sources"
        fi
    fi

    local settings
    settings=$(psql "$PG_URL/postgres" -qXAt -F ' = ' -c "SELECT name, current_setting(name) FROM pg_settings
        WHERE name IN ('synchronous_commit', 'fsync', 'wal_sync_method', 'shared_buffers', 'max_connections')
        ORDER BY name" | paste -sd ',' | sed 's/,/, /g')

    cat <<EOF
- Date: $(date -u '+%Y-%m-%d %H:%M UTC')
- CPU: $(nproc) cores available, $cpu
- RAM: $memory
- Kernel: $(uname -r)
- PostgreSQL $pg_version ($settings)
- Postfix $postfix_version
- wsmtp: $commit; binary built $WSMTP_BUILT, SHA-256 $WSMTP_SHA256...
- Load average (1, 5, 15 min) at start: $LOAD_START; at end: $(cut -d ' ' -f 1-3 /proc/loadavg)
- Load average at the start of each round: $(round_loads)
EOF
}

# Prints the rate tables of tests (a) and (b).
rates_report() {
    local m=$MESSAGES
    local pass1 pass10 pf1 pf10 pfacc1 pfacc10 spool1 spool10 hold1 hold10
    pass1=$(median a.rcpt1.wsmtp.rate)
    pass10=$(median a.rcpt10.wsmtp.rate)
    pf1=$(median a.rcpt1.postfix.rate)
    pf10=$(median a.rcpt10.postfix.rate)
    pfacc1=$(median a.rcpt1.postfix.accepted)
    pfacc10=$(median a.rcpt10.postfix.accepted)
    spool1=$(median b.rcpt1.wsmtp.rate)
    spool10=$(median b.rcpt10.wsmtp.rate)
    hold1=$(median b.rcpt1.postfix.rate)
    hold10=$(median b.rcpt10.postfix.rate)
    local ratio_pass1 ratio_pass10 ratio_spool1 ratio_spool10
    ratio_pass1=$(ratio "$pass1" "$pf1")
    ratio_pass10=$(ratio "$pass10" "$pf10")
    ratio_spool1=$(ratio "$spool1" "$hold1")
    ratio_spool10=$(ratio "$spool10" "$hold10")

    echo "### Rates ($m messages of $MESSAGE_SIZE bytes, $SESSIONS sessions, $(runs_text))"
    echo
    echo "| Test | wsmtp msg/s | Postfix msg/s | wsmtp / Postfix | Target | Result |"
    echo "|---|---:|---:|---:|---|---|"
    if section a; then
        echo "| (a) pass-through, 1 recipient | $(or_na "$pass1") | $(or_na "$pf1") end to end | $ratio_pass1 | at least 2 | $(verdict_at_least "$ratio_pass1" 2) |"
        echo "| (a) pass-through, 10 recipients | $(or_na "$pass10") | $(or_na "$pf10") end to end | $ratio_pass10 | at least 2 | $(verdict_at_least "$ratio_pass10" 2) |"
    fi
    if section b; then
        echo "| (b) spool, 1 recipient | $(or_na "$spool1") | $(or_na "$hold1") into hold queue | $ratio_spool1 | at least 1 | $(verdict_at_least "$ratio_spool1" 1) |"
        echo "| (b) spool, 10 recipients | $(or_na "$spool10") | $(or_na "$hold10") into hold queue | $ratio_spool10 | at least 1 | $(verdict_at_least "$ratio_spool10" 1) |"
    fi
    echo
    if section a; then
        cat <<EOF
Postfix accepted the relayed load at $(or_na "$pfacc1") msg/s (1 recipient) and
$(or_na "$pfacc10") msg/s (10 recipients) while delivering it, measured by
smtp-source's elapsed time; the end to end figures above also include the
delivery of the queue to the sink.

EOF
    fi
    echo "Single runs, in run order (msg/s):"
    echo
    echo "| Series | Runs |"
    echo "|---|---|"
    if section a; then
        echo "| wsmtp pass-through, 1 rcpt | $(values a.rcpt1.wsmtp.rate) |"
        echo "| Postfix relay end to end, 1 rcpt | $(values a.rcpt1.postfix.rate) |"
        echo "| wsmtp pass-through, 10 rcpt | $(values a.rcpt10.wsmtp.rate) |"
        echo "| Postfix relay end to end, 10 rcpt | $(values a.rcpt10.postfix.rate) |"
    fi
    if section b; then
        echo "| wsmtp spool, 1 rcpt | $(values b.rcpt1.wsmtp.rate) |"
        echo "| Postfix hold, 1 rcpt | $(values b.rcpt1.postfix.rate) |"
        echo "| wsmtp spool, 10 rcpt | $(values b.rcpt10.wsmtp.rate) |"
        echo "| Postfix hold, 10 rcpt | $(values b.rcpt10.postfix.rate) |"
    fi
    echo
}

# Prints the median of a latency key in seconds with three decimals.
latency() {
    or_na "$(median "$1" %.3f)"
}

# Prints the tables of test (d).
e2e_report() {
    local e1 e10 pf1 pf10 ratio1 ratio10 shown1 shown10
    e1=$(median d.rcpt1.wsmtp.rate)
    e10=$(median d.rcpt10.wsmtp.rate)
    pf1=$(median d.rcpt1.postfix.rate)
    pf10=$(median d.rcpt10.postfix.rate)
    ratio1=$(ratio "$e1" "$pf1")
    ratio10=$(ratio "$e10" "$pf10")
    shown1=$(e2e_rate d.rcpt1 "$e1" "$pf1")
    shown10=$(e2e_rate d.rcpt10 "$e10" "$pf10")
    [[ -z $e1 && $shown1 == "<"* ]] && ratio1="< $(ratio "${shown1#< }" "$pf1")"
    [[ -z $e10 && $shown10 == "<"* ]] && ratio10="< $(ratio "${shown10#< }" "$pf10")"
    cat <<EOF
### End to end delivery ($MESSAGES messages of $MESSAGE_SIZE bytes, $SESSIONS sessions, $(runs_text))

From the start of smtp-source until the sink has received every message
(wsmtp: and its queue is empty; Postfix: and its log shows every recipient
sent).

| Test | wsmtp msg/s | Postfix msg/s | wsmtp / Postfix | Target | Result |
|---|---:|---:|---:|---|---|
| (d) spool, route, deliver; 1 recipient | $shown1 | $(or_na "$pf1") | $ratio1 | at least 1 | $(e2e_verdict "$ratio1") |
| (d) spool, route, deliver; 10 recipients | $shown10 | $(or_na "$pf10") | $ratio10 | at least 1 | $(e2e_verdict "$ratio10") |
$(unfinished_report)

Accepted (smtp-source's elapsed time), msg/s: wsmtp $(or_na "$(median d.rcpt1.wsmtp.accepted)")
(1 recipient) and $(or_na "$(median d.rcpt10.wsmtp.accepted)") (10 recipients); Postfix
$(or_na "$(median d.rcpt1.postfix.accepted)") and $(or_na "$(median d.rcpt10.postfix.accepted)").

Latency from acceptance to delivery per message, in seconds (median over
the runs of each run's percentile; method in the text above):

| Test | wsmtp p50 | wsmtp p90 | wsmtp p99 | Postfix p50 | Postfix p90 | Postfix p99 |
|---|---:|---:|---:|---:|---:|---:|
| (d) 1 recipient | $(latency d.rcpt1.wsmtp.p50) | $(latency d.rcpt1.wsmtp.p90) | $(latency d.rcpt1.wsmtp.p99) | $(latency d.rcpt1.postfix.p50) | $(latency d.rcpt1.postfix.p90) | $(latency d.rcpt1.postfix.p99) |
| (d) 10 recipients | $(latency d.rcpt10.wsmtp.p50) | $(latency d.rcpt10.wsmtp.p90) | $(latency d.rcpt10.wsmtp.p99) | $(latency d.rcpt10.postfix.p50) | $(latency d.rcpt10.postfix.p90) | $(latency d.rcpt10.postfix.p99) |

Single runs, in run order, with the 1-minute load average at the start of
each run:

| Series | msg/s | p50 / p99 latency (s) | Load average |
|---|---|---|---|
| wsmtp end to end, 1 rcpt | $(or_none "$(values d.rcpt1.wsmtp.rate)") | $(or_none "$(latency_values d.rcpt1.wsmtp)") | $(values d.rcpt1.wsmtp.load %.2f) |
| Postfix end to end, 1 rcpt | $(or_none "$(values d.rcpt1.postfix.rate)") | $(or_none "$(latency_values d.rcpt1.postfix)") | $(values d.rcpt1.postfix.load %.2f) |
| wsmtp end to end, 10 rcpt | $(or_none "$(values d.rcpt10.wsmtp.rate)") | $(or_none "$(latency_values d.rcpt10.wsmtp)") | $(values d.rcpt10.wsmtp.load %.2f) |
| Postfix end to end, 10 rcpt | $(or_none "$(values d.rcpt10.postfix.rate)") | $(or_none "$(latency_values d.rcpt10.postfix)") | $(values d.rcpt10.postfix.load %.2f) |

Where wsmtp's time went (medians over the runs, seconds). The last three
columns are counted from the first "spooled" line of the run; "spooled to
routed" is the time a message waited for a router and was routed, "routed
to delivered" the time until its last recipient was delivered:

| Test | spooled to routed p50 / p99 | routed to delivered p50 / p99 | last spooled | last routed | last delivered |
|---|---:|---:|---:|---:|---:|
| (d) 1 recipient | $(latency d.rcpt1.stages.wait_p50) / $(latency d.rcpt1.stages.wait_p99) | $(latency d.rcpt1.stages.deliver_p50) / $(latency d.rcpt1.stages.deliver_p99) | $(latency d.rcpt1.stages.spooled_end) | $(latency d.rcpt1.stages.routed_end) | $(latency d.rcpt1.stages.delivered_end) |
| (d) 10 recipients | $(latency d.rcpt10.stages.wait_p50) / $(latency d.rcpt10.stages.wait_p99) | $(latency d.rcpt10.stages.deliver_p50) / $(latency d.rcpt10.stages.deliver_p99) | $(latency d.rcpt10.stages.spooled_end) | $(latency d.rcpt10.stages.routed_end) | $(latency d.rcpt10.stages.delivered_end) |

The sink counted $(or_na "$(median d.rcpt1.wsmtp.transactions)") (1 recipient) and $(or_na "$(median d.rcpt10.wsmtp.transactions)") (10 recipients)
SMTP transactions from wsmtp for $MESSAGES messages (medians); more than one
per message means that wsmtp sent a message's recipients in several
transactions.

Sequential scans of the deliveries table per run, in run order (rows
read in thousands): 1 recipient $(scan_values d.rcpt1); 10 recipients
$(scan_values d.rcpt10).

EOF
}

# Prints the wsmtp rate of series $1 (median $2) for the table. Without a
# finished run it prints the lowest upper bound of the unfinished ones.
e2e_rate() {
    if [[ -n $2 ]]; then
        echo "$2"
        return
    fi
    local bound
    bound=$(awk -F '\t' -v key="$1.wsmtp.bound" '$1 == key && (min == "" || $3 < min) { min = $3 } END { if (min != "") printf "%.0f", min }' "$WORK/results.tsv")
    if [[ -n $bound ]]; then echo "< $bound"; else echo "n/a"; fi
}

# "not met" for a ratio given as an upper bound, otherwise verdict_at_least 1.
e2e_verdict() {
    if [[ $1 == "<"* ]]; then
        awk -v a="${1#< }" 'BEGIN { print (a <= 1) ? "not met" : "n/a" }'
    else
        verdict_at_least "$1" 1
    fi
}

# Lists the runs of test (d) that did not finish within STEP_TIMEOUT.
unfinished_report() {
    awk -F '\t' -v messages="$MESSAGES" -v timeout="$STEP_TIMEOUT" '
        $1 ~ /^d\.rcpt[0-9]+\.wsmtp\.unfinished$/ { split($1, k, "."); queued[k[2] " " $2] = $3; order[++n] = k[2] " " $2 }
        $1 ~ /^d\.rcpt[0-9]+\.wsmtp\.bound$/ { split($1, k, "."); bound[k[2] " " $2] = $3 }
        END {
            if (n == 0) exit
            printf "\nwsmtp runs that did not finish within %d s after smtp-source (STEP_TIMEOUT), so their rate is below the bound given:\n\n", timeout
            for (i = 1; i <= n; i++) {
                split(order[i], p, " ")
                sub(/^rcpt/, "", p[1])
                printf "- %s recipients per message, run %s: %d of %d messages still queued; below %s msg/s\n", p[1], p[2], queued[order[i]], messages, bound[order[i]]
            }
        }' "$WORK/results.tsv"
}

# Sequential scans and rows read (thousands) of series $1 per run.
scan_values() {
    awk -F '\t' -v scans="$1.deliveries.seq_scan" -v rows="$1.deliveries.seq_tup_read" '
        $1 == scans { s[$2] = $3; order[++n] = $2 }
        $1 == rows { r[$2] = $3 }
        END { if (n == 0) printf "n/a"; for (i = 1; i <= n; i++) printf "%s%d scans, %.0f k rows", (i > 1 ? "; " : ""), s[order[i]], r[order[i]] / 1000 }
    ' "$WORK/results.tsv"
}

# p50 / p99 of each run of series $1, comma-separated.
latency_values() {
    awk -F '\t' -v p50="$1.p50" -v p99="$1.p99" '
        $1 == p50 { a[$2] = $3; order[++n] = $2 }
        $1 == p99 { b[$2] = $3 }
        END { for (i = 1; i <= n; i++) printf "%s%.3f / %.3f", (i > 1 ? ", " : ""), a[order[i]], b[order[i]] }
    ' "$WORK/results.tsv"
}

# Prints the CPU time table of the sections that ran.
cpu_report() {
    section a || section b || section d || return 0
    echo "### CPU time per message (ms, $(runs_text))"
    echo
    echo "| Test | wsmtp process | PostgreSQL backends of the bench database | Postfix, all processes of the instance |"
    echo "|---|---:|---:|---:|"
    if section a; then
        echo "| (a) pass-through / relay, 1 rcpt | $(or_na "$(median a.rcpt1.wsmtp.cpu %.2f)") | - | $(or_na "$(median a.rcpt1.postfix.cpu %.2f)") |"
        echo "| (a) pass-through / relay, 10 rcpt | $(or_na "$(median a.rcpt10.wsmtp.cpu %.2f)") | - | $(or_na "$(median a.rcpt10.postfix.cpu %.2f)") |"
    fi
    if section b; then
        echo "| (b) spool / hold, 1 rcpt | $(or_na "$(median b.rcpt1.wsmtp.cpu %.2f)") | $(or_na "$(median b.rcpt1.postgres.cpu %.2f)") | $(or_na "$(median b.rcpt1.postfix.cpu %.2f)") |"
        echo "| (b) spool / hold, 10 rcpt | $(or_na "$(median b.rcpt10.wsmtp.cpu %.2f)") | $(or_na "$(median b.rcpt10.postgres.cpu %.2f)") | $(or_na "$(median b.rcpt10.postfix.cpu %.2f)") |"
    fi
    if section d; then
        echo "| (d) end to end, 1 rcpt | $(or_na "$(median d.rcpt1.wsmtp.cpu %.2f)") | $(or_na "$(median d.rcpt1.postgres.cpu %.2f)") | $(or_na "$(median d.rcpt1.postfix.cpu %.2f)") |"
        echo "| (d) end to end, 10 rcpt | $(or_na "$(median d.rcpt10.wsmtp.cpu %.2f)") | $(or_na "$(median d.rcpt10.postgres.cpu %.2f)") | $(or_na "$(median d.rcpt10.postfix.cpu %.2f)") |"
    fi
    cat <<EOF

PostgreSQL's WAL writer, checkpointer and background writer are not
counted, nor are smtp-source and smtp-sink.

EOF
}

# Prints the memory table of test (c).
memory_report() {
    local small_peak big_peak rss_growth rss_verdict
    small_peak=$(median c.pass-4k.peak)
    big_peak=$(median c.pass-100m.peak)
    if [[ -n $small_peak && -n $big_peak ]]; then
        rss_growth=$((big_peak - small_peak))
        rss_verdict=$( ((rss_growth <= RSS_TARGET_KIB)) && echo met || echo "not met")
    else
        rss_growth=""
        rss_verdict="n/a"
    fi

    cat <<EOF
### Memory and one large message ($(runs_text), a fresh wsmtp process each)

| Case | wsmtp VmHWM at start | wsmtp VmHWM after the message | Transfer time |
|---|---:|---:|---:|
| pass-through, one 4 KiB message | $(kib_to_mib "$(median c.pass-4k.idle)") MiB | $(kib_to_mib "$small_peak") MiB | $(or_na "$(median c.pass-4k.seconds %.2f)") s |
| pass-through, one 100 MiB message | $(kib_to_mib "$(median c.pass-100m.idle)") MiB | $(kib_to_mib "$big_peak") MiB | $(or_na "$(median c.pass-100m.seconds %.2f)") s |
| spool, one 100 MiB message | $(kib_to_mib "$(median c.spool-100m.idle)") MiB | $(kib_to_mib "$(median c.spool-100m.peak)") MiB | $(or_na "$(median c.spool-100m.seconds %.2f)") s |

Peak RSS growth from the 4 KiB to the 100 MiB pass-through message (medians):
$(or_na "$rss_growth") KiB (target: at most 32 MiB): **$rss_verdict**.
VmHWM values after the message, in run order: 4 KiB $(values c.pass-4k.peak) KiB;
100 MiB $(values c.pass-100m.peak) KiB.

Postfix relayed the same 100 MiB message to the sink end to end in
$(or_na "$(median c.postfix-100m.postfix.seconds %.2f)") s.

EOF
}

results_report() {
    if section a || section b; then
        rates_report
    fi
    if section d; then
        e2e_report
    fi
    cpu_report
    if section c; then
        memory_report
    fi
}

# Postfix warnings of the whole run, counted by text.
postfix_warnings_report() {
    local warnings
    warnings=$(grep -F ': warning: ' "$MAILLOG" | sed 's/^.*: warning: //' | sort | uniq -c | sort -rn | head -20 || true)
    if [[ -z $warnings ]]; then
        echo "Postfix logged no warnings."
        return
    fi
    echo "Postfix logged these warnings (count, text) during the whole run:"
    echo
    echo '```'
    echo "$warnings"
    echo '```'
}

commands_report() {
    echo '```sh'
    cat "$COMMANDS_FILE"
    echo '```'
}

write_report() {
    local report=$WORK/report.md
    {
        echo "<!-- bench/run.sh writes the text between these markers; edits there are lost. -->"
        echo
        echo "### Machine"
        echo
        machine_report
        echo
        results_report
        postfix_warnings_report
        echo
        if ((FAILED_RUNS > 0)); then
            echo "$FAILED_RUNS runs failed or were discarded; medians use the remaining runs."
            echo
        fi
        echo "### Commands"
        echo
        echo "Run by bench/run.sh (SECTIONS=$SECTIONS MESSAGES=$MESSAGES RUNS=$RUNS SESSIONS=$SESSIONS POSTFIX_CONCURRENCY=$POSTFIX_CONCURRENCY), configurations from"
        echo "bench/wsmtp.yaml.in (test d with log.format json) and bench/postfix/:"
        if [[ -n $E2E_EXTRA_CONFIG ]]; then
            echo
            echo "Test (d) ran with E2E_EXTRA_CONFIG, appended to its configuration:"
            echo
            echo '```yaml'
            cat "$E2E_EXTRA_CONFIG"
            echo '```'
        fi
        echo
        commands_report
    } >"$report"

    echo
    results_report

    if [[ -z $DOC ]]; then
        if ((DOC_SKIPPED)); then
            log "SECTIONS=$SECTIONS is not every test, so docs/benchmarks.md was not changed (set DOC to write a file); report in $report"
            KEEP_WORK=1
        fi
        return 0
    fi
    local begin='<!-- results:begin -->' end='<!-- results:end -->'
    mkdir -p "$(dirname "$DOC")"
    if [[ ! -f $DOC ]] || ! grep -qxF "$begin" "$DOC" || ! grep -qxF "$end" "$DOC"; then
        printf '# Benchmarks\n\n%s\n%s\n' "$begin" "$end" >>"$DOC"
    fi
    awk -v begin="$begin" -v end="$end" -v report="$report" '
        $0 == begin { print; while ((getline line < report) > 0) print line; skipping = 1; next }
        $0 == end { skipping = 0 }
        !skipping { print }
    ' "$DOC" >"$DOC.tmp"
    mv "$DOC.tmp" "$DOC"
    log "results written to $DOC"
}

# ---------------------------------------------------------------- main

# Returns success when test $1 (a, b, c or d) is among SECTIONS.
section() {
    [[ $SECTIONS == *"$1"* ]]
}

main() {
    [[ $SECTIONS =~ ^[abcd]+$ ]] || die "SECTIONS must consist of the letters a, b, c and d (got '$SECTIONS')"
    require_tools
    if section d; then
        command -v python3 >/dev/null || die "python3 not found; test (d) needs it for bench/latency.py"
    fi
    WORK=$(mktemp -d /tmp/wsmtp-bench.XXXXXX)
    # Postfix daemons read the configuration directory below this one.
    chmod 755 "$WORK"
    COMMANDS_FILE=$WORK/commands.txt
    : >"$COMMANDS_FILE"
    : >"$WORK/results.tsv"
    CLK_TCK=$(getconf CLK_TCK)
    LOAD_START=$(cut -d ' ' -f 1-3 /proc/loadavg)
    trap cleanup EXIT
    trap 'exit 130' INT TERM

    local port
    for port in "$WSMTP_PORT" "$SINK_PORT" "$POSTFIX_PORT"; do
        port_open "$port" && die "127.0.0.1:$port is in use; choose other ports with WSMTP_PORT, SINK_PORT, POSTFIX_PORT"
    done
    psql "$PG_URL/postgres" -qXAt -c 'SELECT 1' >/dev/null || die "PostgreSQL at $PG_URL is not reachable"

    # A private copy, so a build in the shared target directory cannot
    # replace the binary halfway through.
    cp "$WSMTP_BIN" "$WORK/wsmtp"
    WSMTP_BUILT=$(date -u -r "$WSMTP_BIN" '+%Y-%m-%d %H:%M UTC')
    WSMTP_SHA256=$(sha256sum "$WORK/wsmtp" | cut -c 1-12)
    WSMTP_CONFIG=$WORK/wsmtp.yaml
    render "$BENCH_DIR/wsmtp.yaml.in" "$WSMTP_CONFIG"
    # Builds with a router tier would route spooled mail while the spool
    # test runs. Postfix's hold queue routes nothing, so only the listener
    # runs; builds without --roles run only the listener anyway.
    WSMTP_SERVE_OPTIONS=()
    if "$WORK/wsmtp" serve --help 2>/dev/null | grep -q -- '--roles'; then
        WSMTP_SERVE_OPTIONS=(--roles listener)
    fi
    "$WORK/wsmtp" check --config "$WSMTP_CONFIG" >&2 || die "the wsmtp benchmark configuration is invalid"
    if section d; then
        # Test (d) has its own configuration, which logs JSON for the
        # timestamps that bench/latency.py reads, and runs every role.
        render "$BENCH_DIR/wsmtp.yaml.in" "$WORK/wsmtp-e2e.yaml" json
        if [[ -n $E2E_EXTRA_CONFIG ]]; then
            cat "$E2E_EXTRA_CONFIG" >>"$WORK/wsmtp-e2e.yaml" ||
                die "reading E2E_EXTRA_CONFIG $E2E_EXTRA_CONFIG failed"
        fi
        "$WORK/wsmtp" check --config "$WORK/wsmtp-e2e.yaml" >&2 ||
            die "the wsmtp configuration of the end to end test is invalid"
        "$WORK/wsmtp" serve --help 2>/dev/null | grep -q -- '--roles' ||
            die "this wsmtp build has no delivery tier (serve has no --roles), which test (d) needs"
    fi

    start_sink
    start_postfix
    fresh_bench_db
    log "work directory $WORK; sections $SECTIONS, $MESSAGES messages per run, $RUNS runs, $SESSIONS sessions"

    # The systems take turns within each round, so load from other work on
    # the machine affects both sides alike.
    local run
    for ((run = 1; run <= RUNS; run++)); do
        log "round $run of $RUNS (load average $(cut -d ' ' -f 1-3 /proc/loadavg))"
        record round.load "$run" "$(cut -d ' ' -f 1-3 /proc/loadavg)"
        if section a; then
            wsmtp_passthrough_run "$run" 1
            postfix_relay_run "$run" 1 "$MESSAGES" "$SESSIONS" "$MESSAGE_SIZE" a.rcpt1
            wsmtp_passthrough_run "$run" 10
            postfix_relay_run "$run" 10 "$MESSAGES" "$SESSIONS" "$MESSAGE_SIZE" a.rcpt10
        fi
        if section b; then
            wsmtp_spool_run "$run" 1
            postfix_hold_run "$run" 1
            wsmtp_spool_run "$run" 10
            postfix_hold_run "$run" 10
        fi
        if section c; then
            wsmtp_memory_run "$run" "$MESSAGE_SIZE" "$RELAY_DOMAIN" pass-4k
            wsmtp_memory_run "$run" "$BIG_MESSAGE_SIZE" "$RELAY_DOMAIN" pass-100m
            wsmtp_memory_run "$run" "$BIG_MESSAGE_SIZE" "$LOCAL_DOMAIN" spool-100m
            postfix_relay_run "$run" 1 1 1 "$BIG_MESSAGE_SIZE" c.postfix-100m
        fi
        if section d; then
            wsmtp_e2e_run "$run" 1
            postfix_relay_run "$run" 1 "$MESSAGES" "$SESSIONS" "$MESSAGE_SIZE" d.rcpt1 latency
            wsmtp_e2e_run "$run" 10
            postfix_relay_run "$run" 10 "$MESSAGES" "$SESSIONS" "$MESSAGE_SIZE" d.rcpt10 latency
        fi
    done
    empty_postfix_queue

    write_report
}

main "$@"
