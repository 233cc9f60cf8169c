#!/usr/bin/env python3
"""A loopback stand-in for Grafana Pyroscope's native push ingest.

No Pyroscope binary can be installed on the test machines, so this server
answers `POST /push.v1.PusherService/Push` (Connect protocol; only the protobuf
codec, which is what the agent sends) the way Pyroscope's distributor does,
and decodes what it receives with the upstream schemas shipped in `proto/`
(Pyroscope's push.proto and types.proto, google/pprof's profile.proto),
compiled at startup by `grpc_tools.protoc`.
Decoding with the official schemas, not with our own Rust structs, is what
makes it an honest compatibility check.

Protocol for the test that runs it:
- stdout, first line: `LISTENING <port>` once the socket is bound;
- stdout, then: one JSON object per request (see `describe_request`);
- it exits when its stdin closes, so a killed test leaves no server behind.

Like Pyroscope it rejects, with HTTP 400 and a Connect error
`{"code": "invalid_argument", "message": ...}`, a series without
`service_name` or `__name__`, invalid or duplicate label names, and a
raw_profile that is not (gzipped) pprof.

Requirements: `python3 -m pip install -r tests/receivers/requirements.txt`.
"""

import argparse
import gzip
import json
import os
import re
import sys
import tempfile
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HERE = os.path.dirname(os.path.abspath(__file__))
PROTO_DIR = os.path.join(HERE, "proto")
PROTOS = ["push/v1/push.proto", "types/v1/types.proto", "pprof/profile.proto"]
PUSH_PATH = "/push.v1.PusherService/Push"
INSTALL_HINT = "run: python3 -m pip install -r tests/receivers/requirements.txt"
# Prometheus' legacy label name rule, which Pyroscope applies (after turning
# dots into underscores; we send none, so we accept none).
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*\Z")

EXIT_MISSING_MODULE = 3
EXIT_PROTOC_FAILED = 4


class Invalid(Exception):
    """A request Pyroscope would answer with invalid_argument."""


def load_messages():
    """Message classes for PushRequest, PushResponse and pprof Profile.

    protoc writes a descriptor set into a temp dir and the classes are built
    from it, rather than importing generated `*_pb2` modules: the module for
    `types/v1/types.proto` would be the package `types`, which Python's
    standard library already owns, so `push_pb2`'s import of it fails.
    """
    try:
        import grpc_tools
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
        from grpc_tools import protoc
    except ImportError as e:
        print(f"pyroscope_receiver: missing Python module {e.name!r}; {INSTALL_HINT}", file=sys.stderr)
        sys.exit(EXIT_MISSING_MODULE)
    well_known = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
    with tempfile.TemporaryDirectory(prefix="pyroscope-receiver-") as tmp:
        out = os.path.join(tmp, "descriptors.pb")
        args = ["grpc_tools.protoc", f"-I{PROTO_DIR}", f"-I{well_known}", f"--descriptor_set_out={out}"]
        if protoc.main(args + ["--include_imports", *PROTOS]) != 0:
            print(f"pyroscope_receiver: protoc failed on {PROTOS} in {PROTO_DIR}", file=sys.stderr)
            sys.exit(EXIT_PROTOC_FAILED)
        with open(out, "rb") as f:
            files = descriptor_pb2.FileDescriptorSet.FromString(f.read())
    pool = descriptor_pool.DescriptorPool()
    for file in files.file:
        pool.Add(file)

    def cls(name):
        return message_factory.GetMessageClass(pool.FindMessageTypeByName(name))

    return cls("push.v1.PushRequest"), cls("push.v1.PushResponse"), cls("perftools.profiles.Profile")


def check_labels(labels):
    """Raises Invalid where Pyroscope's distributor would refuse the series."""
    names = [name for name, _ in labels]
    values = dict(labels)
    for required in ("service_name", "__name__"):
        if not values.get(required):
            raise Invalid(f"invalid labels {labels}: {required} is not provided")
    for name in names:
        if not LABEL_NAME.match(name):
            raise Invalid(f"invalid labels {labels}: invalid label name {name!r}")
    if len(set(names)) != len(names):
        raise Invalid(f"invalid labels {labels}: duplicate label names")


