#!/usr/bin/env python3
"""Offline checks of the deployment files (`make deploy-check`):

* the Kubernetes manifests against the Kubernetes API schemas
  (kubernetes-validate, which carries them), plus what this cluster needs
  of them: pods started in parallel, peers published before they are ready,
  readiness on /health, a read-only root, the seccomp profile and
  CAP_IPC_LOCK only;
* the seccomp profile: valid JSON in the runtime's format, denying by
  default and allowing the io_uring calls;
* the compose files: three nodes with one configuration each, the profile
  and the memlock limit.

Nothing here runs a container: a Kubernetes cluster, Docker's daemon and
its compose plugin are not available where this was written.
"""
import json
import pathlib
import subprocess
import sys

import yaml

ROOT = pathlib.Path(__file__).resolve().parent.parent
K8S = ROOT / "config" / "kubernetes" / "rstmdb-cluster.yaml"
SECCOMP = ROOT / "config" / "docker" / "seccomp-rstmdb.json"
COMPOSE = ROOT / "config" / "docker" / "compose-cluster.yaml"
K8S_VERSION = "1.30.0"

failures = []


def check(ok, what):
    print(("ok   " if ok else "FAIL ") + what)
    if not ok:
        failures.append(what)


def kubernetes():
    r = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict",
         "--kubernetes-version", K8S_VERSION, str(K8S)],
        capture_output=True, text=True)
    print(r.stdout.strip())
    check(r.returncode == 0, f"{K8S.name} validates against Kubernetes {K8S_VERSION} (strict)")
    docs = {d["kind"]: d for d in yaml.safe_load_all(K8S.read_text()) if d}
    sts = docs["StatefulSet"]["spec"]
    pod = sts["template"]["spec"]
    c = pod["containers"][0]
    check(sts["podManagementPolicy"] == "Parallel", "pods start in parallel")
    check(sts["serviceName"] == "rstmdb-peers", "peers through the headless service")
    check(docs["Service"]["spec"]["selector"]["app.kubernetes.io/name"] == "rstmdb", "services select the pods")
    peers = [d for d in yaml.safe_load_all(K8S.read_text()) if d and d["metadata"]["name"] == "rstmdb-peers"][0]
    check(peers["spec"].get("publishNotReadyAddresses") is True, "peers published before ready")
    check(c["readinessProbe"]["httpGet"]["path"] == "/health", "readiness is /health")
    sc = c["securityContext"]
    check(sc["readOnlyRootFilesystem"] is True, "read-only root filesystem")
    check(sc["capabilities"] == {"drop": ["ALL"], "add": ["IPC_LOCK"]}, "only CAP_IPC_LOCK")
    prof = pod["securityContext"]["seccompProfile"]
    check(prof == {"type": "Localhost", "localhostProfile": "profiles/rstmdb.json"}, "the seccomp profile")
    conf = yaml.safe_load(docs["ConfigMap"]["data"]["rstmdb.yaml"])
    check(conf["storage"]["data_dir"] == "/data"
          and any(m["mountPath"] == "/data" for m in c["volumeMounts"]), "writes only to the data volume")
    names = [f"rstmdb-{i}" for i in range(sts["replicas"])]
    check([p.split("=")[1].split(".")[0] for p in conf["cluster"]["peers"]] == names,
          "one peer per pod, named after it")


def seccomp():
    p = json.loads(SECCOMP.read_text())
    allowed = set(p["syscalls"][0]["names"])
    check(p["defaultAction"] == "SCMP_ACT_ERRNO", "seccomp denies by default")
    check({"io_uring_setup", "io_uring_enter", "io_uring_register"} <= allowed, "seccomp allows io_uring")
    check(not ({"ptrace", "kexec_load", "init_module", "bpf", "mount", "unshare", "setns"} & allowed),
          "seccomp allows nothing that escapes a container")


def compose():
    doc = yaml.safe_load(COMPOSE.read_text())
    nodes = doc["services"]
    check(sorted(nodes) == ["node1", "node2", "node3"], "compose: three nodes")
    for name, s in nodes.items():
        env = s["environment"]
        check(s["hostname"] == name and f"={name}:7501" in env["RSTMDB_CLUSTER_PEERS"],
              f"compose: {name} finds its id by its host name")
        check("seccomp=seccomp-rstmdb.json" in s["security_opt"], f"compose: {name} has the profile")
        check(s["ulimits"]["memlock"]["soft"] == -1, f"compose: {name} may lock memory")


if __name__ == "__main__":
    kubernetes()
    seccomp()
    compose()
    if failures:
        sys.exit(f"{len(failures)} check(s) failed")
    print("deployment files: all checks passed")
