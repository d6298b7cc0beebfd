"""A minimal SPIFFE Workload API server for tests: ours, built from the published
workload.proto (stubs compiled by grpcio-tools, see scripts/spiffe-workload-api.sh).

    python workload_api_server.py SOCKET_PATH STATE_JSON

Serves FetchX509SVID and FetchX509Bundles over a Unix socket, from STATE_JSON:

    {"svids": [{"spiffe_id": "spiffe://td/path", "x509_svid": "<base64 DER chain>",
                "x509_svid_key": "<base64 PKCS#8 DER>", "bundle": "<base64 DER CAs>"}]}

Every open stream gets the current state at once and again whenever the file's content
changes (replace it atomically to rotate). As SPIRE does, a call without the
`workload.spiffe.io: true` metadata is refused with INVALID_ARGUMENT. Each call is logged on
stdout as one line: `call <method> header=<value>`.
"""

import base64
import json
import os
import sys
import threading
import time
from concurrent import futures

import grpc

sys.path.insert(0, os.path.join(os.path.dirname(sys.executable), "..", "stubs"))
import workload_pb2  # noqa: E402
import workload_pb2_grpc  # noqa: E402

POLL = 0.05


def read_state(path):
    try:
        with open(path, "rb") as f:
            raw = f.read()
        return raw, json.loads(raw)
    except (OSError, ValueError):
        return None, None


def trust_domain(spiffe_id):
    return spiffe_id[len("spiffe://"):].split("/", 1)[0]


class WorkloadApi(workload_pb2_grpc.SpiffeWorkloadAPIServicer):
    def __init__(self, state_path):
        self.state_path = state_path

    def check_header(self, method, context):
        value = dict(context.invocation_metadata()).get("workload.spiffe.io")
        print(f"call {method} header={value}", flush=True)
        if value != "true":
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, "security header missing from request")

    def updates(self, context, build):
        """Yield build(state) now and after each change of the state file."""
        last = None
        while context.is_active():
            raw, state = read_state(self.state_path)
            if raw is not None and raw != last:
                last = raw
                yield build(state)
            time.sleep(POLL)

    def FetchX509SVID(self, request, context):
        self.check_header("FetchX509SVID", context)

        def build(state):
            svids = [
                workload_pb2.X509SVID(
                    spiffe_id=s["spiffe_id"],
                    x509_svid=base64.b64decode(s["x509_svid"]),
                    x509_svid_key=base64.b64decode(s["x509_svid_key"]),
                    bundle=base64.b64decode(s["bundle"]),
                )
                for s in state.get("svids", [])
            ]
            return workload_pb2.X509SVIDResponse(svids=svids)

        yield from self.updates(context, build)

    def FetchX509Bundles(self, request, context):
        self.check_header("FetchX509Bundles", context)

        def build(state):
            bundles = {
                trust_domain(s["spiffe_id"]): base64.b64decode(s["bundle"])
                for s in state.get("svids", [])
            }
            return workload_pb2.X509BundlesResponse(bundles=bundles)

        yield from self.updates(context, build)


def main():
    socket_path, state_path = sys.argv[1], sys.argv[2]
    if os.path.exists(socket_path):
        os.unlink(socket_path)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    workload_pb2_grpc.add_SpiffeWorkloadAPIServicer_to_server(WorkloadApi(state_path), server)
    server.add_insecure_port("unix:" + socket_path)
    server.start()
    print("ready", flush=True)
    stop = threading.Event()
    try:
        stop.wait()
    except KeyboardInterrupt:
        pass
    server.stop(0)


if __name__ == "__main__":
    main()
