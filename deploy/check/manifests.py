"""deploy-check, static part: what the cluster and skaffold would refuse, found without them.

Renders the Helm chart (defaults and every documented override) and the kustomize trees,
validates every object strictly against the Kubernetes 1.29 and 1.33 schemas, then checks what
schemas cannot see: a volume with two sources (the API server: "may not specify more than 1
volume type"), a PodDisruptionBudget that allows no eviction for the replica count, a
Recreate strategy with rollingUpdate, a memory limit below what the config's caches need; in
the replicas topology, a server pod that could reach the token (PIN Secret, PKCS#11 module,
hostPath device or pcscd socket, PIN variable), a signer with more than one pod or a rolling
update, an autoscaler whose target has no CPU request or is the signer.
Validates deploy/skaffold.yaml against skaffold's JSON schema and resolves every path of every
profile from the repository root, where the docs run skaffold. Checks that every documented
image build names its --target.

    python manifests.py            (from deploy/check/run.sh: HELM, KUBECTL set)

The pure checks (``volume_problems`` ...) are also used by tests/unit/test_deploy.py.
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CHART = DEPLOY / "helm" / "hsmocsp"
CONTAINERFILE = DEPLOY / "container" / "Containerfile"
SKAFFOLD = DEPLOY / "skaffold.yaml"
KUBE_VERSIONS = ("1.29.0", "1.33.0")
#: Profiles the seed had (dev, debug) plus helm.
SKAFFOLD_PROFILES = {"dev", "debug", "helm"}

#: Memory a pod needs besides its cached responses (main process, signing workers, Python,
#: OpenSSL): measured ~65 MB RSS for the main process alone with a file signer, plus the
#: PKCS#11 worker processes; rounded up.
BASE_MEMORY = 256 * 2**20
#: Per cached response (README: ~2 KB measured with an RSA-2048 responder certificate).
PER_RESPONSE = 2 * 2**10
DEFAULT_MAX_CACHED = 1_000_000
#: Answers ``unknown`` have their own LRU per handle, in the main process only.
DEFAULT_MAX_UNKNOWN_CACHED = 10_000
#: A server replica (``--role server``): one Python process, no signing workers, no source
#: (65 MiB RSS idle in bench.replicas), rounded up.
SERVER_BASE_MEMORY = 128 * 2**20
#: Its bounded hot cache (config ``hot_cache_entries``), per HTTP process: ~2.8 KB per entry
#: measured (response, CertID key, request memo; RSA-2048 responder certificate).
DEFAULT_HOT_CACHE_ENTRIES = 100_000
PER_HOT_ENTRY = 2900

#: Fields of a Volume that are not its source.
VOLUME_NON_SOURCE = {"name"}


@dataclass(frozen=True)
class Render:
    """One way to render the manifests, as the docs tell users to."""

    name: str
    argv: tuple[str, ...]  # relative to the repository root; {helm}/{kubectl}/{kube} filled in


def _helm(name: str, *extra: str) -> Render:
    return Render(
        f"helm {name}",
        ("{helm}", "template", "hsmocsp", "deploy/helm/hsmocsp", "-n", "hsmocsp",
         "--kube-version", "{kube}", *extra),
    )


RENDERS = (
    _helm("defaults"),
    # The override values.yaml's own comment shows, and a PVC for the state.
    _helm("pkcs11.volume hostPath", "--set", "pkcs11.volume.hostPath.path=/opt/vendor/pkcs11",
          "--set", "pkcs11.volume.hostPath.type=Directory"),
    _helm("dataVolume PVC", "--set", "dataVolume.persistentVolumeClaim.claimName=hsmocsp-data"),
    _helm("one replica", "--set", "replicaCount=1"),
    _helm("Recreate", "--set", "strategy.type=Recreate"),
    _helm("values-nitrokey", "-f", "deploy/helm/values-nitrokey.yaml"),
    _helm("values-network-hsm", "-f", "deploy/helm/values-network-hsm.yaml"),
    # Topology replicas: one signer, N servers, Redis by address or Sentinel.
    _helm("topology replicas", "--set", "topology=replicas",
          "--set", "redis.address=redis.example:6379"),
    _helm("values-nitrokey + values-replicas", "-f", "deploy/helm/values-nitrokey.yaml",
          "-f", "deploy/helm/values-replicas.yaml"),
    _helm("replicas, TLS, ACL user, no autoscaler", "-f", "deploy/helm/values-replicas.yaml",
          "--set", "server.autoscaling.enabled=false", "--set", "redis.tls.enabled=true",
          "--set", "redis.tls.existingSecret=redis-tls", "--set", "redis.tls.certKey=tls.crt",
          "--set", "redis.tls.keyKey=tls.key", "--set", "redis.tls.serverName=redis.example"),
    Render("kustomize deploy/k8s", ("{kubectl}", "kustomize", "deploy/k8s")),
    Render("kustomize overlays/dev", ("{kubectl}", "kustomize", "deploy/k8s/overlays/dev")),
    Render("kustomize overlays/debug", ("{kubectl}", "kustomize", "deploy/k8s/overlays/debug")),
    Render("kustomize overlays/nitrokey",
           ("{kubectl}", "kustomize", "deploy/k8s/overlays/nitrokey")),
    Render("kustomize replicas", ("{kubectl}", "kustomize", "deploy/k8s/replicas")),
    Render("kustomize overlays/replicas-dev",
           ("{kubectl}", "kustomize", "deploy/k8s/overlays/replicas-dev")),
    Render("kustomize overlays/replicas-hpa",
           ("{kubectl}", "kustomize", "deploy/k8s/overlays/replicas-hpa")),
)


# --- checks schemas cannot make -----------------------------------------------------------


def deployments(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if o.get("kind") == "Deployment"]


def volume_problems(objects: list[dict[str, Any]]) -> list[str]:
    """Volumes with no source or more than one (the API server rejects both)."""
    problems = []
    for dep in deployments(objects):
        for vol in dep["spec"]["template"]["spec"].get("volumes", []):
            sources = sorted(
                k for k, v in vol.items() if k not in VOLUME_NON_SOURCE and v is not None
            )
            if len(sources) != 1:
                problems.append(
                    f"Deployment {dep['metadata']['name']}: volume {vol['name']} has "
                    f"{len(sources)} sources ({', '.join(sources) or 'none'}); exactly one allowed"
                )
    return problems


def _pods(value: int | str, replicas: int) -> int:
    """A PDB count: an integer, or a percentage of the replicas rounded up."""
    if isinstance(value, str) and value.endswith("%"):
        return -(-replicas * int(value[:-1]) // 100)
    return int(value)


def pdb_problems(objects: list[dict[str, Any]]) -> list[str]:
    """PodDisruptionBudgets that allow no eviction for the Deployment they select."""
    problems = []
    for pdb in (o for o in objects if o.get("kind") == "PodDisruptionBudget"):
        selector = pdb["spec"]["selector"]["matchLabels"]
        matched = [
            d for d in deployments(objects)
            if selector.items() <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        if not matched:
            problems.append(f"PodDisruptionBudget {pdb['metadata']['name']} selects no Deployment")
        for dep in matched:
            replicas = dep["spec"].get("replicas", 1)
            spec = pdb["spec"]
            # Kubernetes rounds percentages up, for minAvailable and maxUnavailable alike.
            if "minAvailable" in spec:
                allowed = replicas - _pods(spec["minAvailable"], replicas)
            else:
                allowed = _pods(spec.get("maxUnavailable", 0), replicas)
            if allowed < 1:
                problems.append(
                    f"PodDisruptionBudget {pdb['metadata']['name']}: {replicas} replica(s) of "
                    f"{dep['metadata']['name']} and "
                    f"{ {k: v for k, v in spec.items() if k != 'selector'} } allow no eviction: "
                    "node drains hang"
                )
    return problems


def strategy_problems(objects: list[dict[str, Any]]) -> list[str]:
    problems = []
    for dep in deployments(objects):
        strategy = dep["spec"].get("strategy", {})
        if strategy.get("type") == "Recreate" and strategy.get("rollingUpdate") is not None:
            problems.append(
                f"Deployment {dep['metadata']['name']}: Recreate with rollingUpdate is rejected"
            )
    return problems


def parse_quantity(text: str | int) -> int:
    """A Kubernetes memory quantity in bytes (Ki/Mi/Gi/Ti and k/M/G/T)."""
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
             "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", str(text))
    if m is None or m.group(2) not in {*units, ""}:
        raise ValueError(f"not a memory quantity: {text!r}")
    return int(float(m.group(1)) * units.get(m.group(2), 1))


def role_of(dep: dict[str, Any]) -> str:
    """``all``, ``signer`` or ``server``: the ``--role`` its main container passes."""
    spec = dep["spec"]["template"]["spec"]
    main = next((c for c in spec["containers"] if c["name"] == "hsmocsp"), None)
    args = [*(main or {}).get("command", []), *(main or {}).get("args", [])]
    if "--role" in args[:-1]:
        return str(args[args.index("--role") + 1])
    return next((a.split("=", 1)[1] for a in args if a.startswith("--role=")), "all")


def needed_memory(config: dict[str, Any], role: str = "all") -> int:
    """What the responder's caches can grow to, plus the processes themselves.

    Every HTTP process holds a copy of the cached responses; the ``unknown`` answers stay in
    the main process. A server replica holds only its bounded hot cache.
    """
    workers = int(config.get("http_workers", 1))
    if role == "server":
        entries = int(config.get("hot_cache_entries", DEFAULT_HOT_CACHE_ENTRIES))
        return SERVER_BASE_MEMORY + PER_HOT_ENTRY * entries * workers
    handles = (config.get("handles") or {}).values()
    responses = sum(int(h.get("max_cached", DEFAULT_MAX_CACHED)) for h in handles)
    unknown = sum(int(h.get("max_unknown_cached", DEFAULT_MAX_UNKNOWN_CACHED)) for h in handles)
    return BASE_MEMORY + PER_RESPONSE * (responses * workers + unknown)


def _mounted_config(objects: list[dict[str, Any]], dep: dict[str, Any]) -> dict[str, Any] | None:
    spec = dep["spec"]["template"]["spec"]
    (main,) = [c for c in spec["containers"] if c["name"] == "hsmocsp"]
    mount = next((m for m in main["volumeMounts"] if m["mountPath"] == "/etc/hsmocsp"), None)
    if mount is None:
        return None
    vol = next(v for v in spec["volumes"] if v["name"] == mount["name"])
    name = vol.get("configMap", {}).get("name")
    cm = next((o for o in objects if o.get("kind") == "ConfigMap"
               and o["metadata"]["name"] == name), None)
    if cm is None:
        return None
    config: dict[str, Any] = yaml.safe_load(cm["data"]["hsmocsp.yaml"])
    return config


def memory_problems(objects: list[dict[str, Any]]) -> list[str]:
    """The responder's memory limit must hold what its config lets the caches grow to."""
    problems = []
    for dep in deployments(objects):
        if not _is_hsmocsp(dep):
            continue
        config = _mounted_config(objects, dep)
        if config is None:
            problems.append(f"Deployment {dep['metadata']['name']}: no config ConfigMap found")
            continue
        spec = dep["spec"]["template"]["spec"]
        (main,) = [c for c in spec["containers"] if c["name"] == "hsmocsp"]
        limit = main.get("resources", {}).get("limits", {}).get("memory")
        if limit is None:
            problems.append(f"Deployment {dep['metadata']['name']}: no memory limit")
            continue
        role = role_of(dep)
        need = needed_memory(config, role)
        if parse_quantity(limit) < need and role == "server":
            problems.append(
                f"Deployment {dep['metadata']['name']}: memory limit {limit} is below "
                f"{need / 2**20:.0f} MiB: 128 MiB + 2.9 KB x hot_cache_entries (default "
                f"100,000) x http_workers"
            )
        elif parse_quantity(limit) < need:
            problems.append(
                f"Deployment {dep['metadata']['name']}: memory limit {limit} is below "
                f"{need / 2**20:.0f} MiB: 256 MiB + 2 KiB x (max_cached (default 1,000,000 "
                f"per handle) x http_workers + max_unknown_cached (default 10,000 per handle))"
            )
    return problems


