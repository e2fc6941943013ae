#!/usr/bin/env python3
"""A mailroom capture worker in the jsonl codec.

mailroom writes one JSON event per line to our stdin and waits for one line
back: CONTINUE (the SMTP session goes on) or CLOSE (the server answers 221
and closes the connection). Anything we print to stderr ends up in
mailroom's log; stdout is the protocol, so never print anything else there.

Usage (in [capture.workers]):
    command = ["python3", "examples/workers/jsonl_worker.py", "/tmp/events.jsonl"]

With a path argument, each event is also appended to that file, one JSON
object per line. A message whose subject contains "[close]" gets CLOSE, to
show how a worker ends a session.
"""

import json
import sys


def main() -> None:
    log_path = sys.argv[1] if len(sys.argv) > 1 else None
    for line in sys.stdin:
        line = line.strip()
        if not line:
            continue
        event = json.loads(line)
        message = event["message"]
        print(
            f"worker: {event['uuid']} from {event['envelope']['from']!r} "
            f"subject {message.get('subject')!r}, "
            f"{len(event['attachments'])} attachment(s)",
            file=sys.stderr,
            flush=True,
        )
        if log_path:
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(event, ensure_ascii=False) + "\n")
        reply = "CLOSE" if "[close]" in (message.get("subject") or "") else "CONTINUE"
        sys.stdout.write(reply + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
