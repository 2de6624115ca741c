"""Run a rendered Deployment's pod the way the kubelet would, without a cluster (deploy-check).

Reads the objects ``kubectl kustomize`` printed, takes the one Deployment and its
ConfigMaps, and runs the pod's containers with ``run-image.sh`` (read-only image root, the
container's user, only the declared environment) in one private network namespace, so the
pod's ``127.0.0.1`` is its own as in Kubernetes: init containers in order, a native sidecar
(``restartPolicy: Always``) left running once its startup probe passes, then the containers,
then the readiness probe. Volumes: ``configMap`` from the rendered ConfigMap, ``emptyDir`` as
a directory owned by the pod's user and fsGroup; anything else is refused (the dev pod needs
none). Then ``CHECK...`` runs inside the pod's network namespace with ``$POD_VOLUMES`` naming
the volumes' directory; the pod is stopped and its logs checked (no traceback, no
plugin-cache write, no secret from a volume).

    python pod.py RENDERED.yaml WORKDIR IMAGE_MAP -- CHECK...

IMAGE_MAP is ``name:tag=local-image[,...]``: the manifest's image names to built images.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import yaml

HERE = Path(__file__).resolve().parent
RUN_IMAGE = HERE / "run-image.sh"
#: Lines that must never be in a container log.
BAD_LOG_LINES = ("Unable to write to plugin cache", "Traceback (most recent call last)")


def rss(session: int) -> int:
    """Resident memory of every process in a session (a container started with setsid)."""
    total = 0
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or os.getsid(int(proc.name)) != session:
                continue
            status = (proc / "status").read_text()
        except (OSError, ProcessLookupError):
            continue
        m = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
        total += int(m.group(1)) * 1024 if m else 0
    return total


class PodError(Exception):
    """The pod cannot run here or did not come up."""


class Pod:
    def __init__(self, objects: list[dict[str, Any]], work: Path, images: dict[str, str]):
        (self.deployment,) = [o for o in objects if o["kind"] == "Deployment"]
        self.configmaps = {o["metadata"]["name"]: o for o in objects if o["kind"] == "ConfigMap"}
        self.spec: dict[str, Any] = self.deployment["spec"]["template"]["spec"]
        self.work = work
        self.images = images
        self.netns = f"hsmocsp-check-{os.getpid()}"
        self.volumes: dict[str, Path] = {}
        self.running: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.secrets: list[str] = []

    # --- set-up ------------------------------------------------------------------------

    def make_volumes(self) -> None:
        psc = self.spec.get("securityContext", {})
        uid, gid = psc.get("runAsUser", 0), psc.get("fsGroup", psc.get("runAsGroup", 0))
        for vol in self.spec.get("volumes", []):
            path = self.work / "volumes" / vol["name"]
            path.mkdir(parents=True)
            if "configMap" in vol:
                cm = self.configmaps.get(vol["configMap"]["name"])
                if cm is None:
                    raise PodError(f"volume {vol['name']}: no ConfigMap {vol['configMap']['name']}")
                for key, text in cm.get("data", {}).items():
                    (path / key).write_text(text)
                    (path / key).chmod(0o644)
                path.chmod(0o755)
            elif "emptyDir" in vol:
                os.chown(path, uid, gid)
                path.chmod(0o2770)
            else:
                raise PodError(f"volume {vol['name']}: only configMap and emptyDir run here")
            self.volumes[vol["name"]] = path

    def image(self, container: dict[str, Any]) -> str:
        try:
            return self.images[container["image"]]
        except KeyError:
            name, image = container["name"], container["image"]
            raise PodError(f"{name}: no built image for {image}") from None

    def argv(self, container: dict[str, Any], command: list[str] | None = None) -> list[str]:
        sc = {**self.spec.get("securityContext", {}), **container.get("securityContext", {})}
        if not sc.get("runAsNonRoot") or not sc.get("readOnlyRootFilesystem"):
            raise PodError(f"{container['name']}: not runAsNonRoot with a read-only root")
        argv = ["ip", "netns", "exec", self.netns, str(RUN_IMAGE), self.image(container)]
        if "runAsUser" in sc:
            argv += ["-u", f"{sc['runAsUser']}:{sc.get('runAsGroup', sc['runAsUser'])}"]
        for m in container.get("volumeMounts", []):
            if "subPath" in m:
                raise PodError(f"{container['name']}: subPath is not supported here")
            ro = ":ro" if m.get("readOnly") else ""
            argv += ["-v", f"{self.volumes[m['name']]}:{m['mountPath']}{ro}"]
        for e in container.get("env", []):
            if "value" not in e:
                raise PodError(f"{container['name']}: env {e['name']}: only plain values here")
            argv += ["-e", f"{e['name']}={e['value']}"]
        if command is not None:
            argv += ["--", *command]
        elif "command" in container:
            argv += ["--", *container["command"], *container.get("args", [])]
        elif "args" in container:
            argv += ["-a", "--", *container["args"]]
        return argv

    # --- running -----------------------------------------------------------------------

    def start(self, container: dict[str, Any]) -> subprocess.Popen[bytes]:
        log = (self.work / "logs" / f"{container['name']}.log").open("wb")
        proc = subprocess.Popen(
            self.argv(container), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.running.append((container["name"], proc))
        return proc

    def wait_exec_probe(self, container: dict[str, Any], probe: dict[str, Any]) -> None:
        deadline = time.monotonic() + probe.get("periodSeconds", 10) * probe.get(
            "failureThreshold", 3
        )
        while time.monotonic() < deadline:
            self.alive(container["name"])
            done = subprocess.run(
                self.argv(container, probe["exec"]["command"]), capture_output=True, check=False
            )
            if done.returncode == 0:
                return
            time.sleep(probe.get("periodSeconds", 10))
        raise PodError(f"{container['name']}: startup probe never passed")

    def wait_http_probe(
        self, container: dict[str, Any], probe: dict[str, Any], limit: float
    ) -> None:
        ports = {p["name"]: p["containerPort"] for p in container.get("ports", [])}
        port = probe["httpGet"]["port"]
        url = f"http://127.0.0.1:{ports.get(port, port)}{probe['httpGet']['path']}"
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            self.alive(container["name"])
            done = subprocess.run(
                ["ip", "netns", "exec", self.netns, "curl", "-fsS", "-o", "/dev/null", url],
                capture_output=True, check=False,
            )
            if done.returncode == 0:
                return
            time.sleep(1)
        raise PodError(f"{container['name']}: {url} did not answer 200 within {limit:.0f} s")

    def alive(self, name: str) -> None:
        for n, proc in self.running:
            if n == name and proc.poll() is not None:
                raise PodError(f"{name} exited with status {proc.returncode}: see its log")

    def run(self, check: list[str]) -> int:
        (self.work / "logs").mkdir(parents=True)
        self.make_volumes()
        subprocess.run(["ip", "netns", "add", self.netns], check=True)
        try:
            subprocess.run(
                ["ip", "netns", "exec", self.netns, "ip", "link", "set", "lo", "up"], check=True
            )
            for init in self.spec.get("initContainers", []):
                print(f"   init container {init['name']}", file=sys.stderr)
                if init.get("restartPolicy") == "Always":
                    self.start(init)
                    if "startupProbe" in init:
                        self.wait_exec_probe(init, init["startupProbe"])
                    continue
                log = (self.work / "logs" / f"{init['name']}.log").open("wb")
                done = subprocess.run(self.argv(init), stdout=log, stderr=subprocess.STDOUT)
                if done.returncode != 0:
                    raise PodError(f"init container {init['name']} failed ({done.returncode})")
            for container in self.spec["containers"]:
                print(f"   container {container['name']}", file=sys.stderr)
                self.start(container)
            for container in self.spec["containers"]:
                startup = container.get("startupProbe", {})
                limit = startup.get("periodSeconds", 10) * startup.get("failureThreshold", 3)
                if "readinessProbe" in container:
                    self.wait_http_probe(container, container["readinessProbe"], max(limit, 60))
            env = {**os.environ, "POD_VOLUMES": str(self.work / "volumes")}
            status = subprocess.run(
                ["ip", "netns", "exec", self.netns, *check], env=env, check=False
            ).returncode
            for name, proc in self.running:
                print(f"   memory: {name}: {rss(proc.pid) / 2**20:.0f} MiB RSS in all its "
                      "processes", file=sys.stderr)
            return status
        finally:
            self.stop()
            subprocess.run(["ip", "netns", "delete", self.netns], check=False)

    def stop(self) -> None:
        for _, proc in reversed(self.running):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()

    def check_logs(self, secret_files: list[Path]) -> list[str]:
        secrets = [p.read_text().strip() for p in secret_files if p.is_file()]
        problems = []
        for log in sorted((self.work / "logs").glob("*.log")):
            text = log.read_text(errors="replace")
            problems += [f"{log.name}: {bad!r}" for bad in BAD_LOG_LINES if bad in text]
            problems += [f"{log.name}: a secret is in the log" for s in secrets if s and s in text]
        return problems


def main(argv: list[str]) -> int:
    rendered, work, image_map = Path(argv[0]), Path(argv[1]), argv[2]
    check = argv[argv.index("--") + 1 :]
    images = dict(pair.split("=", 1) for pair in image_map.split(","))
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    objects = [o for o in yaml.safe_load_all(rendered.read_text()) if o]
    pod = Pod(objects, work, images)
    try:
        status = pod.run(check)
    except PodError as err:
        print(f"FAIL: pod: {err} (logs: {work / 'logs'})", file=sys.stderr)
        for log in sorted((work / "logs").glob("*.log")):
            print(f"--- {log.name}", file=sys.stderr)
            print("\n".join(log.read_text(errors="replace").splitlines()[-15:]), file=sys.stderr)
        return 1
    secret_names = ("pin", "root-token", "token")
    secret_files = [p for p in (work / "volumes").rglob("*") if p.name in secret_names]
    problems = pod.check_logs(secret_files)
    for problem in problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    return status or (1 if problems else 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