def _is_hsmocsp(dep: dict[str, Any]) -> bool:
    """A Deployment running the responder (not e.g. the dev overlay's Redis)."""
    return any(c["name"] == "hsmocsp" for c in dep["spec"]["template"]["spec"]["containers"])


def _under(path: str, mount: str) -> bool:
    return (path.rstrip("/") + "/").startswith(mount.rstrip("/") + "/")


def server_isolation_problems(objects: list[dict[str, Any]]) -> list[str]:
    """A server pod (``--role server``) must have no way to the token.

    No hostPath volume (a USB device, the node's pcscd socket, a module directory), no
    device resource or volumeDevice, no privileged container, and nothing mounted where the
    config's tokens look for their PIN file or PKCS#11 module, no ``pin_env`` variable.
    """
    problems = []
    for dep in deployments(objects):
        if not _is_hsmocsp(dep) or role_of(dep) != "server":
            continue
        name = f"Deployment {dep['metadata']['name']} (--role server)"
        spec = dep["spec"]["template"]["spec"]
        config = _mounted_config(objects, dep) or {}
        tokens = (config.get("tokens") or {}).values()
        token_paths = [str(t[k]) for t in tokens for k in ("pin_file", "module") if t.get(k)]
        pin_envs = {str(t["pin_env"]) for t in tokens if t.get("pin_env")}
        for vol in spec.get("volumes", []):
            if "hostPath" in vol:
                problems.append(f"{name}: hostPath volume {vol['name']} "
                                f"({vol['hostPath'].get('path')}): servers get no node device")
        for container in [*spec.get("initContainers", []), *spec["containers"]]:
            where = f"{name}, container {container['name']}"
            if container.get("securityContext", {}).get("privileged"):
                problems.append(f"{where}: privileged")
            if container.get("volumeDevices"):
                problems.append(f"{where}: volumeDevices")
            for kind in ("limits", "requests"):
                for res in container.get("resources", {}).get(kind, {}):
                    if res not in ("cpu", "memory", "ephemeral-storage") \
                            and not res.startswith("hugepages-"):
                        problems.append(f"{where}: device resource {res}")
            for mount in container.get("volumeMounts", []):
                for path in token_paths:
                    if _under(path, mount["mountPath"]):
                        problems.append(f"{where}: volume {mount['name']} at "
                                        f"{mount['mountPath']} holds the token's {path}")
            for env in container.get("env", []):
                if env["name"] in pin_envs:
                    problems.append(f"{where}: PIN variable {env['name']}")
    return problems


