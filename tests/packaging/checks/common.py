"""What every packaging check shares: the failure list, and the keys the daemon's configuration
accepts (packaging/config.example.toml documents each one)."""

import re
from pathlib import Path

INSTALL_HINT = "run `python3 -m pip install -r tests/receivers/requirements.txt`"
ROOT = Path(__file__).resolve().parents[3]
# The [kubernetes] keys of the daemon's configuration contract (issue 10); every other key the
# chart writes must be documented in packaging/config.example.toml.
KUBERNETES_KEYS = {"enabled", "api_url", "token_file", "ca_file", "node_name", "pod_labels"}


failures = []


def fail(msg):
    failures.append(msg)
    print(f"FAIL: {msg}")


def check(cond, msg):
    if not cond:
        fail(msg)
    return cond


def documented_keys():
    """Dotted keys of packaging/config.example.toml, commented-out ones included."""
    text = (ROOT / "packaging/config.example.toml").read_text()
    keys, table = set(), ""
    for line in text.splitlines():
        line = line.strip().lstrip("#").strip()
        if m := re.fullmatch(r"\[([a-z_.]+)\]", line):
            table = m.group(1)
        elif m := re.match(r"([a-z_]+)\s*=", line):
            keys.add(f"{table}.{m.group(1)}")
    return keys


def config_keys(config, prefix=""):
    for k, v in config.items():
        dotted = f"{prefix}{k}"
        if isinstance(v, dict) and k not in ("headers", "attributes"):
            yield from config_keys(v, dotted + ".")
        else:
            yield dotted


def check_config(config, where):
    known = documented_keys()
    for key in config_keys(config):
        table, _, leaf = key.rpartition(".")
        if table == "kubernetes":
            check(leaf in KUBERNETES_KEYS, f"{where}: config key {key} is not in the [kubernetes] contract")
        else:
            check(key in known, f"{where}: config key {key} is not documented in packaging/config.example.toml")
    check(config.get("http", {}).get("listen", "").startswith("0.0.0.0:"),
          f"{where}: the agent must listen on the pod's addresses for the probes")
