#!/usr/bin/env python3
"""Small helpers for scripts/bench.sh: reading metrics and tool output, and the results table.

Subcommands:
  free-port                              a free loopback TCP port
  metric PORT NAME [VOLUME]              one Prometheus sample from a gateway's /metrics
  fio FILE (iops|mibps|ios|syncs) DIR    a figure from fio's JSON output (DIR: read|write)
  json FILE PATH                         a value from a JSON file, PATH like get.mib_per_second
  drain-timer OUT PORT VOLUME PID SPAWNED TIMEOUT
                                         times a (re)started gateway's upload of its backlog:
                                         waits for `ready` in its stdout file OUT, then polls
                                         /metrics until VOLUME's log is empty; JSON on stdout
  row ROWS.jsonl KEY=VALUE...            append one result row
  render ROWS.jsonl HEADER.md            print the results as markdown
"""

import json
import sys
import urllib.request


def free_port():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        print(s.getsockname()[1])


def scrape(port):
    """All samples of a gateway's /metrics, as {'name{labels}': 'value'}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    samples = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        samples[key] = value
    return samples


def sample(samples, name, volume=None):
    wanted = f'{name}{{volume="{volume}"}}' if volume else name
    if wanted not in samples:
        sys.exit(f"metric {wanted} not found")
    return samples[wanted]


def metric(port, name, volume=None):
    print(sample(scrape(port), name, volume))


def drain_timer(out_path, port, volume, pid, spawned, timeout):
    """Row d: from the gateway's `ready` line until VOLUME's write log is empty.

    `ready` is polled every 5 ms, the metrics every 20 ms, so the drain time is exact to a few
    tens of milliseconds (the shell's own polling costs ~0.2 s per step). The uploader starts
    while the volume opens, before `ready`, so the bytes uploaded by then are reported apart and
    not counted in the throughput.
    """
    import os
    import time

    pid, spawned, timeout = int(pid), float(spawned), float(timeout)
    deadline = time.time() + timeout

    def alive():
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False

    def check():
        if time.time() > deadline:
            sys.exit(f"drain-timer: timed out after {timeout:.0f} s")
        if not alive():
            sys.exit(f"drain-timer: gateway {pid} exited (see {out_path} and its log)")

    while True:
        try:
            with open(out_path) as f:
                if any(line.startswith("ready") for line in f):
                    break
        except FileNotFoundError:
            pass
        check()
        time.sleep(0.005)
    ready_at = time.time()
    at_ready = scrape(port)
    polls = 0
    while True:
        now = time.time()
        samples = scrape(port)
        polls += 1
        if (
            sample(samples, "blockgate_volume_log_bytes", volume) == "0"
            and sample(samples, "blockgate_volume_upload_backlog_segments", volume) == "0"
        ):
            drained_at = now
            break
        check()
        time.sleep(0.02)

    def value(samples, name):
        return int(float(sample(samples, name, volume)))

    uploaded_at_ready = value(at_ready, "blockgate_volume_uploaded_bytes_total")
    uploaded_at_drained = value(samples, "blockgate_volume_uploaded_bytes_total")
    segments_at_ready = value(at_ready, "blockgate_volume_segments_uploaded_total")
    segments_at_drained = value(samples, "blockgate_volume_segments_uploaded_total")
    drain_seconds = drained_at - ready_at
    uploaded = uploaded_at_drained - uploaded_at_ready
    print(
        json.dumps(
            {
                "replay_seconds": round(ready_at - spawned, 3),
                "drain_seconds": round(drain_seconds, 3),
                "start_to_drained_seconds": round(drained_at - spawned, 3),
                "log_bytes_at_ready": value(at_ready, "blockgate_volume_log_bytes"),
                "uploaded_at_ready": uploaded_at_ready,
                "uploaded_at_drained": uploaded_at_drained,
                "uploaded_bytes": uploaded,
                "segments_at_ready": segments_at_ready,
                "segments": segments_at_drained - segments_at_ready,
                "mib_per_second": uploaded / 2**20 / drain_seconds,
                "metric_polls": polls,
            },
            indent=2,
        )
    )


def load_json(path):
    with open(path) as f:
        text = f.read()
    # fio's nbd engine prints "fio: connected to NBD server" before its JSON.
    return json.loads(text[text.index("{"):])


def fio(path, what, direction):
    job = load_json(path)["jobs"][0]
    if what == "syncs":
        print(job["sync"]["total_ios"])
    elif what == "iops":
        print(f'{job[direction]["iops"]:.0f}')
    elif what == "ios":
        print(job[direction]["total_ios"])
    elif what == "mibps":
        print(f'{job[direction]["bw_bytes"] / 2**20:.1f}')
    else:
        sys.exit(f"unknown fio figure {what}")


def json_value(path, dotted):
    value = load_json(path)
    for part in dotted.split("."):
        value = value[part]
    print(value)


def row(path, pairs):
    entry = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key == "command":
            entry.setdefault("commands", []).append(value)
        else:
            entry[key] = value
    with open(path, "a") as f:
        f.write(json.dumps(entry) + "\n")


def number(text):
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def render(path, header_path):
    with open(header_path) as f:
        print(f.read().rstrip())
    rows = [json.loads(line) for line in open(path) if line.strip()]
    print()
    print("| row | measurement | blockgate | baseline | blockgate / baseline | second opinion | notes |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        unit = r.get("unit", "")
        ours, theirs = number(r.get("blockgate")), number(r.get("baseline"))
        ratio = f"{ours / theirs:.2f}" if ours is not None and theirs else "–"
        better = r.get("better", "higher")
        if ratio != "–":
            ratio += " (higher is better)" if better == "higher" else " (lower is better)"

        def cell(value, label=None):
            if value in (None, ""):
                return "–"
            text = f"{value} {unit}".strip()
            return f"{text} ({label})" if label else text

        print(
            f'| {r["row"]} | {r["what"]} | {cell(r.get("blockgate"))} '
            f'| {cell(r.get("baseline"), r.get("baseline_label"))} | {ratio} '
            f'| {cell(r.get("second"), r.get("second_label"))} | {r.get("notes", "")} |'
        )
    print()
    print("Commands (`$URI` is the server's `nbd+unix://` URI; blockgate's and the baselines' rows run")
    print("the same command against their own server):")
    print()
    for r in rows:
        for command in r.get("commands", []):
            print(f'- ({r["row"]}) `{command}`')


def main(argv):
    if not argv:
        sys.exit(__doc__)
    command, args = argv[0], argv[1:]
    if command == "free-port":
        free_port()
    elif command == "metric":
        metric(*args)
    elif command == "fio":
        fio(*args)
    elif command == "json":
        json_value(*args)
    elif command == "drain-timer":
        drain_timer(*args)
    elif command == "row":
        row(args[0], args[1:])
    elif command == "render":
        render(*args)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