def signer_problems(objects: list[dict[str, Any]]) -> list[str]:
    """One signer pod per token, and never two at once (a rolling update starts the new
    pod before the old one stops)."""
    problems = []
    for dep in deployments(objects):
        if not _is_hsmocsp(dep) or role_of(dep) != "signer":
            continue
        name = f"Deployment {dep['metadata']['name']} (--role signer)"
        if dep["spec"].get("replicas", 1) != 1:
            problems.append(f"{name}: {dep['spec']['replicas']} replicas; one per token")
        if dep["spec"].get("strategy", {}).get("type") != "Recreate":
            problems.append(f"{name}: strategy must be Recreate (never two pods on a token)")
    for hpa in (o for o in objects if o.get("kind") == "HorizontalPodAutoscaler"):
        ref = hpa["spec"]["scaleTargetRef"]
        target = next((d for d in deployments(objects) if ref["kind"] == "Deployment"
                       and d["metadata"]["name"] == ref["name"]), None)
        name = f"HorizontalPodAutoscaler {hpa['metadata']['name']}"
        if target is None:
            problems.append(f"{name}: no Deployment {ref['name']}")
            continue
        if role_of(target) != "server":
            problems.append(f"{name}: scales {ref['name']}, which is not a server")
        for c in target["spec"]["template"]["spec"]["containers"]:
            if "cpu" not in c.get("resources", {}).get("requests", {}):
                problems.append(f"{name}: container {c['name']} of {ref['name']} has no CPU "
                                "request (utilisation cannot be computed)")
    return problems


