#!/usr/bin/env python3
"""Messages for bench/postfix-interop.sh: make them, send them, compare what
Postfix delivered with what was sent.

  interop.py generate DIR
      Writes DIR/NN-name.eml (CRLF throughout, exactly the octets to send)
      and DIR/manifest.json (per message: file, MAIL options, recipient local
      part, what it tests).
  interop.py send DIR HOST PORT USER PASSWORD DOMAIN PASS
      Sends every message to HOST:PORT (AUTH PLAIN after EHLO, no TLS) for
      <local>@DOMAIN, with its MAIL options (BODY=8BITMIME, SMTPUTF8). The
      X-Interop-Pass header of each sent copy names PASS.
  interop.py compare DIR MAILDIR PASS
      Reads every file in MAILDIR/new, removes the trace headers at the top
      (Return-Path, Delivered-To, X-Original-To from Postfix's virtual(8),
      Received from Postfix's smtpd and from mailroom), turns Maildir's LF
      back into CRLF, and compares byte for byte with what was sent. Prints
      PASS/FAIL per message; exits 1 on any failure or missing message.

Postfix writes Maildir files with LF line ends: the sent messages contain no
bare CR or LF, so LF -> CRLF restores them exactly.
"""

import base64
import json
import os
import random
import smtplib
import sys

CRLF = b"\r\n"


def lines(*ls):
    return CRLF.join(l if isinstance(l, bytes) else l.encode() for l in ls) + CRLF


def headers(n, name, subject, extra=()):
    # X-Interop-Id first: the compare step finds messages by it. The
    # X-Interop-Pass line is filled in when sending.
    return [
        f"X-Interop-Id: {n:02d}-{name}",
        "X-Interop-Pass: PASSNAME",
        "From: Interop Sender <sender@relay.bench.test>",
        "To: <rcpt@interop.test>",
        f"Subject: {subject}",
        "Date: Sat, 21 Nov 2026 01:00:00 +0000",
        f"Message-ID: <{n:02d}.{name}@relay.bench.test>",
        *extra,
    ]


