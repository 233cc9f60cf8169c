"""The Grafana dashboards against the truth of a real daemon run: its /metrics text and the OTLP
metrics it sent, renamed by the OpenTelemetry-to-Prometheus rules."""

import json
import re
from pathlib import Path

import yaml

from .common import ROOT, check, fail

# The OpenTelemetry-to-Prometheus translator's unit words (main unit, and after a `/`).
OTEL_UNITS = {"d": "days", "h": "hours", "min": "minutes", "s": "seconds", "ms": "milliseconds", "us": "microseconds",
              "ns": "nanoseconds", "By": "bytes", "KiBy": "kibibytes", "MiBy": "mebibytes", "GiBy": "gibibytes",
              "Hz": "hertz", "%": "percent", "1": ""}
OTEL_PER_UNITS = {"s": "second", "m": "minute", "h": "hour", "d": "day"}
PROMQL_WORDS = {"sum", "rate", "irate", "increase", "histogram_quantile", "histogram_count", "histogram_sum",
                "by", "without", "max", "min", "avg", "topk", "bottomk", "count", "on", "ignoring", "group_left",
                "group_right", "and", "or", "unless", "offset", "bool", "clamp_min", "clamp_max", "label_replace",
                "deriv", "delta", "abs", "vector", "scalar", "le", "time", "sort_desc", "max_over_time",
                "avg_over_time", "histogram_avg", "histogram_fraction"}


def prom_name(metric):
    """OTLP metric (from the receiver's JSON) -> its Prometheus series names, by the Collector's rules
    (prometheus exporter, add_metric_suffixes: true) as its translator applies them, and as
    profiler-agent/src/docs/metrics.rs documents them: the name's alphanumeric tokens joined by `_`;
    the unit's word unless the name has that token already (nothing for `1` or a `{annotation}`);
    `total` last on monotonic sums, `ratio` last on gauges of unit `1`."""
    tokens = [t for t in re.split(r"[^a-zA-Z0-9]+", metric["name"]) if t]
    unit = metric.get("unit", "").strip()
    main, _, per = (u.strip() for u in unit.partition("/"))
    kind = metric.get("type", "")
    main_word = OTEL_UNITS.get(main, main)
    if main_word and "{" not in main and "}" not in main and main_word not in tokens:
        tokens.append(main_word)
    per_word = OTEL_PER_UNITS.get(per, per)
    if per_word and "{" not in per and "}" not in per and per_word not in tokens:
        tokens += ["per", per_word]
    if kind == "sum" and metric.get("monotonic"):
        tokens = [t for t in tokens if t != "total"] + ["total"]
    if kind == "gauge" and unit == "1":
        tokens = [t for t in tokens if t != "ratio"] + ["ratio"]
    name = "_".join(tokens)
    if kind == "histogram":
        return {name + "_bucket", name + "_sum", name + "_count"}
    # An exponential histogram is one native histogram; histogram_quantile/_count/_sum() read it.
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


def walk_panels(panels):
    """Every panel, those inside (collapsed) rows included."""
    for p in panels:
        yield p
        yield from walk_panels(p.get("panels", []))


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


# Labels every per-process series carries once the Kubernetes metadata is on (issue 10's contract):
# they cannot appear in this test's daemon run, which has no API server.
K8S_LABELS = {"k8s_namespace_name", "k8s_pod_name", "k8s_container_name", "k8s_node_name", "container_id"}
# Labels Prometheus adds to every scraped series.
SCRAPE_LABELS = {"job", "instance", "pod", "namespace", "node"}
# Panel types that query nothing.
NO_QUERY_PANELS = {"row", "text", "news", "dashlist"}
# Variable types without a datasource query.
NO_QUERY_VARIABLES = {"custom", "constant", "textbox", "interval", "datasource"}