def semantic_problems(objects: list[dict[str, Any]]) -> list[str]:
    return [
        *volume_problems(objects), *pdb_problems(objects), *strategy_problems(objects),
        *memory_problems(objects), *server_isolation_problems(objects),
        *signer_problems(objects),
    ]


# --- skaffold ------------------------------------------------------------------------------


def _overlay(base: Any, over: Any) -> Any:
    """skaffold's profile overlay: mappings merge field by field, anything else replaces."""
    if isinstance(base, dict) and isinstance(over, dict):
        out = dict(base)
        for key, value in over.items():
            out[key] = _overlay(base.get(key), value) if key in base else value
        return out
    return copy.deepcopy(over)


def _pointer(doc: Any, path: str) -> tuple[Any, str | int]:
    parts = [p.replace("~1", "/").replace("~0", "~") for p in path.lstrip("/").split("/")]
    node = doc
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node[part]
    last: str | int = int(parts[-1]) if isinstance(node, list) else parts[-1]
    return node, last


def apply_patches(doc: dict[str, Any], patches: list[dict[str, Any]]) -> dict[str, Any]:
    """JSON patch (replace/remove/add) as skaffold applies a profile's patches."""
    doc = copy.deepcopy(doc)
    for patch in patches:
        try:
            node, key = _pointer(doc, patch["path"])
            if patch["op"] in ("replace", "remove"):
                _ = node[key]  # an absent path is an error, as in skaffold
            if patch["op"] == "remove":
                del node[key]
            elif patch["op"] in ("replace", "add"):
                node[key] = patch["value"]
            else:
                raise ValueError(f"op {patch['op']} not handled here")
        except (KeyError, IndexError, ValueError, TypeError) as err:
            raise ValueError(f"patch {patch}: {err!r}") from err
    return doc


