"""docs/configuration.md names every key the configuration reader accepts, and the
example configuration's keys are among them."""

from __future__ import annotations

import re
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]


def reader_keys() -> set[str]:
    source = (REPO / "hsmocsp" / "config.py").read_text()
    accessor = r"\b\w\.(?:string|req_str|number|integer|path|raw|sub|has)\(\s*\"(\w+)\""
    keys = set(re.findall(accessor, source))
    keys |= set(re.findall(r'_url_path\(\w, "(\w+)"', source))
    for stem in re.findall(r'\b\w\.secret\("(\w+)"', source):
        keys |= {f"{stem}_env", f"{stem}_file"}
    keys |= set(re.findall(r'_warning_days\(r, "(\w+)"\)', source))
    return keys


def documented() -> str:
    return (REPO / "docs" / "configuration.md").read_text()


def test_every_key_is_documented() -> None:
    keys = reader_keys()
    assert {"presign_rate", "password_env", "password_file", "cert_file", "key_file"} <= keys
    text = documented()
    missing = sorted(k for k in keys if not re.search(rf"\b{k}\b", text))
    assert not missing, f"not in docs/configuration.md: {missing}"


def _keys_of(data: object) -> set[str]:
    if isinstance(data, dict):
        out = set()
        for key, value in data.items():
            out.add(str(key))
            out |= _keys_of(value)
        return out
    return set()


def test_example_config_uses_documented_keys() -> None:
    data = yaml.safe_load((REPO / "etc" / "hsmocsp.yaml").read_text())
    names = _keys_of(data) - set(data["handles"]) - set(data.get("tokens", {}))
    unknown = sorted(k for k in names if k not in reader_keys())
    assert not unknown, unknown