class Truth:
    """The series a real daemon run produced, by Prometheus name, with the labels each carries."""

    def __init__(self, metrics_text, otlp_lines):
        text_names, text_labels = metrics_text_names(metrics_text)
        otel_names, otel_labels = otlp_names(otlp_lines)
        self.otel_names = otel_names
        self.known = text_names | otel_names
        self.labels = {n: text_labels.get(n, set()) | otel_labels.get(n, set()) for n in self.known}
        self.queried = set()

    def labels_of(self, names):
        """The labels a query over `names` can use; any metric's when it names none."""
        names = names or self.known
        return set().union(*(self.labels.get(n, set()) for n in names)) | K8S_LABELS | SCRAPE_LABELS

    def check_names(self, names, where):
        for n in sorted(names):
            self.queried.add(n)
            check(n in self.known, f"{where}: metric {n} does not exist in the daemon's /metrics or OTLP "
                                   f"metrics (known: {sorted(self.known)})")

    def check_labels(self, used, names, where):
        have = self.labels_of(names & self.known)
        for label in sorted(used):
            check(label in have, f"{where}: label {label} is not on {sorted(names)} (has {sorted(have)})")

    def check_promql(self, expr, where):
        names, used_labels = promql_metrics(expr)
        check(bool(names), f"{where}: query {expr!r} names no metric")
        self.check_names(names, where)
        self.check_labels(used_labels, names, where)


def datasource_type(ref, ds_types):
    """(type, uid) of a panel's, target's or variable's datasource reference; the type is
    "not provisioned" for a uid packaging/grafana/provisioning does not define."""
    uid = ref.get("uid", "") if isinstance(ref, dict) else ref if isinstance(ref, str) else ""
    return ds_types.get(uid, "not provisioned"), uid


def split_args(text):
    """Top-level comma-separated arguments (commas in braces, parentheses or quotes do not split)."""
    args, depth, quote, cur = [], 0, None, ""
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "\"'`":
            quote = ch
        elif ch in "({[":
            depth += 1
        elif ch in ")}]":
            depth -= 1
        elif ch == "," and depth == 0:
            args.append(cur.strip())
            cur = ""
            continue
        cur += ch
    return [a for a in args + [cur.strip()] if a]


def variable_query(var):
    q = var.get("query")
    if isinstance(q, dict):
        q = q.get("query")
    return q if isinstance(q, str) and q else var.get("definition", "")


def check_variable_query(query, truth, where):
    """Grafana's Prometheus variable queries: label_values([selector,] label), label_names([selector]),
    metrics(regex) and query_result(expr). The metric and labels they name must exist."""
    m = re.fullmatch(r"\s*(label_values|label_names|metrics|query_result)\s*\((.*)\)\s*", query, re.S)
    if not check(m is not None, f"{where}: {query!r} is not a Prometheus variable query this check knows "
                                f"(label_values, label_names, metrics, query_result)"):
        return
    func, args = m.group(1), split_args(m.group(2))
    if func == "query_result":
        check(len(args) == 1, f"{where}: query_result takes one expression")
        truth.check_promql(m.group(2), where)
    elif func == "metrics":
        check(len(args) == 1, f"{where}: metrics takes one regular expression")
        pattern = args[0] if args else ""
        check(any(re.fullmatch(pattern, n) for n in truth.known),
              f"{where}: metrics({pattern}) matches no metric the daemon exports")
    else:
        want = 2 if func == "label_values" else 1
        if not check(len(args) <= want and (func == "label_names" or args),
                     f"{where}: {func} takes at most {want} arguments, got {args}"):
            return
        selector = args[0] if func == "label_names" or len(args) == 2 else ""
        names, matcher_labels = promql_metrics(selector) if selector else (set(), set())
        check(not selector or bool(names), f"{where}: the selector {selector!r} names no metric")
        truth.check_names(names, where)
        used = matcher_labels | ({args[-1]} if func == "label_values" else set())
        truth.check_labels(used, names, where)


VARIABLE_REF = re.compile(r"\$\{(\w+)(?::[^}]*)?\}|\$(\w+)|\[\[(\w+)(?::[^\]]*)?\]\]")


def check_references(text, variables, where):
    """Every $var, ${var} and [[var]] names a template variable or one of Grafana's $__ globals."""
    for name in sorted({next(g for g in m.groups() if g) for m in VARIABLE_REF.finditer(text or "")}):
        check(name.startswith("__") or name in variables,
              f"{where}: ${name} is not a template variable of the dashboard (has {sorted(variables)})")


