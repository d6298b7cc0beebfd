"""A small OTLP/HTTP traces receiver for the tests: decodes each POSTed protobuf
ExportTraceServiceRequest with the opentelemetry-proto package and appends one JSON line per
span to OUT (resource and span attributes, ids in hex). Every raw body is appended to OUT.raw
and each request's headers to OUT.headers, so a test can look for a secret anywhere.

Usage: otlp_receiver.py OUT — listens on 127.0.0.1 (a free port) and prints the port.
"""
import json
import sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)

OUT = sys.argv[1]


def value(v):
    kind = v.WhichOneof("value")
    if kind == "array_value":
        return [value(x) for x in v.array_value.values]
    if kind == "kvlist_value":
        return {kv.key: value(kv.value) for kv in v.kvlist_value.values}
    if kind == "bytes_value":
        return v.bytes_value.hex()
    return getattr(v, kind) if kind else None


def attributes(kvs):
    return {kv.key: value(kv.value) for kv in kvs}


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("content-length", "0")))
        with open(OUT + ".raw", "ab") as f:
            f.write(body)
        with open(OUT + ".headers", "a") as f:
            f.write(json.dumps({"path": self.path, "headers": dict(self.headers.items())}) + "\n")
        if self.path != "/v1/traces" or self.headers.get("content-type") != "application/x-protobuf":
            self.send_response(415 if self.path == "/v1/traces" else 404)
            self.send_header("content-length", "0")
            self.end_headers()
            return
        req = ExportTraceServiceRequest()
        try:
            req.ParseFromString(body)
        except Exception as e:  # a body that is not the message: the exporter's bug
            self.send_response(400)
            msg = str(e).encode()
            self.send_header("content-length", str(len(msg)))
            self.end_headers()
            self.wfile.write(msg)
            return
        lines = []
        for rs in req.resource_spans:
            resource = attributes(rs.resource.attributes)
            for ss in rs.scope_spans:
                for s in ss.spans:
                    lines.append(json.dumps({
                        "resource": resource,
                        "scope": ss.scope.name,
                        "traceId": s.trace_id.hex(),
                        "spanId": s.span_id.hex(),
                        "parentSpanId": s.parent_span_id.hex(),
                        "name": s.name,
                        "kind": s.kind,
                        "startTimeUnixNano": s.start_time_unix_nano,
                        "endTimeUnixNano": s.end_time_unix_nano,
                        "attributes": attributes(s.attributes),
                        "status": {"code": s.status.code, "message": s.status.message},
                    }))
        with open(OUT, "a") as f:
            for line in lines:
                f.write(line + "\n")
        answer = ExportTraceServiceResponse().SerializeToString()
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", str(len(answer)))
        self.end_headers()
        self.wfile.write(answer)

    def log_message(self, *args):
        pass


server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
print(server.server_address[1], flush=True)
server.serve_forever()
