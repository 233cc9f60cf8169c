#!/usr/bin/env python3
"""Loopback OTLP metrics receiver for the integration tests.

Serves the gRPC `opentelemetry.proto.collector.metrics.v1.MetricsService/Export`
and OTLP/HTTP `POST /v1/metrics` (binary protobuf, optionally gzipped), decodes
every request with the official classes from PyPI `opentelemetry-proto`, and
appends one JSON line per request to --out: metric names, units, types,
temporality, data point attributes and values, and for exponential histograms
scale, zero_count, positive/negative offset and bucket_counts, count, sum, min
and max (null when the sender left them out). Consistency problems (a count that
is not the sum of the buckets, a metric name used twice, mixed point types) are
listed under "problems".

The daemon sends profiles to the same endpoint, so the gRPC `ProfilesService`
and `POST /v1development/profiles` are served too: they answer OK and write a
line with "signal": "profiles" and the number of resources, nothing more.

Once both servers listen it prints `READY grpc=<port> http=<port>` on stdout, so
callers can pass port 0 and learn the real ports without racing for them.

With --tls-cert and --tls-key the gRPC port serves TLS with that certificate;
--tls-client-ca also requires a client certificate signed by that CA (mutual
TLS). Each gRPC line then carries "tls_client": the client certificate's
common name, or null. The HTTP port stays plaintext.

Usage: otlp_metrics_receiver.py --out FILE [--grpc-port N] [--http-port N]
                                [--tls-cert PEM --tls-key PEM [--tls-client-ca PEM]]
"""

import argparse
import gzip
import json
import sys
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

try:
    import grpc
    from google.protobuf.message import DecodeError
    from opentelemetry.proto.collector.metrics.v1 import (
        metrics_service_pb2 as metrics_pb2,
        metrics_service_pb2_grpc as metrics_grpc,
    )
    from opentelemetry.proto.collector.profiles.v1development import (
        profiles_service_pb2 as profiles_pb2,
        profiles_service_pb2_grpc as profiles_grpc,
    )
    from opentelemetry.proto.metrics.v1 import metrics_pb2 as model
except ImportError as e:  # The Rust test shows this to whoever runs it.
    print(f"NOT READY: {e}; run python3 -m pip install -r tests/receivers/requirements.txt", flush=True)
    sys.exit(1)

METRICS_PATH = "/v1/metrics"
PROFILES_PATH = "/v1development/profiles"
INTERESTING_HEADERS = {"x-tenant", "authorization", "user-agent"}
TEMPORALITY = {
    model.AGGREGATION_TEMPORALITY_UNSPECIFIED: "unspecified",
    model.AGGREGATION_TEMPORALITY_DELTA: "delta",
    model.AGGREGATION_TEMPORALITY_CUMULATIVE: "cumulative",
}


def any_value(v):
    kind = v.WhichOneof("value")
    if kind is None:
        return None
    if kind in ("array_value", "kvlist_value", "bytes_value"):
        return f"<{kind}>"
    return getattr(v, kind)


def attributes(kvs):
    return {kv.key: any_value(kv.value) for kv in kvs}


def optional(msg, field):
    return getattr(msg, field) if msg.HasField(field) else None


def number_point(p):
    kind = p.WhichOneof("value")
    return {
        "attributes": attributes(p.attributes),
        "start_time_unix_nano": p.start_time_unix_nano,
        "time_unix_nano": p.time_unix_nano,
        "value_type": {"as_int": "int", "as_double": "double"}.get(kind),
        "value": getattr(p, kind) if kind else None,
    }


def buckets(b):
    return {"offset": b.offset, "bucket_counts": list(b.bucket_counts)}


def exp_point(p, problems, where):
    point = {
        "attributes": attributes(p.attributes),
        "start_time_unix_nano": p.start_time_unix_nano,
        "time_unix_nano": p.time_unix_nano,
        "count": p.count,
        "sum": optional(p, "sum"),
        "min": optional(p, "min"),
        "max": optional(p, "max"),
        "scale": p.scale,
        "zero_count": p.zero_count,
        "zero_threshold": p.zero_threshold,
        "positive": buckets(p.positive),
        "negative": buckets(p.negative),
    }
    total = p.zero_count + sum(p.positive.bucket_counts) + sum(p.negative.bucket_counts)
    if total != p.count:
        problems.append(f"{where}: count {p.count} != zero_count + buckets = {total}")
    if p.start_time_unix_nano > p.time_unix_nano:
        problems.append(f"{where}: starts after it ends")
    return point


def metric(m, problems, where):
    out = {"name": m.name, "unit": m.unit, "description": m.description}
    kind = m.WhichOneof("data")
    out["type"] = kind
    data = getattr(m, kind) if kind else None
    if kind in ("sum", "histogram", "exponential_histogram"):
        out["temporality"] = TEMPORALITY.get(data.aggregation_temporality, str(data.aggregation_temporality))
    if kind == "sum":
        out["monotonic"] = data.is_monotonic
    if kind in ("sum", "gauge"):
        out["points"] = [number_point(p) for p in data.data_points]
        types = {p["value_type"] for p in out["points"]}
        if len(types) > 1:
            problems.append(f"{where}: mixed int and double points")
    elif kind == "exponential_histogram":
        out["points"] = [exp_point(p, problems, f"{where}[{i}]") for i, p in enumerate(data.data_points)]
    elif kind is not None:
        out["points"] = [{"attributes": attributes(p.attributes)} for p in data.data_points]
    else:
        problems.append(f"{where}: no data")
    return out


