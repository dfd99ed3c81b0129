"""A gRPC echo backend for weft's proxyless gRPC tests (grpcio, no generated stubs).

Every unary method answers a JSON body {"server": NAME, "method": PATH}. Request
metadata steers it: `x-delay-ms` sleeps before answering; `x-fail-times: N` with
`x-request-key: K` answers UNAVAILABLE to the first N calls carrying key K.

Usage: echo_server.py NAME [CERT KEY CA]  (with files: mTLS, client certificates required)
Prints {"port": P} on stdout once serving on 127.0.0.1:P, then serves until stdin closes.
"""
import json
import sys
import threading
import time
from concurrent import futures

import grpc


class Echo(grpc.GenericRpcHandler):
    def __init__(self, name):
        self.name = name
        self.failures = {}
        self.lock = threading.Lock()

    def service(self, details):
        method = details.method

        def unary(request, context):
            md = dict(context.invocation_metadata())
            delay = int(md.get("x-delay-ms", "0"))
            if delay:
                time.sleep(delay / 1000.0)
            fail = int(md.get("x-fail-times", "0"))
            if fail:
                key = md.get("x-request-key", "")
                with self.lock:
                    seen = self.failures.get(key, 0)
                    self.failures[key] = seen + 1
                if seen < fail:
                    context.abort(grpc.StatusCode.UNAVAILABLE, "failing attempt %d of %d" % (seen + 1, fail))
            return json.dumps({"server": self.name, "method": method}).encode()

        return grpc.unary_unary_rpc_method_handler(unary)


def main():
    name = sys.argv[1]
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=32))
    server.add_generic_rpc_handlers((Echo(name),))
    if len(sys.argv) >= 5:
        cert, key, ca = (open(p, "rb").read() for p in sys.argv[2:5])
        creds = grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=True)
        port = server.add_secure_port("127.0.0.1:0", creds)
    else:
        port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(json.dumps({"port": port}), flush=True)
    sys.stdin.read()
    server.stop(0)


if __name__ == "__main__":
    main()
