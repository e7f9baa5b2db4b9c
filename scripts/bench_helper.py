#!/usr/bin/env python3
"""Small helpers for scripts/bench.sh: reading metrics and tool output, and the results table.

Subcommands:
  free-port                              a free loopback TCP port
  metric PORT NAME [VOLUME]              one Prometheus sample from a gateway's /metrics
  fio FILE (iops|mibps|ios|syncs) DIR    a figure from fio's JSON output (DIR: read|write)
  json FILE PATH                         a value from a JSON file, PATH like get.mib_per_second
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


def metric(port, name, volume=None):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    wanted = f'{name}{{volume="{volume}"}}' if volume else name
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key == wanted:
            print(value)
            return
    sys.exit(f"metric {wanted} not found")


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
    elif command == "row":
        row(args[0], args[1:])
    elif command == "render":
        render(*args)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main(sys.argv[1:])
