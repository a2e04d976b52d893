#!/usr/bin/env python3
"""Checks the deployment recipes without a Docker engine.

usage: deploy_check.py STDIO_SSE_BIN

- Dockerfile: a multi-stage build whose final stage is FROM scratch holding only the
  binary, built with build.sh's flags, non-root, the demo server as the default command,
  and a HEALTHCHECK that is the binary's own --probe.
- contrib/Dockerfile.node and contrib/Dockerfile.python: the binary layered onto
  node:22-alpine and python:3.12-alpine, wrapping a server installed at build time.
- docker-compose.yml: health check on /readyz, restart policy, read-only root, resource
  limits, the token from an env file. Then, for real: stdio-sse runs with the compose
  environment and the example env file, and both health checks (compose's and the
  Dockerfile's) are executed against it and must pass.
Prints one line and exits 0 when all holds.
"""
import json
import os
import re
import subprocess
import sys
import time

import yaml

BIN = sys.argv[1]
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def fail(msg):
    raise SystemExit("FAIL: " + msg)


def stages(path):
    """[(FROM line, [instructions])] of a Dockerfile, continuation lines joined."""
    text = open(os.path.join(ROOT, path)).read().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if line.upper().startswith("FROM "):
            out.append((line, []))
        elif out:
            out[-1][1].append(line)
    return out


def instr(stage, name):
    return [i[len(name) + 1:].strip() for i in stage[1] if i.upper().startswith(name + " ")]


# --- Dockerfile -------------------------------------------------------------------------
st = stages("Dockerfile")
if len(st) < 2:
    fail("Dockerfile is not multi-stage")
final = st[-1]
if final[0].split()[1] != "scratch":
    fail("final stage is %r, not FROM scratch" % final[0])
copies = instr(final, "COPY")
if copies != ["--from=build /stdio-sse /stdio-sse"]:
    fail("the scratch stage must copy only the binary: %r" % copies)
if json.loads(instr(final, "ENTRYPOINT")[0]) != ["/stdio-sse"]:
    fail("ENTRYPOINT is not the binary alone (no COMMAND: the demo server)")
if instr(final, "CMD"):
    fail("a CMD would replace the demo server default")
user = instr(final, "USER")
if not user or user[0].split(":")[0] in ("0", "root"):
    fail("the image must not run as root: USER %r" % user)
health = instr(final, "HEALTHCHECK")
if not health or '"/stdio-sse", "--probe"' not in health[0]:
    fail("HEALTHCHECK must be the binary's --probe: %r" % health)
flags = re.search(r'RUSTFLAGS="([^"]+)"', " ".join(st[0][1]))
build_sh = open(os.path.join(ROOT, "build.sh")).read()
if not flags or flags.group(1) not in build_sh:
    fail("the image's RUSTFLAGS differ from build.sh's")

for path, base, server in (("contrib/Dockerfile.node", "node:22-alpine", "mcp-server-everything"),
                           ("contrib/Dockerfile.python", "python:3.12-alpine", "mcp-server-time")):
    s = stages(path)
    if s[-1][0].split()[1] != base:
        fail("%s: final stage is not %s" % (path, base))
    if not any(c.startswith("--from=bridge /stdio-sse ") for c in instr(s[-1], "COPY")):
        fail("%s does not layer the stdio-sse binary" % path)
    if server not in " ".join(instr(s[-1], "CMD")):
        fail("%s does not run %s" % (path, server))

# --- docker-compose.yml -------------------------------------------------------------------
compose = yaml.safe_load(open(os.path.join(ROOT, "docker-compose.yml")))
svc = compose["services"]["stdio-sse"]
test = svc["healthcheck"]["test"]
if test[:3] != ["CMD", "/stdio-sse", "--probe"] or not test[3].endswith("/readyz"):
    fail("compose health check is not --probe on /readyz: %r" % test)
if svc.get("restart") not in ("unless-stopped", "always", "on-failure"):
    fail("no restart policy")
if svc.get("read_only") is not True:
    fail("root file system is not read-only")
limits = svc["deploy"]["resources"]["limits"]
if not limits.get("memory") or not limits.get("cpus"):
    fail("no resource limits")
if svc["env_file"] != ["stdio-sse.env"]:
    fail("the token does not come from stdio-sse.env")
example = {}
for line in open(os.path.join(ROOT, "contrib/stdio-sse.env.example")):
    line = line.strip()
    if line and not line.startswith("#"):
        k, v = line.split("=", 1)
        example[k] = v
if "STDIO_SSE_AUTH_TOKEN" not in example:
    fail("the example env file sets no token")

# --- run it as compose would, and run both health checks ------------------------------------
env = {"PATH": os.environ["PATH"], **example, **{k: str(v) for k, v in svc["environment"].items()}}
env["STDIO_SSE_PORT"] = "0"
env["STDIO_SSE_AUTH_HEALTH"] = "true"  # the strictest case: the probe must bring the token
proc = subprocess.Popen([BIN], env=env, stderr=subprocess.PIPE, text=True)
try:
    port = None
    deadline = time.time() + 20
    lines = []
    while port is None and time.time() < deadline:
        line = proc.stderr.readline()
        if not line:
            break
        lines.append(line)
        rec = json.loads(line)  # STDIO_SSE_LOG_FORMAT=json from the compose file
        m = re.search(r"127\.0\.0\.1:(\d+)", rec.get("msg", "")) if rec["event"] == "listening" else None
        if m:
            port = m.group(1)
    if not port:
        fail("stdio-sse did not start: %s" % "".join(lines))
    compose_probe = [BIN] + [a.replace("8000", port) for a in test[2:]]
    r = subprocess.run(compose_probe, env=env, capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        fail("compose health check failed: %s %s" % (r.stdout, r.stderr))
    r = subprocess.run([BIN, "--probe"], env={**env, "STDIO_SSE_PORT": port}, capture_output=True, text=True, timeout=10)
    if r.returncode != 0:
        fail("Dockerfile HEALTHCHECK failed: %s %s" % (r.stdout, r.stderr))
    r = subprocess.run([BIN, "--probe"], env={"PATH": env["PATH"], "STDIO_SSE_PORT": port}, capture_output=True, text=True, timeout=10)
    if r.returncode == 0:
        fail("the probe passed without the token although --auth-health is on")
finally:
    proc.terminate()
    proc.wait(timeout=20)
print("scratch final stage, node and python layers, compose limits; both health checks pass with the env-file token")
