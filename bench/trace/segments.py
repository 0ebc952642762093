#!/usr/bin/env python3
"""Summarises a loopback capture of handshake cycles per TCP connection, per leg.

usage: segments.py CAPTURE.pcap FRONT_PORT [BACK_PORT]

FRONT_PORT is where the client connects (the proxy, or the backend for `direct`),
BACK_PORT the backend behind a proxy. Each connection becomes one line of its segments in
order, e.g. `c:S p:S. c:. c:P.186 p:P.129 ...`, where the letter says who sent it
(c = client, p = proxy's front, q = proxy's back, b = backend), then the TCP flags
(S SYN, F FIN, R RST, P PSH, . ACK) and the payload length if any. Identical
sequences are counted together, so a run of the same cycle shows as one line with its
count. Then per leg and sender: data segments, pure ACKs, FINs and RSTs per connection,
and who sent the first FIN.
"""
import collections
import re
import subprocess
import sys

LINE = re.compile(
    r"^\S+ IP 127\.0\.0\.1\.(\d+) > 127\.0\.0\.1\.(\d+): Flags \[([^\]]*)\].*?length (\d+)"
)


def main():
    path, front = sys.argv[1], int(sys.argv[2])
    back = int(sys.argv[3]) if len(sys.argv) > 3 else None
    text = subprocess.run(
        ["tcpdump", "-nn", "-tt", "-r", path], capture_output=True, text=True, check=True
    ).stdout
    conns = collections.OrderedDict()
    for line in text.splitlines():
        m = LINE.match(line)
        if not m:
            continue
        src, dst, flags, length = int(m[1]), int(m[2]), m[3], int(m[4])
        if front in (src, dst):
            leg = "front"
            who = "p" if src == front else "c"
            key = (leg, dst if src == front else src)
        elif back is not None and back in (src, dst):
            leg = "back"
            who = "b" if src == back else "q"
            key = (leg, dst if src == back else src)
        else:
            continue
        if back is None:
            who = {"p": "b"}.get(who, who)
        conns.setdefault(key, []).append((who, flags, length))

    for leg in ("front", "back"):
        legs = [segs for (l, _), segs in conns.items() if l == leg and segs[0][1] == "S"]
        if not legs:
            continue
        name = {"front": "client <-> front", "back": "proxy <-> backend"}[leg]
        print(f"\n{name}: {len(legs)} connections")
        patterns = collections.Counter(
            " ".join(f"{w}:{f}{'' if n == 0 else n}" for w, f, n in segs) for segs in legs
        )
        for pattern, count in patterns.most_common(6):
            print(f"  {count:4d}x  {pattern}")
        per = collections.defaultdict(collections.Counter)
        first_fin = collections.Counter()
        for segs in legs:
            fin_seen = False
            for w, f, n in segs:
                c = per[w]
                c["segments"] += 1
                if n > 0:
                    c["data"] += 1
                elif f in (".",):
                    c["pure ACK"] += 1
                if "F" in f:
                    c["FIN"] += 1
                    if not fin_seen:
                        first_fin[w] += 1
                        fin_seen = True
                if "R" in f:
                    c["RST"] += 1
                if "S" in f:
                    c["SYN"] += 1
        for w in sorted(per):
            c = per[w]
            cells = ", ".join(
                f"{k} {c[k] / len(legs):.2f}"
                for k in ("segments", "SYN", "data", "pure ACK", "FIN", "RST")
            )
            print(f"  sent by {w}: {cells} per connection")
        print("  first FIN from: " + ", ".join(f"{w} {n}" for w, n in first_fin.items()))


if __name__ == "__main__":
    main()
