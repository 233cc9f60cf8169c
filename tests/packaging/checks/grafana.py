"""The Grafana dashboards against the truth of a real daemon run: its /metrics text and the OTLP
metrics it sent, renamed by the OpenTelemetry-to-Prometheus rules."""

import json
import re
from pathlib import Path

import yaml

from .common import ROOT, check

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
