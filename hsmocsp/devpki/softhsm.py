"""SoftHSM2 token and key management for development and tests.

Small functions over ``pkcs11-tool`` (OpenSC) that other code and tests share: make a
file-backed SoftHSM token in a directory of its own, make key pairs in it idempotently
and read their public halves. Every function takes the ``softhsm2.conf`` path explicitly
and passes it to the child process as ``SOFTHSM2_CONF``; nothing here changes
``os.environ``, so tests with different tokens can run in one process.

PINs travel to ``pkcs11-tool`` through the child's environment (``--pin env:VAR``, which
OpenSC 0.22+ understands), never on its command line.
"""

from __future__ import annotations

import os
import re
import sysconfig
import tempfile
from dataclasses import dataclass
from pathlib import Path

from hsmocsp.devpki.tools import DevPkiError, MissingToolError, run

#: Where SoftHSM2's PKCS#11 module lives on Debian and friends, most likely first.
MODULE_CANDIDATES: tuple[str, ...] = (
    "/usr/lib/softhsm/libsofthsm2.so",
    "/usr/lib/{multiarch}/softhsm/libsofthsm2.so",
    "/usr/lib64/softhsm/libsofthsm2.so",
    "/usr/local/lib/softhsm/libsofthsm2.so",
    "/usr/lib/{multiarch}/libsofthsm2.so",
)

#: Names of the child-environment variables that carry PINs to pkcs11-tool.
PIN_ENV = "HSMOCSP_DEVPKI_PIN"
SO_PIN_ENV = "HSMOCSP_DEVPKI_SO_PIN"

DEFAULT_TOKEN_LABEL = "hsmocsp-dev"

_KEY_TYPE = re.compile(r"^(rsa:\d{4}|EC:[A-Za-z0-9_-]+)$")
_KEY_ID = re.compile(r"^(?:[0-9a-fA-F]{2})+$")


@dataclass(frozen=True)
class TokenObject:
    """One object as ``pkcs11-tool --list-objects`` shows it."""

    kind: str  # "privkey", "pubkey", "cert", "data", "secrkey", or "other"
    key_type: str  # "RSA", "EC", ... or "" when not a key
    label: str
    id: str  # hex, lower case, "" when absent


def find_module() -> str:
    """Return the path of SoftHSM2's PKCS#11 module (``libsofthsm2.so``)."""
    multiarch = sysconfig.get_config_var("MULTIARCH") or "x86_64-linux-gnu"
    for candidate in MODULE_CANDIDATES:
        path = candidate.format(multiarch=multiarch)
        if os.path.isfile(path):
            return path
    raise MissingToolError("libsofthsm2.so not found: install the Debian package 'softhsm2'")


def env_with(conf: Path, **extra: str) -> dict[str, str]:
    """A copy of the environment with ``SOFTHSM2_CONF`` (absolute) and ``extra`` set."""
    env = dict(os.environ)
    env["SOFTHSM2_CONF"] = str(Path(conf).resolve())
    env.update(extra)
    return env


def conf_text(token_dir: Path) -> str:
    """The ``softhsm2.conf`` we write: file backend, one directory, quiet log."""
    return (
        "# written by hsmocsp-devpki\n"
        f"directories.tokendir = {token_dir.resolve()}\n"
        "objectstore.backend = file\n"
        "log.level = ERROR\n"
        "slots.removable = false\n"
    )


def _list_slots(conf: Path, module: str) -> list[dict[str, str]]:
    out = run(["pkcs11-tool", "--module", module, "--list-slots"], env=env_with(conf))
    slots: list[dict[str, str]] = []
    for line in out.decode("utf-8", "replace").splitlines():
        head = re.match(r"^Slot \d+ \((0x[0-9a-fA-F]+)\)", line)
        if head:
            slots.append({"slot": head.group(1)})
        elif slots and ":" in line and line.startswith(" "):
            key, _, value = line.partition(":")
            slots[-1][key.strip()] = value.strip()
    return slots


def ensure_token(directory: Path, label: str, pin: str, so_pin: str) -> Path:
    """Make ``directory/softhsm2.conf`` and a token ``label`` in ``directory/tokens``.

    Idempotent: an existing token with that label is kept (its PINs are not checked here;
    a wrong PIN shows up at the first login). Returns the conf path.
    """
    module = find_module()
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    token_dir = directory / "tokens"
    token_dir.mkdir(mode=0o700, exist_ok=True)
    conf = directory / "softhsm2.conf"
    text = conf_text(token_dir)
    if not conf.exists() or conf.read_text() != text:
        conf.write_text(text)

    env = env_with(conf, **{PIN_ENV: pin, SO_PIN_ENV: so_pin})
    secrets = (pin, so_pin)
    slots = _list_slots(conf, module)
    mine = [s for s in slots if s.get("token label") == label]
    if not mine:
        free = [s for s in slots if s.get("token state") == "uninitialized"]
        if not free:
            raise DevPkiError(f"no free SoftHSM slot in {token_dir} for token {label!r}")
        run(
            [
                "pkcs11-tool",
                "--module",
                module,
                "--slot",
                free[0]["slot"],
                "--init-token",
                "--label",
                label,
                "--so-pin",
                f"env:{SO_PIN_ENV}",
            ],
            env=env,
            secrets=secrets,
        )
        mine = [s for s in _list_slots(conf, module) if s.get("token label") == label]
        if not mine:
            raise DevPkiError(f"token {label!r} was initialised but is not listed")
    if "PIN initialized" not in mine[0].get("token flags", ""):
        run(
            [
                "pkcs11-tool",
                "--module",
                module,
                "--token-label",
                label,
                "--login",
                "--login-type",
                "so",
                "--so-pin",
                f"env:{SO_PIN_ENV}",
                "--init-pin",
                "--pin",
                f"env:{PIN_ENV}",
            ],
            env=env,
            secrets=secrets,
        )
    return conf


