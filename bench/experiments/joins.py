#!/usr/bin/env python3
"""One relay's 50 MB join, timed from its own log, for release builds side by side.

    bench/experiments/joins.py N OUT.json DIR [DIR ...]

Each DIR is a target directory's `release` folder holding `canopy`, `core-node` and
`relay-node` (the first DIR's `canopy` and `core-node` serve every arm). One 1-node core gets
a 50 MB file of random bytes; then N joins per arm, the arms rotated each round, each a fresh
`relay-node --file` that is stopped once its log says `installed snapshot`. Per join: spawn to
`attached`, `attached` to `installed`, and spawn to `installed`, in ms (the log's own
timestamps against the spawn time). Listens on 127.0.0.1:23000-23001. Prints medians and
writes every join to OUT.json.
"""
import datetime, json, os, re, shutil, statistics, subprocess, sys, tempfile, time, urllib.request

n, out = int(sys.argv[1]), sys.argv[2]
arms = [(os.path.basename(os.path.dirname(os.path.abspath(a))), a) for a in sys.argv[3:]]
base = arms[0][1]
W = tempfile.mkdtemp(prefix="canopy-joins-")
B = os.path.join


def run(*a):
    subprocess.run(a, check=True, stdout=subprocess.DEVNULL)


def status():
    try:
        return json.load(urllib.request.urlopen("http://127.0.0.1:23001/v1/status", timeout=1))
    except Exception:
        return None


def ts(line):
    stamp = re.match(r"^(\S+Z)", line).group(1)
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


run(B(base, "canopy"), "ca", "init", "--out", f"{W}/ca")
for name, role in [("c1", "core")] + [(f"r{i}", "relay") for i in range(len(arms) * n)]:
    run(B(base, "canopy"), "cert", "issue", "--ca", f"{W}/ca", "--name", name, "--role", role,
        "--out", f"{W}/tls")
with open(f"{W}/tok", "w") as f:
    f.write(os.urandom(16).hex())
with open(f"{W}/file.bin", "wb") as f:
    f.write(os.urandom(50_000_000))
core = subprocess.Popen(
    [B(base, "core-node"), "--name", "c1", "--listen", "127.0.0.1:23000", "--api",
     "127.0.0.1:23001", "--data", f"{W}/core", "--tls", f"{W}/tls", "--api-token-file",
     f"{W}/tok", "--init"],
    stdout=open(f"{W}/core.log", "w"), stderr=subprocess.STDOUT)
try:
    deadline = time.time() + 30
    while (s := status()) is None or s.get("role") != "leader":
        assert time.time() < deadline, "the core did not lead"
        time.sleep(0.1)
    run(B(base, "canopy"), "--api", "127.0.0.1:23001", "--token-file", f"{W}/tok", "put",
        f"{W}/file.bin")
    rows = {tag: [] for tag, _ in arms}
    k = 0
    for r in range(n):
        for tag, bindir in arms[r % len(arms):] + arms[:r % len(arms)]:
            deadline = time.time() + 10
            while (s := status()) and s.get("children"):
                assert time.time() < deadline, "the last relay's slot did not free"
                time.sleep(0.01)
            log = f"{W}/r{k}.log"
            t0 = time.time()
            p = subprocess.Popen(
                [B(bindir, "relay-node"), "--name", f"r{k}", "--listen", "127.0.0.1:0", "--api",
                 "127.0.0.1:0", "--data", f"{W}/d{k}", "--tls", f"{W}/tls", "--join",
                 "127.0.0.1:23000", "--file", f"{W}/f{k}.bin"],
                stdout=open(log, "w"), stderr=subprocess.STDOUT)
            deadline = time.time() + 30
            attached = installed = None
            while installed is None:
                assert time.time() < deadline, f"join {k} did not finish"
                time.sleep(0.002)
                for line in open(log):
                    if attached is None and " attached " in line:
                        attached = ts(line)
                    if "installed snapshot" in line:
                        installed = ts(line)
            p.terminate()
            p.wait()
            rows[tag].append({"attached": (attached - t0) * 1e3,
                              "transfer": (installed - attached) * 1e3,
                              "total": (installed - t0) * 1e3})
            shutil.rmtree(f"{W}/d{k}", ignore_errors=True)
            if os.path.exists(f"{W}/f{k}.bin"):
                os.remove(f"{W}/f{k}.bin")
            k += 1
finally:
    core.terminate()
    core.wait()
    shutil.rmtree(W, ignore_errors=True)
with open(out, "w") as f:
    json.dump(rows, f, indent=1)
for tag, joins in rows.items():
    for key in ("attached", "transfer", "total"):
        v = [x[key] for x in joins]
        print(f"{tag:8} {key:9} median {statistics.median(v):7.1f}  "
              f"min {min(v):7.1f}  max {max(v):7.1f} ms")