def make_messages():
    rng = random.Random(20261121)
    msgs = []

    def add(name, data, options=(), local="rcpt", what=""):
        msgs.append((name, data, list(options), local, what))

    n = lambda: len(msgs) + 1  # noqa: E731

    add("plain", lines(*headers(n(), "plain", "plain ASCII"), "",
                       "Hello,", "", "a plain 7-bit message.", "-- ", "sender"),
        what="7-bit text")

    add("8bit-utf8", lines(*headers(n(), "8bit-utf8", "8-bit body",
                                    ["MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8",
                                     "Content-Transfer-Encoding: 8bit"]), "",
                           "Grüße aus Köln – «ÆØÅ» ½ € 日本語 😀".encode(),
                           "second line: ñandú, çà, ß".encode()),
        options=["BODY=8BITMIME"], what="UTF-8 body, BODY=8BITMIME")

    latin1 = bytes(range(0x80, 0x100))
    add("8bit-latin1", lines(*headers(n(), "8bit-latin1", "8-bit Latin-1 body",
                                      ["MIME-Version: 1.0", "Content-Type: text/plain; charset=iso-8859-1",
                                       "Content-Transfer-Encoding: 8bit"]), "",
                             b"every high octet: " + latin1[:64], latin1[64:], b"caf\xe9 na\xefve"),
        options=["BODY=8BITMIME"], what="all octets 0x80-0xFF (not UTF-8), BODY=8BITMIME")

    long_lines = [("L" * 997) + "E", ("x" * 996) + "yz", "a" * 500, "", "b" * 998, "." + ("d" * 997)]
    add("long-lines", lines(*headers(n(), "long-lines", "lines of 998 octets"), "", *long_lines),
        what="lines of 998 octets (one starting with a dot)")

    dotty = [".", "..", "...", ". leading dot and space", ".hidden", "text", ".", "", ".", "..end"]
    add("dot-stuffing", lines(*headers(n(), "dot-stuffing", "dot-stuffed lines"), "", *dotty),
        what="lines that are or start with '.', a '.' line last")

    add("last-line-dot", lines(*headers(n(), "last-line-dot", "ends with a dot line"), "", "body", "."),
        what="last line is a single '.'")

    # Lines of 5 octets all starting with '.': the 64 KiB blocks mailroom
    # writes end at every offset within a line somewhere in 1 MiB.
    pattern = [".ab", "..c", "..."]
    body = [pattern[i % 3] for i in range(220_000)]
    add("dots-1mb", lines(*headers(n(), "dots-1mb", "1 MB of dot lines"), "", *body),
        what="1.1 MB, every line starts with '.', block boundaries at every offset")

    blob = bytes(rng.getrandbits(8) for _ in range(1_000_000))
    b64 = base64.encodebytes(blob).decode().replace("\n", "\r\n").rstrip("\r\n")
    attach = lines(*headers(n(), "attachment-1mb", "1 MB attachment",
                            ["MIME-Version: 1.0", 'Content-Type: multipart/mixed; boundary="=-=bench=-="']), "",
                   "This is a multi-part message in MIME format.", "",
                   "--=-=bench=-=", "Content-Type: text/plain; charset=us-ascii", "",
                   "See the attachment.", "",
                   "--=-=bench=-=", "Content-Type: application/octet-stream",
                   'Content-Disposition: attachment; filename="random.bin"',
                   "Content-Transfer-Encoding: base64", "", b64, "",
                   "--=-=bench=-=--")
    add("attachment-1mb", attach, what="multipart, 1,000,000 random octets as base64")

    add("folded-headers", lines(*headers(n(), "folded-headers", "a subject that is folded\r\n over two lines",
                                         ["X-Long: " + " ".join(["word"] * 15) + "\r\n\t" + " ".join(["more"] * 15)
                                          + "\r\n " + "end",
                                          "X-Trailing-Space: value   ", "X-Tab:\tvalue\t"]), "",
                                "body with trailing spaces   ", "\ttab-indented line", "   "),
        what="folded headers, trailing whitespace, tabs")

    add("no-body", lines(*headers(n(), "no-body", "headers and an empty body"), ""),
        what="empty body after the blank line")

    add("headers-only", lines(*headers(n(), "headers-only", "no blank line, no body")),
        what="no header/body separator at all")

    add("smtputf8", lines(*headers(n(), "smtputf8", "Ünïcödé subject ✓",
                                   ["MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8",
                                    "Content-Transfer-Encoding: 8bit"]), "",
                          "SMTPUTF8 with a non-ASCII recipient."),
        options=["SMTPUTF8", "BODY=8BITMIME"], local="jörg", what="UTF-8 header and recipient, SMTPUTF8")

    add("no-msgid-date", lines("X-Interop-Id: {:02d}-no-msgid-date".format(n()), "X-Interop-Pass: PASSNAME",
                               "From: <sender@relay.bench.test>", "Subject: no Message-ID, no Date", "",
                               "mailroom must not add headers in transit."),
        what="no Message-ID, Date or To header")

    big_lines = []
    for i in range(2000):
        size = rng.randint(0, 998)
        line = "".join(rng.choice("abc .\t-=") for _ in range(size)).rstrip(" \t")
        big_lines.append(line)
    add("random-lines", lines(*headers(n(), "random-lines", "random line lengths with dots"), "", *big_lines),
        what="2000 random lines of 0-998 octets with dots, spaces, tabs")
    return msgs