_KINDS = {
    "Private Key Object": "privkey",
    "Public Key Object": "pubkey",
    "Certificate Object": "cert",
    "Data object": "data",
    "Secret Key Object": "secrkey",
}


def _logged_in(conf: Path, module: str, pin: str, token_label: str, *args: str) -> bytes:
    """``pkcs11-tool`` logged in as user on ``token_label``; the PIN goes via the environment."""
    return run(
        ["pkcs11-tool", "--module", module, "--token-label", token_label,
         "--login", "--pin", f"env:{PIN_ENV}", *args],
        env=env_with(conf, **{PIN_ENV: pin}),
        secrets=(pin,),
    )  # fmt: skip


def list_objects(
    conf: Path, module: str, pin: str, *, token_label: str = DEFAULT_TOKEN_LABEL
) -> list[TokenObject]:
    """Every object in the token, logged in (so private keys are listed too)."""
    out = _logged_in(conf, module, pin, token_label, "--list-objects")
    found: list[dict[str, str]] = []
    for line in out.decode("utf-8", "replace").splitlines():
        if line and not line[0].isspace():
            name, _, rest = line.partition(";")
            kind = _KINDS.get(name.strip(), "other")
            words = rest.split()
            found.append(
                {"kind": kind, "key_type": words[0] if words else "", "label": "", "id": ""}
            )
        elif found and ":" in line:
            key, _, value = line.strip().partition(":")
            if key in ("label", "ID"):
                found[-1][key.lower()] = value.strip().lower() if key == "ID" else value.strip()
    return [TokenObject(o["kind"], o["key_type"], o["label"], o["id"]) for o in found]


def ensure_keypair(
    conf: Path,
    module: str,
    pin: str,
    label: str,
    key_id: str,
    key_type: str,
    *,
    token_label: str = DEFAULT_TOKEN_LABEL,
) -> None:
    """Make a key pair ``label`` with CKA_ID ``key_id`` (hex) unless it exists.

    ``key_type`` is pkcs11-tool's syntax: ``rsa:2048``, ``rsa:3072``, ``rsa:4096``,
    ``EC:prime256v1``, ``EC:secp384r1``. An existing pair with another ID or key family,
    or half a pair, is an error rather than silently replaced: keys are never deleted here.
    """
    if not _KEY_TYPE.match(key_type):
        raise DevPkiError(f"bad key type {key_type!r} (want e.g. rsa:2048 or EC:prime256v1)")
    if not _KEY_ID.match(key_id):
        raise DevPkiError(f"bad key id {key_id!r} (want hex digits, e.g. 11)")
    family = "RSA" if key_type.startswith("rsa:") else "EC"
    objs = [
        o
        for o in list_objects(conf, module, pin, token_label=token_label)
        if o.label == label and o.kind in ("privkey", "pubkey")
    ]
    if objs:
        kinds = sorted(o.kind for o in objs)
        if kinds != ["privkey", "pubkey"]:
            raise DevPkiError(
                f"token {token_label!r} has an incomplete key pair {label!r} ({kinds}); "
                "delete it and run again"
            )
        for o in objs:
            if o.id != key_id.lower() or o.key_type != family:
                raise DevPkiError(
                    f"token {token_label!r} has key {label!r} with id {o.id} type "
                    f"{o.key_type}, expected id {key_id.lower()} type {family}"
                )
        return
    _logged_in(
        conf, module, pin, token_label,
        "--keypairgen", "--key-type", key_type, "--id", key_id, "--label", label,
    )  # fmt: skip


def public_key_der(
    conf: Path, module: str, label: str, *, token_label: str = DEFAULT_TOKEN_LABEL
) -> bytes:
    """The DER SubjectPublicKeyInfo of the public key object ``label`` (no login needed)."""
    with tempfile.TemporaryDirectory(prefix="hsmocsp-pub-") as tmp:
        out = Path(tmp) / "pub.der"
        run(
            [
                "pkcs11-tool",
                "--module",
                module,
                "--token-label",
                token_label,
                "--read-object",
                "--type",
                "pubkey",
                "--label",
                label,
                "--output-file",
                str(out),
            ],
            env=env_with(conf),
        )
        if not out.exists():
            raise DevPkiError(f"no public key {label!r} in token {token_label!r}")
        return out.read_bytes()
