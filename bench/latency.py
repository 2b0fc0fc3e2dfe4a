#!/usr/bin/env python3
"""Compute per-message delivery latency percentiles from a server's log.

bench/run.sh calls this after each end to end run (test d):

    latency.py wsmtp LOG         LOG is wsmtp's log with `log.format: json`
    latency.py postfix LOG       LOG is the part of Postfix's maillog_file
                                 written during the run
    latency.py wsmtp-stages LOG  where wsmtp's latency went, see below

The first two print one line of tab-separated fields:

    messages  recipients  p50  p90  p99  max  incomplete  undelivered  duplicates

Latencies are in seconds. A message's latency is the time until its last
recipient was delivered, so a message with 10 recipients counts once, at
its slowest recipient. Percentiles use the nearest-rank method: pN is the
smallest latency that at least N % of the messages do not exceed.
"messages" counts the messages with a latency and "recipients" the
delivered recipients. For wsmtp, "incomplete" counts spooled messages with
a recipient that was not delivered, and "undelivered" the delivery
attempts with another outcome than delivered; both leave the message out
of the percentiles. "duplicates" counts recipients delivered more than
once for the same queue id. The Postfix log is not read for the last
three, so they are 0 there, and bench/run.sh checks that log for
deferrals and bounces itself.

wsmtp: the start is the timestamp of the "spooled" line of the queue id,
which wsmtp logs after the commit and before it replies 250 to DATA. The
end is the latest "delivery attempted" line of the queue id with
outcome=delivered, logged after the sink replied 250 and the outcome was
committed. The timestamps of tracing-subscriber's JSON format have
microsecond resolution.

Postfix: the latency is the largest `delay=` of the queue id's
status=sent lines. Postfix measures it from the message's arrival time,
which smtpd takes at MAIL FROM, to the end of the delivery attempt, so it
also contains the transfer of the message and the fsync of the queue file
before the 250 reply. Postfix 3.7 logs delay values below 100 s with two
significant digits (0.013, 0.13, 1.3, 13), and bench/postfix/main.cf.in
sets delay_logging_resolution_limit = 3, so the smallest step is 1 ms.

wsmtp-stages splits wsmtp's latency at the "message routed" line and
prints, tab-separated, in seconds:

    spooled_end  routed_end  delivered_end  wait_p50  wait_p99  deliver_p50  deliver_p99

The first three are the times of the last "spooled", "message routed" and
"delivery attempted" lines, counted from the first "spooled" line. wait is
the time from "spooled" to "message routed" of a message (waiting for a
router and routing), deliver the time from "message routed" to its last
delivery.
"""

import json
import math
import re
import sys
from datetime import datetime

WSMTP_EVENTS = ('"spooled"', '"message routed"', '"delivery attempted"')


