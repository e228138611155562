#!/usr/bin/env python3
"""Renders docker-default.json (moby's profiles/seccomp/default.json) into the
OCI `linux.seccomp` object Docker/containerd would put in config.json for an
amd64 container with Docker's default capabilities on a 6.12 kernel:
seccomp-docker-default.json. Run from this directory."""
import json

CAPS = {"CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD",
        "CAP_NET_RAW", "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP",
        "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE"}
ARCH = "amd64"
KERNEL = (6, 12)


def version(s):
    return tuple(int(x) for x in s.split("."))


d = json.load(open("docker-default.json"))
out = {"defaultAction": d["defaultAction"], "defaultErrnoRet": d["defaultErrnoRet"],
       "architectures": [], "syscalls": []}
for a in d["archMap"]:
    if a["architecture"] == "SCMP_ARCH_X86_64":
        out["architectures"] = [a["architecture"]] + a["subArchitectures"]
for r in d["syscalls"]:
    inc, exc = r.get("includes", {}), r.get("excludes", {})
    if inc.get("arches") and ARCH not in inc["arches"]:
        continue
    if inc.get("caps") and not set(inc["caps"]) <= CAPS:
        continue
    if inc.get("minKernel") and version(inc["minKernel"]) > KERNEL:
        continue
    if exc.get("arches") and ARCH in exc["arches"]:
        continue
    if exc.get("caps") and set(exc["caps"]) & CAPS:
        continue
    rule = {"names": r["names"], "action": r["action"]}
    for k in ("errnoRet", "args"):
        if k in r:
            rule[k] = r[k]
    out["syscalls"].append(rule)
json.dump(out, open("seccomp-docker-default.json", "w"), indent=1)