def describe_profile(raw, profile_cls):
    """What a test needs to know about one raw_profile (gzipped or not)."""
    gzipped = raw[:2] == b"\x1f\x8b"
    try:
        p = profile_cls.FromString(gzip.decompress(raw) if gzipped else raw)
    except Exception as e:  # DecodeError, BadGzipFile, EOFError, ...
        raise Invalid(f"failed to parse pprof profile: {e}") from e
    try:
        strings = p.string_table
        if strings and strings[0] != "":
            raise Invalid("string_table[0] must be empty")
        functions = {f.id: strings[f.name] for f in p.function}
        locations = {loc.id: loc for loc in p.location}
        mappings = {m.id: strings[m.filename] for m in p.mapping}
        leaves, pids = [], []
        for sample in p.sample:
            if len(sample.value) != len(p.sample_type):
                raise Invalid(f"sample has {len(sample.value)} values for {len(p.sample_type)} sample types")
            # Every id must resolve, as pprof requires (KeyError otherwise).
            locs = [locations[i] for i in sample.location_id]
            for loc in locs:
                if loc.mapping_id:
                    _ = mappings[loc.mapping_id]
                for line in loc.line:
                    _ = functions[line.function_id]
            leaves.append([functions[line.function_id] for line in locs[0].line] if locs else [])
            labels = {strings[lb.key]: lb for lb in sample.label}
            pids.append(labels["pid"].num if "pid" in labels else None)
        value_type = lambda t: [strings[t.type], strings[t.unit]]  # noqa: E731
        return {
            "gzipped": gzipped,
            "sample_type": [value_type(t) for t in p.sample_type],
            "period_type": value_type(p.period_type) if p.HasField("period_type") else None,
            "period": p.period,
            "samples": len(p.sample),
            # Per sample: the function names of its leaf location, innermost first.
            "leaf_functions": leaves,
            "sample_pids": pids,
            "totals": [sum(s.value[i] for s in p.sample) for i in range(len(p.sample_type))],
            "mapping_files": sorted(mappings.values()),
        }
    except (KeyError, IndexError) as e:
        raise Invalid(f"pprof profile references a missing id or string: {e!r}") from e


def describe_request(body, push_request_cls, profile_cls):
    """{"series": [{"labels": [[name, value], ...] as sent, "profiles": [...]}]}"""
    try:
        req = push_request_cls.FromString(body)
    except Exception as e:
        raise Invalid(f"failed to decode PushRequest: {e}") from e
    series = []
    for s in req.series:
        labels = [[lb.name, lb.value] for lb in s.labels]
        check_labels(labels)
        profiles = []
        for sample in s.samples:
            profiles.append({"id": sample.ID, **describe_profile(sample.raw_profile, profile_cls)})
        series.append({"labels": labels, "profiles": profiles})
    return {"series": series}


def make_handler(messages, out_lock, verbose):
    push_request_cls, push_response_cls, profile_cls = messages

    class Handler(BaseHTTPRequestHandler):
        # Keep-alive, as Pyroscope does; the agent's client reuses connections.
        protocol_version = "HTTP/1.1"

        def log_message(self, fmt, *args):
            if verbose:
                super().log_message(fmt, *args)

        def emit(self, record):
            with out_lock:
                print(json.dumps(record, sort_keys=True), flush=True)

        def reply(self, status, content_type, payload):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def connect_error(self, status, code, message, record):
            record["error"] = {"code": code, "message": message}
            self.emit(record)
            self.reply(status, "application/json", json.dumps({"code": code, "message": message}).encode())

        def do_POST(self):
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            record = {
                "path": self.path,
                "content_type": self.headers.get("Content-Type"),
                "connect_protocol_version": self.headers.get("Connect-Protocol-Version"),
                "tenant": self.headers.get("X-Scope-OrgID"),
            }
            if self.path != PUSH_PATH:
                return self.connect_error(404, "unimplemented", f"no method {self.path}", record)
            if record["content_type"] != "application/proto":
                # Connect answers an unknown codec with 415 Unsupported Media Type.
                return self.connect_error(415, "internal", f"unsupported content type {record['content_type']}", record)
            try:
                record.update(describe_request(body, push_request_cls, profile_cls))
            except Invalid as e:
                return self.connect_error(400, "invalid_argument", str(e), record)
            self.emit(record)
            self.reply(200, "application/proto", push_response_cls().SerializeToString())

    return Handler


def exit_when_stdin_closes():
    """The test holds our stdin open; EOF means it is gone, so stop too."""
    try:
        while sys.stdin.buffer.read(4096):
            pass
    finally:
        os._exit(0)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on stdout)")
    parser.add_argument("--verbose", action="store_true", help="log each HTTP request on stderr")
    parser.add_argument("--no-stdin-watch", action="store_true", help="keep running after stdin closes")
    args = parser.parse_args()

    messages = load_messages()
    server = ThreadingHTTPServer((args.host, args.port), make_handler(messages, threading.Lock(), args.verbose))
    server.daemon_threads = True
    print(f"LISTENING {server.server_address[1]}", flush=True)
    if not args.no_stdin_watch:
        threading.Thread(target=exit_when_stdin_closes, daemon=True).start()
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