def percentile(sorted_values, p):
    """Return the nearest-rank p-th percentile of a sorted, non-empty list."""
    rank = max(1, math.ceil(p / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def parse_timestamp(text):
    """Return seconds since the epoch of an RFC 3339 timestamp such as
    2026-12-05T00:31:02.123456Z."""
    return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()


def wsmtp_events(path):
    """Yield (message, fields, timestamp) of the log events that the
    latency needs."""
    with open(path, encoding="utf-8", errors="replace") as log:
        for line in log:
            # Most lines are other events; a substring test is much cheaper
            # than parsing them.
            if not any(event in line for event in WSMTP_EVENTS):
                continue
            try:
                event = json.loads(line)
            except json.JSONDecodeError:
                continue
            # wsmtp writes the event's fields at the top level; older builds
            # nested them under "fields".
            fields = event.get("fields", event)
            if fields.get("queue_id") is None:
                continue
            yield fields.get("message"), fields, parse_timestamp(event["timestamp"])


class WsmtpLog:
    """Times of the spooled, routed and delivered events per queue id."""

    def __init__(self, path):
        self.spooled = {}
        self.routed = {}
        self.delivered_at = {}
        self.recipients = 0
        self.undelivered = 0
        self.duplicates = 0
        self.not_delivered = set()
        delivered = set()
        for message, fields, at in wsmtp_events(path):
            queue_id = fields["queue_id"]
            if message == "spooled":
                self.spooled[queue_id] = at
            elif message == "message routed":
                self.routed[queue_id] = at
            elif message == "delivery attempted":
                if fields.get("outcome") != "delivered":
                    self.undelivered += 1
                    self.not_delivered.add(queue_id)
                    continue
                self.recipients += 1
                key = (queue_id, fields.get("recipient"))
                if key in delivered:
                    self.duplicates += 1
                delivered.add(key)
                self.delivered_at[queue_id] = max(at, self.delivered_at.get(queue_id, at))

    def complete(self):
        """Return the queue ids whose every delivery was delivered."""
        return [
            queue_id
            for queue_id in self.spooled
            if queue_id in self.delivered_at and queue_id not in self.not_delivered
        ]


def wsmtp_latencies(path):
    """Return (latencies, recipients delivered, incomplete messages,
    attempts not delivered, duplicate deliveries)."""
    log = WsmtpLog(path)
    complete = log.complete()
    latencies = [log.delivered_at[q] - log.spooled[q] for q in complete]
    incomplete = len(log.spooled) - len(complete)
    return latencies, log.recipients, incomplete, log.undelivered, log.duplicates


def wsmtp_stages(path):
    """Return the fields of the wsmtp-stages output."""
    log = WsmtpLog(path)
    if not log.spooled:
        sys.exit(f"no spooled message found in {path}")
    start = min(log.spooled.values())
    ends = [
        max(times.values(), default=start) - start
        for times in (log.spooled, log.routed, log.delivered_at)
    ]
    waits = sorted(log.routed[q] - log.spooled[q] for q in log.spooled if q in log.routed)
    deliveries = sorted(
        log.delivered_at[q] - log.routed[q] for q in log.routed if q in log.delivered_at
    )
    if not waits or not deliveries:
        sys.exit(f"no routed and delivered message found in {path}")
    values = ends + [
        percentile(waits, 50),
        percentile(waits, 99),
        percentile(deliveries, 50),
        percentile(deliveries, 99),
    ]
    return [f"{value:.4f}" for value in values]


POSTFIX_SENT = re.compile(
    r"postfix/smtp\[\d+\]: ([0-9A-Za-z]+): to=<[^>]*>,.* delay=([0-9.]+),.* status=sent "
)


def postfix_latencies(path):
    """Return (latencies, recipients delivered, 0, 0, 0): see the module
    documentation."""
    delays = {}
    recipients = 0
    with open(path, encoding="utf-8", errors="replace") as log:
        for line in log:
            match = POSTFIX_SENT.search(line)
            if not match:
                continue
            recipients += 1
            queue_id, delay = match.group(1), float(match.group(2))
            delays[queue_id] = max(delay, delays.get(queue_id, delay))
    return list(delays.values()), recipients, 0, 0, 0


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in ("wsmtp", "postfix", "wsmtp-stages"):
        sys.exit("usage: latency.py wsmtp|postfix|wsmtp-stages LOG")
    kind, path = sys.argv[1], sys.argv[2]
    if kind == "wsmtp-stages":
        print("\t".join(wsmtp_stages(path)))
        return
    if kind == "wsmtp":
        latencies, recipients, *checks = wsmtp_latencies(path)
    else:
        latencies, recipients, *checks = postfix_latencies(path)
    if not latencies:
        sys.exit(f"no delivered message found in {path}")
    latencies.sort()
    fields = [len(latencies), recipients]
    fields += [f"{percentile(latencies, p):.4f}" for p in (50, 90, 99)]
    fields += [f"{latencies[-1]:.4f}", *checks]
    print("\t".join(str(field) for field in fields))


if __name__ == "__main__":
    main()