def generate(outdir):
    os.makedirs(outdir, exist_ok=True)
    manifest = []
    for i, (name, data, options, local, what) in enumerate(make_messages(), 1):
        assert b"\r\n" in data and b"\n" not in data.replace(b"\r\n", b"") and b"\r" not in data.replace(b"\r\n", b""), name
        fname = f"{i:02d}-{name}.eml"
        with open(os.path.join(outdir, fname), "wb") as f:
            f.write(data)
        manifest.append({"id": f"{i:02d}-{name}", "file": fname, "options": options, "local": local,
                         "what": what, "size": len(data)})
    with open(os.path.join(outdir, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1, ensure_ascii=False)
    print(f"generated {len(manifest)} messages in {outdir}")


def load(outdir, pass_name):
    with open(os.path.join(outdir, "manifest.json")) as f:
        manifest = json.load(f)
    for m in manifest:
        with open(os.path.join(outdir, m["file"]), "rb") as f:
            m["data"] = f.read().replace(b"X-Interop-Pass: PASSNAME", f"X-Interop-Pass: {pass_name}".encode(), 1)
    return manifest


def send(outdir, host, port, user, password, domain, pass_name):
    manifest = load(outdir, pass_name)
    s = smtplib.SMTP(host, int(port), local_hostname="interop.bench.test", timeout=60)
    s.ehlo()
    s.login(user, password)
    for m in manifest:
        rcpt = f"{m['local']}@{domain}"
        refused = s.sendmail("sender@relay.bench.test", [rcpt], m["data"], mail_options=m["options"])
        if refused:
            sys.exit(f"{m['id']}: refused {refused}")
        print(f"sent {m['id']} ({len(m['data'])} octets) to {rcpt} {' '.join(m['options'])}")
    s.quit()


TRACE = {b"return-path", b"delivered-to", b"x-original-to", b"received"}


def split_trace(data):
    """Removes the trace fields at the top; returns (removed names, rest)."""
    removed = []
    pos = 0
    while pos < len(data):
        end = data.find(CRLF, pos)
        if end < 0:
            break
        # The field continues while the next line starts with WSP.
        nxt = end + 2
        while nxt < len(data) and data[nxt:nxt + 1] in (b" ", b"\t"):
            e = data.find(CRLF, nxt)
            if e < 0:
                break
            nxt = e + 2
        name = data[pos:data.find(b":", pos)].strip().lower() if b":" in data[pos:end] else b""
        if name not in TRACE:
            break
        removed.append((name.decode(), data[pos:nxt]))
        pos = nxt
    return removed, data[pos:]


def first_difference(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return min(len(a), len(b))


def compare(outdir, maildir, pass_name):
    manifest = load(outdir, pass_name)
    want = {m["id"]: m for m in manifest}
    got = {}
    extra = []
    newdir = os.path.join(maildir, "new")
    for fname in sorted(os.listdir(newdir)) if os.path.isdir(newdir) else []:
        with open(os.path.join(newdir, fname), "rb") as f:
            raw = f.read()
        data = raw.replace(b"\n", b"\r\n")
        removed, rest = split_trace(data)
        mid = None
        if rest.startswith(b"X-Interop-Id: "):
            mid = rest[len(b"X-Interop-Id: "):rest.find(CRLF)].decode(errors="replace")
        if mid in want and mid not in got:
            got[mid] = (fname, removed, rest)
        else:
            extra.append((fname, mid))
    failures = 0
    for mid, m in want.items():
        if mid not in got:
            print(f"FAIL {pass_name} {mid}: not delivered ({m['what']})")
            failures += 1
            continue
        fname, removed, rest = got[mid]
        names = [n for n, _ in removed]
        received = [v for n, v in removed if n == "received"]
        by_mailroom = [v for v in received if b"by relay.bench.test (mailroom)" in v]
        problems = []
        if rest != m["data"]:
            i = first_difference(rest, m["data"])
            problems.append(
                f"content differs at octet {i} of {len(m['data'])} (delivered {len(rest)} octets): "
                f"sent {m['data'][max(0, i - 20):i + 20]!r}, delivered {rest[max(0, i - 20):i + 20]!r}")
        if len(by_mailroom) != 1:
            problems.append(f"{len(by_mailroom)} Received headers by mailroom, expected 1")
        if names.count("received") != 2:
            problems.append(f"{names.count('received')} Received headers, expected 2 (Postfix, mailroom)")
        if problems:
            failures += 1
            print(f"FAIL {pass_name} {mid}: " + "; ".join(problems) + f" [{fname}]")
        else:
            print(f"PASS {pass_name} {mid}: {len(rest):,} octets identical ({m['what']}); "
                  f"trace removed: {', '.join(names)}")
    for fname, mid in extra:
        print(f"FAIL {pass_name} unexpected or duplicate delivery {fname} (id {mid})")
        failures += 1
    print(f"{pass_name}: {len(want) - failures if failures <= len(want) else 0} of {len(want)} messages identical"
          f"{'' if not failures else f', {failures} failure(s)'}")
    return failures == 0


def main():
    a = sys.argv[1:]
    if a[:1] == ["generate"] and len(a) == 2:
        generate(a[1])
    elif a[:1] == ["send"] and len(a) == 8:
        send(*a[1:])
    elif a[:1] == ["compare"] and len(a) == 4:
        sys.exit(0 if compare(*a[1:]) else 1)
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
