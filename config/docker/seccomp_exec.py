#!/usr/bin/env python3
"""Runs a command under a seccomp profile in Docker's JSON format, as a
container runtime would (libseccomp through pyseccomp), so that the
profile can be tried without a container:

    seccomp_exec.py config/docker/seccomp-rstmdb.json -- rstmdb --config ...

`make deploy-check` runs the cluster's black-box tests with every server
started this way (RSTMDB_TEST_WRAPPER): a system call the profile lacks
fails with EPERM, and a test with it.
"""
import errno
import json
import os
import sys

import pyseccomp as seccomp


def load(path):
    profile = json.load(open(path))
    assert profile["defaultAction"] == "SCMP_ACT_ERRNO"
    f = seccomp.SyscallFilter(seccomp.ERRNO(profile.get("defaultErrnoRet", errno.EPERM)))
    for rule in profile["syscalls"]:
        assert rule["action"] == "SCMP_ACT_ALLOW"
        for name in rule["names"]:
            try:
                f.add_rule(seccomp.ALLOW, name)
            except Exception:  # a name this architecture does not have
                pass
    f.load()


def main(argv):
    profile, sep, *cmd = argv
    assert sep == "--" and cmd, "usage: seccomp_exec.py PROFILE -- COMMAND [ARGS]"
    load(profile)
    os.execv(cmd[0], cmd)


if __name__ == "__main__":
    main(sys.argv[1:])
