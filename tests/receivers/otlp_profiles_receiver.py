#!/usr/bin/env python3
"""A real OTLP profiles receiver for compatibility tests.

Serves the gRPC `opentelemetry.proto.collector.profiles.v1development.ProfilesService/Export`
and OTLP/HTTP `POST /v1development/profiles` on loopback, decodes every request with the
OFFICIAL generated classes from PyPI `opentelemetry-proto`, and appends one JSON line per
request to --out with a decoded summary (resources, profiles, samples with their stacks
resolved through the dictionary) and every dictionary problem it finds (out-of-range
indices, a non-zero entry at index 0, duplicate entries).

Once both servers listen it prints `READY grpc=<port> http=<port>` on stdout, so callers
can pass port 0 and learn the real ports without racing for them.

Usage: otlp_profiles_receiver.py --out FILE [--grpc-port N] [--http-port N] [--reject-profiles N]
"""

import argparse
import gzip
import json
import sys
import threading
from concurrent import futures
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

INSTALL_HINT = "run `python3 -m pip install -r tests/receivers/requirements.txt`"

try:
    import grpc
    from google.protobuf.message import DecodeError
    from opentelemetry.proto.collector.profiles.v1development import (
        profiles_service_pb2 as service_pb2,
        profiles_service_pb2_grpc as service_grpc,
    )
except ImportError as e:  # The Rust test shows this to whoever runs it.
    print(f"otlp_profiles_receiver: missing Python module ({e}); {INSTALL_HINT}", file=sys.stderr)
    sys.exit(3)

HTTP_PATH = "/v1development/profiles"
# Request headers worth showing in the summary (lower case). grpcio hides the
# transport ones (grpc-encoding, content-type) from servicers.
INTERESTING_HEADERS = ("content-type", "content-encoding", "otlp-profiles-development-version", "x-scope-orgid")


class Summarizer:
    """Turns one decoded request into a JSON-able summary, recording problems on the way."""

    def __init__(self, request):
        self.req = request
        self.dict = request.dictionary
        self.problems = []

    def at(self, table_name, index, where):
        """Entry `index` of a dictionary table, or None (and a problem) when out of range."""
        table = getattr(self.dict, table_name)
        if 0 <= index < len(table):
            return table[index]
        self.problems.append(f"{where}: {table_name}[{index}] out of range (len {len(table)})")
        return None

    def string(self, index, where):
        s = self.at("string_table", index, where)
        return "" if s is None else s

    def any_value(self, v, where):
        kind = v.WhichOneof("value")
        if kind is None:
            return None
        if kind == "string_value_strindex":
            return self.string(v.string_value_strindex, where)
        if kind in ("array_value", "kvlist_value", "bytes_value"):
            return str(getattr(v, kind))
        return getattr(v, kind)

    def attributes(self, indices, where):
        out = {}
        for i in indices:
            kv = self.at("attribute_table", i, where)
            if kv is not None:
                key = self.string(kv.key_strindex, f"{where} attribute key")
                out[key] = self.any_value(kv.value, f"{where} attribute {key}")
        return out

    def value_type(self, vt, present, where):
        if not present:
            return None
        return [self.string(vt.type_strindex, where), self.string(vt.unit_strindex, where)]

    def function_name(self, line, where):
        f = self.at("function_table", line.function_index, where)
        return None if f is None else self.string(f.name_strindex, f"{where} function name")

    def location(self, index, where):
        loc = self.at("location_table", index, where)
        if loc is None:
            return None
        mapping = self.at("mapping_table", loc.mapping_index, f"{where} mapping")
        mapping_file, mapping_attrs = "", {}
        if mapping is not None:
            mapping_file = self.string(mapping.filename_strindex, f"{where} mapping filename")
            mapping_attrs = self.attributes(mapping.attribute_indices, f"{where} mapping")
        lines = []
        for line in loc.lines:
            f = self.at("function_table", line.function_index, f"{where} line")
            file = "" if f is None else self.string(f.filename_strindex, f"{where} function file")
            lines.append({"function": self.function_name(line, f"{where} line"), "file": file, "line": line.line})
        return {
            "address": loc.address,
            "mapping": mapping_file,
            "mapping_attributes": mapping_attrs,
            "attributes": self.attributes(loc.attribute_indices, f"{where} location"),
            "lines": lines,
        }

    def sample(self, sample, where):
        stack = self.at("stack_table", sample.stack_index, f"{where} stack")
        frames = []
        if stack is not None:
            frames = [self.location(i, f"{where} location") for i in stack.location_indices]
        self.at("link_table", sample.link_index, f"{where} link")
        # Innermost first: locations are leaf first, and within a location
        # lines[0] is the innermost inlined function.
        names = [line["function"] for fr in frames if fr for line in fr["lines"]]
        return {
            "stack": names,
            "frames": frames,
            "values": list(sample.values),
            "attributes": self.attributes(sample.attribute_indices, f"{where} sample"),
        }

    def profile(self, p, where):
        return {
            "sample_type": self.value_type(p.sample_type, p.HasField("sample_type"), f"{where} sample_type"),
            "period_type": self.value_type(p.period_type, p.HasField("period_type"), f"{where} period_type"),
            "period": p.period,
            "time_unix_nano": p.time_unix_nano,
            "duration_nano": p.duration_nano,
            "attributes": self.attributes(p.attribute_indices, f"{where} profile"),
            "samples": [self.sample(s, f"{where} sample {i}") for i, s in enumerate(p.samples)],
        }

    def check_tables(self):
        """Index 0 must be the zero value; entries should not repeat."""
        d = self.dict
        for name in ("mapping_table", "location_table", "function_table", "link_table",
                     "attribute_table", "stack_table", "string_table"):
            table = getattr(d, name)
            if len(table) == 0:
                self.problems.append(f"{name} is empty (index 0 must hold the zero value)")
                continue
            zero = table[0] == "" if name == "string_table" else table[0].ByteSize() == 0
            if not zero:
                self.problems.append(f"{name}[0] is not the zero value")
            keys = [s if name == "string_table" else s.SerializeToString(deterministic=True) for s in table]
            if len(set(keys)) != len(keys):
                self.problems.append(f"{name} has duplicate entries")

    def summary(self):
        self.check_tables()
        resources = []
        for r, rp in enumerate(self.req.resource_profiles):
            attrs = {kv.key: self.any_value(kv.value, f"resource {r}") for kv in rp.resource.attributes}
            scopes = []
            for s, sp in enumerate(rp.scope_profiles):
                scopes.append({
                    "name": sp.scope.name,
                    "version": sp.scope.version,
                    "profiles": [self.profile(p, f"resource {r} scope {s} profile {i}")
                                 for i, p in enumerate(sp.profiles)],
                })
            resources.append({"attributes": attrs, "scopes": scopes})
        table_sizes = {f.name: len(getattr(self.dict, f.name)) for f in self.dict.DESCRIPTOR.fields}
        return {"resources": resources, "dictionary_sizes": table_sizes, "problems": self.problems}


