"""Helpers for benches/callgrind.sh (standard library only).

  sink PORTFILE COUNTFILE   an OTLP/HTTP sink on 127.0.0.1: answers 200, counts POSTs (ends on SIGTERM)
  client ADDR N             N GET /api/data on one keep-alive connection; fails on any non-200
  report DIR SMALL LARGE TOP MODE...   instructions per request and the top functions, per mode
"""

import http.client
import http.server
import glob
import os
import re
import signal
import subprocess
import sys
import time


def sink(port_file, count_file):
    posts = [0]

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self):
            n = int(self.headers.get("content-length", "0"))
            self.rfile.read(n)
            posts[0] += 1
            self.send_response(200)
            self.send_header("content-type", "application/x-protobuf")
            self.send_header("content-length", "0")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    server.timeout = 0.2

    def done(*_):
        with open(count_file, "w") as f:
            f.write(str(posts[0]))
        sys.exit(0)

    signal.signal(signal.SIGTERM, done)
    with open(port_file, "w") as f:
        f.write(str(server.server_address[1]))
    deadline = time.monotonic() + 3600  # bounded even if nobody stops it
    while time.monotonic() < deadline:
        server.handle_request()
    done()


def client(addr, n):
    host, port = addr.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    start = time.monotonic()
    trace_ids = set()
    for i in range(int(n)):
        conn.request("GET", "/api/data")
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            sys.exit(f"client: request {i} answered {resp.status}")
        tid = resp.getheader("x-trace-id")
        if tid:
            trace_ids.add(tid)
    conn.close()
    print(f"{n} requests in {time.monotonic() - start:.1f} s; {len(trace_ids)} distinct x-trace-id")


def parts(path):
    """The output file, or with VG_EXTRA=--separate-threads=yes its per-thread files (path-01 …)."""
    found = sorted(glob.glob(path + "-[0-9]*"))
    if found:
        return found
    if os.path.exists(path):
        return [path]
    raise SystemExit(f"report: no callgrind output at {path}")


def file_total(path):
    """Total Ir of one callgrind output file."""
    with open(path) as f:
        for line in f:
            if line.startswith(("summary:", "totals:")):
                return int(line.split()[1])
    raise SystemExit(f"report: no totals in {path}")


def totals(path):
    """Total Ir of a process (all its threads' files)."""
    return sum(file_total(p) for p in parts(path))


def thread_totals(path):
    """Ir per thread file (the file's suffix), or {} when threads were not separated."""
    files = parts(path)
    return {} if files == [path] else {p.rsplit("-", 1)[1]: file_total(p) for p in files}


ENTRY = re.compile(r"^\s*([\d,]+)\s+\([^)]*\)\s+(\S.*)$")


def function_costs(path, inclusive):
    """Cost (Ir) per function, self or inclusive, summed over the process's thread files."""
    costs = {}
    for part in parts(path):
        for name, v in file_function_costs(part, inclusive).items():
            costs[name] = costs.get(name, 0) + v
    return costs


def file_function_costs(path, inclusive):
    """Cost (Ir) per function of one file, from callgrind_annotate with no threshold."""
    out = subprocess.run(
        ["callgrind_annotate", "--threshold=100", "--auto=no", f"--inclusive={'yes' if inclusive else 'no'}", path],
        capture_output=True, text=True, check=True,
    ).stdout
    costs = {}
    listing = False
    for line in out.splitlines():
        if "file:function" in line:
            listing = True
            continue
        m = ENTRY.match(line) if listing else None
        if not m or "PROGRAM TOTALS" in line:
            continue
        name = re.sub(r"\s*\[[^\]]*\]$", "", m.group(2).strip())
        # FILE:FUNCTION; the file is a build path (its first single colon ends it)
        name = re.sub(r"^\S*?[^:]:(?!:)", "", name, count=1)
        costs[name] = costs.get(name, 0) + int(m.group(1).replace(",", ""))
    return costs


def short(name, width=110):
    name = re.sub(r"::h[0-9a-f]{16}$", "", name)
    return name if len(name) <= width else name[: width - 1] + "…"


def report(out, small, large, top, modes):
    small, large, top = int(small), int(large), int(top)
    n = large - small
    rows = {}
    print(f"\ninstructions per request = (run of {large} − run of {small}) / {n}")
    print(f"{'mode':<14}{'frontend':>12}{'backend':>12}{'chain':>12}{'× untraced':>12}")
    for mode in modes:
        per = {}
        for role in ("frontend", "backend"):
            a = totals(os.path.join(out, f"{mode}-{small}", f"{role}.cg"))
            b = totals(os.path.join(out, f"{mode}-{large}", f"{role}.cg"))
            per[role] = (b - a) / n
        rows[mode] = per
    for mode in modes:
        for role in ("frontend", "backend"):
            a = thread_totals(os.path.join(out, f"{mode}-{small}", f"{role}.cg"))
            b = thread_totals(os.path.join(out, f"{mode}-{large}", f"{role}.cg"))
            threads = {t: (b[t] - a.get(t, 0)) / n for t in b if (b[t] - a.get(t, 0)) / n >= 100}
            if threads:
                listed = ", ".join(f"thread {t} {v / 1000:.1f}k" for t, v in sorted(threads.items()))
                print(f"  {mode} {role} per thread: {listed}")
    base = rows.get("untraced")
    for mode, per in rows.items():
        chain = per["frontend"] + per["backend"]
        ratio = f"{chain / (base['frontend'] + base['backend']):.2f}" if base else "-"
        print(f"{mode:<14}{per['frontend'] / 1000:>11.1f}k{per['backend'] / 1000:>11.1f}k{chain / 1000:>11.1f}k{ratio:>12}")
    for mode in modes:
        for role in ("frontend", "backend"):
            chain = rows[mode][role]
            for inclusive in (False, True):
                a = function_costs(os.path.join(out, f"{mode}-{small}", f"{role}.cg"), inclusive)
                b = function_costs(os.path.join(out, f"{mode}-{large}", f"{role}.cg"), inclusive)
                diff = {k: (b.get(k, 0) - a.get(k, 0)) / n for k in set(a) | set(b)}
                kind = "inclusive" if inclusive else "self"
                print(f"\n{mode}, {role}: top {kind} cost per request (% of its {chain / 1000:.1f}k)")
                for name, v in sorted(diff.items(), key=lambda kv: -kv[1])[:top]:
                    print(f"{v:>10.0f} {100 * v / chain:>6.1f} %  {short(name)}")

if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    {"sink": sink, "client": client, "report": lambda *a: report(a[0], a[1], a[2], a[3], a[4:])}[cmd](*args)