def check_dashboard(path, d, ds_types, truth):
    """Returns the number of flame graph panels on Pyroscope."""
    check(bool(d.get("uid")) and bool(d.get("title")), f"grafana: {path.name} needs a uid and a title")
    variables = d.get("templating", {}).get("list", [])
    names = {v.get("name") for v in variables}
    for var in variables:
        where = f"{path.name}: variable {var.get('name')!r}"
        kind = var.get("type")
        if kind in NO_QUERY_VARIABLES:
            continue
        if not check(kind == "query", f"{where}: variable type {kind!r} is not one this check knows"):
            continue
        ds_type, uid = datasource_type(var.get("datasource"), ds_types)
        if check(ds_type == "prometheus", f"{where}: on datasource {uid!r} ({ds_type}); only Prometheus "
                                          f"variable queries can be checked against the daemon's metrics"):
            query = variable_query(var)
            check_variable_query(query, truth, where)
            check_references(query, names, where)
    flamegraphs = 0
    for panel in walk_panels(d.get("panels", [])):
        where = f"{path.name}: panel {panel.get('title')!r}"
        targets = panel.get("targets", [])
        if panel.get("type") in NO_QUERY_PANELS:
            check(not targets, f"{where}: a {panel.get('type')} panel with queries")
            continue
        check(bool(targets), f"{where}: a {panel.get('type')} panel without queries")
        for target in targets:
            ds_type, uid = datasource_type(target.get("datasource") or panel.get("datasource"), ds_types)
            if panel.get("type") == "flamegraph":
                flamegraphs += 1
                check(ds_type == "grafana-pyroscope-datasource", f"{where}: flame graph not on Pyroscope")
                check(target.get("profileTypeId", "").count(":") == 4, f"{where}: bad profileTypeId")
                check_references(target.get("labelSelector"), names, where)
            elif ds_type == "prometheus":
                truth.check_promql(target.get("expr", ""), where)
                check_references(target.get("expr"), names, where)
            else:
                fail(f"{where}: on datasource {uid!r} ({ds_type}), which this check does not know: only "
                     f"PromQL on Prometheus and flame graphs on Pyroscope are checked")
    return flamegraphs


def cmd_grafana(args):
    gdir = ROOT / "packaging/grafana"
    lines = [json.loads(l) for l in Path(args.otlp).read_text().splitlines() if l.strip()]
    truth = Truth(Path(args.metrics).read_text(), lines)
    check(any(n.startswith("profiler_runqueue_latency") for n in truth.otel_names),
          f"grafana: the daemon sent no run-queue latency histogram (got {sorted(truth.otel_names)})")
    datasources = yaml.safe_load((gdir / "provisioning/datasources/datasources.yaml").read_text())
    ds_types = {d["uid"]: d["type"] for d in datasources["datasources"]}
    check(ds_types.get("prometheus") == "prometheus", "grafana: no Prometheus datasource with uid prometheus")
    check(ds_types.get("pyroscope") == "grafana-pyroscope-datasource", "grafana: no Pyroscope datasource uid pyroscope")
    dashboards = sorted((gdir / "dashboards").glob("*.json"))
    check(len(dashboards) >= 2, "grafana: expected the latency and agent-health dashboards")
    flamegraphs = sum(check_dashboard(path, json.loads(path.read_text()), ds_types, truth) for path in dashboards)
    check(flamegraphs >= 1, "grafana: no flamegraph panel on the Pyroscope datasource")
    for family in ("profiler_runqueue_latency", "profiler_offcpu_duration", "profiler_kernel_events_total",
                   "profiler_export_failures_total", "profiler_export_buffered_bytes", "profiler_resident_memory_bytes",
                   "profiler_cpu_seconds_total", "profiler_frames_unsymbolized_total"):
        check(any(q.startswith(family) for q in truth.queried), f"grafana: no dashboard shows {family}")
    print(f"grafana: {len(truth.queried)} metrics queried, all exist: {', '.join(sorted(truth.queried))}")
