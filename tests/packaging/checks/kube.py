"""The Helm chart and the plain manifests: rendered by Helm's own engine (PyPI helm-python-sdk),
every object validated strictly against the Kubernetes schemas (PyPI kubernetes-validate), and what
the DaemonSet, its RBAC and its configuration must be."""

import tomllib

import helm_python
import kubernetes_validate
import yaml

from .common import ROOT, check, check_config, fail

CHART = ROOT / "packaging/helm/profiler-agent"
MANIFESTS = ROOT / "packaging/kubernetes"
K8S_VERSION = "1.33"
# Found by packaging/systemd's drop-one-at-a-time test (/tmp's capabilities note), see values.yaml.
CAPABILITIES = ["BPF", "PERFMON", "SYS_PTRACE", "DAC_READ_SEARCH", "SYSLOG"]


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