def skaffold_configs(cfg: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    """The default config and each profile applied to it (overlay first, then patches)."""
    base = {k: v for k, v in cfg.items() if k != "profiles"}
    yield "default", base
    for profile in cfg.get("profiles", []):
        fields = {k: v for k, v in profile.items()
                  if k not in ("name", "activation", "patches", "requiresAllActivations")}
        yield profile["name"], apply_patches(_overlay(base, fields), profile.get("patches", []))


def containerfile_stages(path: Path = CONTAINERFILE) -> list[str]:
    return re.findall(r"^FROM\s+\S+\s+AS\s+(\S+)", path.read_text(), re.M | re.I)


def skaffold_path_problems(cfg: dict[str, Any], cwd: Path = REPO) -> list[str]:
    """Every path of every profile, resolved from ``cwd`` as skaffold does."""
    problems = []
    names = {p["name"] for p in cfg.get("profiles", [])}
    if missing := SKAFFOLD_PROFILES - names:
        problems.append(f"skaffold.yaml: no profile {', '.join(sorted(missing))}")
    for name, c in skaffold_configs(cfg):
        where = f"skaffold profile {name}"
        for art in c.get("build", {}).get("artifacts", []):
            context = cwd / art.get("context", ".")
            if not context.is_dir():
                problems.append(f"{where}: build context {context} is not a directory")
                continue
            docker = art.get("docker", {})
            dockerfile = context / docker.get("dockerfile", "Dockerfile")
            if not dockerfile.is_file():
                problems.append(f"{where}: dockerfile {dockerfile} does not exist")
            elif docker.get("target") and docker["target"] not in containerfile_stages(dockerfile):
                problems.append(f"{where}: no stage {docker['target']} in {dockerfile}")
        for path in c.get("manifests", {}).get("kustomize", {}).get("paths", []):
            if not (cwd / path / "kustomization.yaml").is_file():
                problems.append(f"{where}: no kustomization.yaml in {cwd / path}")
        for pattern in c.get("manifests", {}).get("rawYaml", []):
            if not list(cwd.glob(pattern)):
                problems.append(f"{where}: rawYaml {pattern} matches nothing")
        for release in c.get("deploy", {}).get("helm", {}).get("releases", []):
            if not (cwd / release["chartPath"] / "Chart.yaml").is_file():
                problems.append(f"{where}: no chart at {cwd / release['chartPath']}")
            for values in release.get("valuesFiles", []):
                if not (cwd / values).is_file():
                    problems.append(f"{where}: values file {cwd / values} does not exist")
        manifests = c.get("manifests", {})
        if not (manifests.get("kustomize") or manifests.get("rawYaml")
                or c.get("deploy", {}).get("helm")):
            problems.append(f"{where}: deploys nothing")
    return problems


def skaffold_schema(api_version: str, *, download: bool = True) -> dict[str, Any]:
    """skaffold's published JSON schema for ``api_version`` (e.g. skaffold/v4beta11).

    From $SKAFFOLD_SCHEMAS, ../shared/skaffold-schemas beside the repository, the cache, or
    (``download``) https://skaffold.dev/schemas/, then cached. FileNotFoundError if none.
    """
    file = api_version.split("/")[-1] + ".json"
    cache = Path(os.environ.get("DEPLOY_CACHE", Path.home() / ".cache" / "hsmocsp-deploy"))
    dirs = [os.environ.get("SKAFFOLD_SCHEMAS"), REPO.parent / "shared" / "skaffold-schemas",
            cache / "skaffold-schemas"]
    for d in dirs:
        if d and (Path(d) / file).is_file():
            schema: dict[str, Any] = json.loads((Path(d) / file).read_text())
            return schema
    if not download:
        raise FileNotFoundError(f"no {file} in {', '.join(str(d) for d in dirs if d)}")
    url = f"https://skaffold.dev/schemas/{file}"
    with urllib.request.urlopen(url, timeout=30) as response:
        text = response.read().decode()
    (cache / "skaffold-schemas").mkdir(parents=True, exist_ok=True)
    (cache / "skaffold-schemas" / file).write_text(text)
    schema = json.loads(text)
    return schema


def skaffold_schema_problems(cfg: dict[str, Any], *, download: bool = True) -> list[str]:
    import jsonschema

    schema = skaffold_schema(cfg["apiVersion"], download=download)
    validator = jsonschema.Draft7Validator(schema)
    return [
        f"skaffold.yaml: {'/'.join(map(str, e.absolute_path)) or '(top)'}: {e.message}"
        for e in validator.iter_errors(cfg)
    ]


# --- documented builds name their target ----------------------------------------------------

BUILD_COMMAND = re.compile(r"(docker|podman)\s+build\b|buildah\s+(bud|build)\b")


def build_command_problems(files: list[Path]) -> list[str]:
    """Every documented image build names --target (else it builds the last stage)."""
    stages = containerfile_stages()
    problems = []
    if stages[-1] != "runtime":
        problems.append(f"Containerfile: the last stage is {stages[-1]}, not runtime")
    for file in files:
        name = file.relative_to(REPO) if file.is_relative_to(REPO) else file
        lines = file.read_text().splitlines()
        number = 0
        while number < len(lines):
            start, line = number + 1, lines[number]
            while line.endswith("\\") and number + 1 < len(lines):  # continuation lines
                number += 1
                line = line[:-1] + " " + lines[number].lstrip("# ")
            number += 1
            if not BUILD_COMMAND.search(line):
                continue
            m = re.search(r"--target[= ](\S+)", line)
            if m is None:
                problems.append(f"{name}:{start}: build without --target")
            elif m.group(1) not in stages:
                problems.append(f"{name}:{start}: no stage {m.group(1)}")
    return problems


def documented_files() -> list[Path]:
    return [
        REPO / "README.md", REPO / "docs" / "deploy.md", CONTAINERFILE,
        *sorted(DEPLOY.rglob("kustomization.yaml")), SKAFFOLD,
        *sorted((DEPLOY / "helm").glob("values-*.yaml")),
    ]


# --- driver --------------------------------------------------------------------------------


def _run(argv: list[str]) -> str:
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {done.stderr.strip()}")
    return done.stdout


def main() -> int:
    import kubernetes_validate

    helm, kubectl = os.environ["HELM"], os.environ["KUBECTL"]
    problems: list[str] = []
    for kube in KUBE_VERSIONS:
        short = ".".join(kube.split(".")[:2])
        for render in RENDERS:
            argv = [a.format(helm=helm, kubectl=kubectl, kube=short) for a in render.argv]
            if render.argv[0] == "{helm}":
                try:
                    _run([helm, "lint", "--strict", "--quiet", "--kube-version", short,
                          argv[3], *argv[8:]])
                except RuntimeError as err:
                    problems.append(f"{render.name}: helm lint: {err}")
            try:
                objects = [o for o in yaml.safe_load_all(_run(argv)) if o]
            except RuntimeError as err:
                problems.append(f"{render.name}: {err}")
                continue
            found = []
            for obj in objects:
                try:
                    kubernetes_validate.validate(obj, kube, strict=True)
                except kubernetes_validate.ValidationError as err:
                    found.append(f"{obj['kind']}/{obj['metadata']['name']}: {err.message}")
            found += semantic_problems(objects)
            problems += [f"[{kube}] {render.name}: {p}" for p in found]
            print(f"   {'ok' if not found else 'FAIL'}: [{kube}] {render.name}: "
                  f"{len(objects)} objects", file=sys.stderr)
    cfg = yaml.safe_load(SKAFFOLD.read_text())
    try:
        found = skaffold_schema_problems(cfg)
    except OSError as err:
        found = [f"no skaffold schema for {cfg['apiVersion']} (set SKAFFOLD_SCHEMAS to a "
                 f"directory of skaffold's docs-v2/content/en/schemas/*.json): {err}"]
    found += skaffold_path_problems(cfg)
    problems += found
    print(f"   {'ok' if not found else 'FAIL'}: skaffold.yaml ({cfg['apiVersion']}, profiles "
          f"{', '.join(p['name'] for p in cfg['profiles'])}) from {REPO}", file=sys.stderr)
    found = build_command_problems(documented_files())
    problems += found
    print(f"   {'ok' if not found else 'FAIL'}: documented builds name --target", file=sys.stderr)
    for problem in problems:
        print(f"FAIL: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
