#!/usr/bin/env python3
"""Builds seccomp-rstmdb.json: an allow-list of the system calls the server
makes, from strace logs of real runs, plus the few a server may make on
paths those runs did not take (errors, signals, a crash report).

How the committed profile was made (see README, "Running in production"):

    cat > /tmp/stwrap.sh <<'SH'
    #!/bin/sh
    strace -f -qq -o /tmp/st/trace.$$ -p $$ 2>/dev/null &
    sleep 0.3
    exec "$@"
    SH
    chmod +x /tmp/stwrap.sh; mkdir -p /tmp/st
    RSTMDB_TEST_WRAPPER=/tmp/stwrap.sh cargo test --release --test cluster \\
        --test compaction --test watch --test security ...
    python3 config/docker/seccomp.py /tmp/st/trace.* > config/docker/seccomp-rstmdb.json

The wrapper lets strace attach to the shell that then becomes the server,
so signals (kill -9, SIGTERM) reach the server itself. Only calls made
after the server's execve count.
"""
import json
import re
import sys

# Calls a server may make on paths the recorded runs did not take. Each is
# harmless in a container (no new privileges, no kernel modules, no
# namespaces, no tracing).
EXTRA = {
    "io_uring_setup", "io_uring_enter", "io_uring_register",  # the point of it all
    "exit", "exit_group", "rt_sigreturn", "restart_syscall", "sigaltstack",
    "rt_sigaction", "rt_sigprocmask", "tgkill", "getpid", "gettid",
    "clock_gettime", "clock_nanosleep", "nanosleep", "sched_yield",
    "futex", "madvise", "mmap", "munmap", "mremap", "mprotect", "brk",
    "fsync", "fdatasync", "fallocate", "ftruncate", "statx", "newfstatat",
    "fstat", "lseek", "pread64", "pwrite64", "readv", "writev",
    "getrandom", "sched_getaffinity", "sched_setaffinity", "setpriority",
    "prctl", "membarrier", "rseq", "uname", "getcwd", "close", "openat",
    "renameat", "renameat2", "unlinkat", "mkdirat", "getdents64",
    "accept4", "shutdown", "getsockopt", "setsockopt", "getsockname",
    "getpeername", "epoll_create1", "epoll_ctl", "epoll_wait", "epoll_pwait",
    "eventfd2", "poll", "ppoll",
}

# What the container runtime calls between loading the profile and
# starting the server (runc loads it last when no-new-privileges is set,
# as both deployment files do): the exec itself and its Go runtime's
# housekeeping.
EXTRA |= {"execve", "execveat", "getppid", "close_range", "fchdir", "chdir", "capget"}

# The tracer's attach shows these; the server never makes them.
NEVER = {"ptrace", "wait4"}

SYSCALL = re.compile(r"^\d+\s+(?:<\.\.\. )?([a-z0-9_]+)[( ]")


def server_calls(path):
    """System calls in one trace, from the server's execve on."""
    seen, started = set(), False
    with open(path, errors="replace") as f:
        for line in f:
            if not started:
                started = "execve(" in line and "rstmdb" in line
                continue
            m = SYSCALL.match(line)
            if m and not line.split(None, 1)[1].startswith("---"):
                seen.add(m.group(1))
    return seen


def main(paths):
    names = set(EXTRA)
    for p in paths:
        names |= server_calls(p)
    names -= NEVER
    profile = {
        "defaultAction": "SCMP_ACT_ERRNO",
        "defaultErrnoRet": 1,
        "archMap": [
            {"architecture": "SCMP_ARCH_X86_64", "subArchitectures": ["SCMP_ARCH_X86", "SCMP_ARCH_X32"]},
            {"architecture": "SCMP_ARCH_AARCH64", "subArchitectures": ["SCMP_ARCH_ARM"]},
        ],
        "syscalls": [{"names": sorted(names), "action": "SCMP_ACT_ALLOW"}],
    }
    json.dump(profile, sys.stdout, indent=2)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main(sys.argv[1:])