def summarize_metrics(request):
    problems = []
    resources = []
    for ri, rm in enumerate(request.resource_metrics):
        scopes = []
        for si, sm in enumerate(rm.scope_metrics):
            names = [m.name for m in sm.metrics]
            for dup in sorted({n for n in names if names.count(n) > 1}):
                problems.append(f"resource {ri} scope {si}: metric {dup} appears twice")
            metrics = [metric(m, problems, f"{m.name}") for m in sm.metrics]
            scopes.append({"name": sm.scope.name, "version": sm.scope.version, "metrics": metrics})
        resources.append({"attributes": attributes(rm.resource.attributes), "scopes": scopes})
    return {"signal": "metrics", "resources": resources, "problems": problems}


class Sink:
    """Appends one JSON line per request; shared by all servers."""

    def __init__(self, path):
        self.path = path
        self.lock = threading.Lock()

    def write(self, line):
        with self.lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line, sort_keys=True) + "\n")

    def metrics(self, transport, headers, request, tls=None):
        line = {"transport": transport, "headers": headers}
        line.update(summarize_metrics(request))
        line.update(tls or {})
        self.write(line)

    def profiles(self, transport, request, tls=None):
        line = {"transport": transport, "signal": "profiles", "resources": len(request.resource_profiles)}
        line.update(tls or {})
        self.write(line)


def tls_peer(context):
    """{"tls_client": common name or None} on a TLS connection, else {}."""
    auth = context.auth_context()
    if auth.get("transport_security_type", [b""])[0] != b"ssl":
        return {}
    cn = auth.get("x509_common_name", [None])[0]
    return {"tls_client": cn.decode() if cn else None}


class MetricsServicer(metrics_grpc.MetricsServiceServicer):
    def __init__(self, sink):
        self.sink = sink

    def Export(self, request, context):  # noqa: N802 (generated name)
        metadata = {k.lower(): v for k, v in context.invocation_metadata() if k.lower() in INTERESTING_HEADERS}
        self.sink.metrics("grpc", metadata, request, tls_peer(context))
        return metrics_pb2.ExportMetricsServiceResponse()


class ProfilesServicer(profiles_grpc.ProfilesServiceServicer):
    def __init__(self, sink):
        self.sink = sink

    def Export(self, request, context):  # noqa: N802 (generated name)
        self.sink.profiles("grpc", request, tls_peer(context))
        return profiles_pb2.ExportProfilesServiceResponse()


def http_handler(sink):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def reply(self, code, body=b"", content_type="application/x-protobuf"):
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_POST(self):  # noqa: N802 (http.server API)
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            if self.path == METRICS_PATH:
                request_type, response = metrics_pb2.ExportMetricsServiceRequest, metrics_pb2.ExportMetricsServiceResponse
            elif self.path == PROFILES_PATH:
                request_type, response = profiles_pb2.ExportProfilesServiceRequest, profiles_pb2.ExportProfilesServiceResponse
            else:
                return self.reply(404, b"unknown path", "text/plain")
            if self.headers.get("Content-Type", "") != "application/x-protobuf":
                return self.reply(415, b"want application/x-protobuf", "text/plain")
            try:
                if self.headers.get("Content-Encoding", "").lower() == "gzip":
                    body = gzip.decompress(body)
                request = request_type.FromString(body)
            except (OSError, EOFError, DecodeError) as e:
                return self.reply(400, f"undecodable request: {e}".encode(), "text/plain")
            if self.path == METRICS_PATH:
                headers = {k.lower(): v for k, v in self.headers.items() if k.lower() in INTERESTING_HEADERS}
                sink.metrics("http", headers, request)
            else:
                sink.profiles("http", request)
            self.reply(200, response().SerializeToString())

        def log_message(self, *args):  # Keep stderr for real problems.
            pass

    return Handler


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="file to append one JSON line per request to")
    ap.add_argument("--grpc-port", type=int, default=0)
    ap.add_argument("--http-port", type=int, default=0)
    ap.add_argument("--tls-cert", help="PEM certificate chain: serve gRPC over TLS")
    ap.add_argument("--tls-key", help="PEM private key of --tls-cert")
    ap.add_argument("--tls-client-ca", help="PEM CA: require client certificates it signed")
    args = ap.parse_args()
    if bool(args.tls_cert) != bool(args.tls_key):
        ap.error("--tls-cert and --tls-key go together")

    sink = Sink(args.out)
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    metrics_grpc.add_MetricsServiceServicer_to_server(MetricsServicer(sink), grpc_server)
    profiles_grpc.add_ProfilesServiceServicer_to_server(ProfilesServicer(sink), grpc_server)
    address = f"127.0.0.1:{args.grpc_port}"
    if args.tls_cert:
        def read(path):
            with open(path, "rb") as f:
                return f.read()

        client_ca = read(args.tls_client_ca) if args.tls_client_ca else None
        credentials = grpc.ssl_server_credentials(
            [(read(args.tls_key), read(args.tls_cert))],
            root_certificates=client_ca,
            require_client_auth=client_ca is not None,
        )
        grpc_port = grpc_server.add_secure_port(address, credentials)
    else:
        grpc_port = grpc_server.add_insecure_port(address)
    grpc_server.start()
    http_server = ThreadingHTTPServer(("127.0.0.1", args.http_port), http_handler(sink))
    threading.Thread(target=http_server.serve_forever, daemon=True).start()

    print(f"READY grpc={grpc_port} http={http_server.server_address[1]}", flush=True)
    try:
        grpc_server.wait_for_termination()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