class Sink:
    """Appends one JSON line per request; shared by both servers."""

    def __init__(self, path, reject_profiles):
        self.path = path
        self.reject_profiles = reject_profiles
        self.lock = threading.Lock()

    def record(self, transport, headers, request):
        line = {"transport": transport, "headers": headers}
        line.update(Summarizer(request).summary())
        with self.lock, open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(line, sort_keys=True) + "\n")

    def response(self):
        resp = service_pb2.ExportProfilesServiceResponse()
        if self.reject_profiles:
            # Lets tests check that clients surface partial success.
            resp.partial_success.rejected_profiles = self.reject_profiles
            resp.partial_success.error_message = "rejected by test receiver"
        return resp


class Servicer(service_grpc.ProfilesServiceServicer):
    def __init__(self, sink):
        self.sink = sink

    def Export(self, request, context):  # noqa: N802 (generated name)
        metadata = {k.lower(): v for k, v in context.invocation_metadata() if k.lower() in INTERESTING_HEADERS}
        self.sink.record("grpc", metadata, request)
        return self.sink.response()


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
            if self.path != HTTP_PATH:
                return self.reply(404, b"unknown path", "text/plain")
            if self.headers.get("Content-Type", "") != "application/x-protobuf":
                return self.reply(415, b"want application/x-protobuf", "text/plain")
            try:
                if self.headers.get("Content-Encoding", "").lower() == "gzip":
                    body = gzip.decompress(body)
                request = service_pb2.ExportProfilesServiceRequest.FromString(body)
            except (OSError, EOFError, DecodeError) as e:
                return self.reply(400, f"undecodable request: {e}".encode(), "text/plain")
            headers = {k.lower(): v for k, v in self.headers.items() if k.lower() in INTERESTING_HEADERS}
            sink.record("http", headers, request)
            self.reply(200, sink.response().SerializeToString())

        def log_message(self, *args):  # Keep stderr for real problems.
            pass

    return Handler


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="file to append one JSON line per request to")
    ap.add_argument("--grpc-port", type=int, default=0)
    ap.add_argument("--http-port", type=int, default=0)
    ap.add_argument("--reject-profiles", type=int, default=0, help="report this many rejected profiles")
    args = ap.parse_args()

    sink = Sink(args.out, args.reject_profiles)
    grpc_server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    service_grpc.add_ProfilesServiceServicer_to_server(Servicer(sink), grpc_server)
    grpc_port = grpc_server.add_insecure_port(f"127.0.0.1:{args.grpc_port}")
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
