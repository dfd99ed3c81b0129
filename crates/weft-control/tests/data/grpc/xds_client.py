"""A proxyless gRPC client for weft's tests: grpcio's own xDS resolver and balancers.

Usage: xds_client.py TARGET CALLS [options] (GRPC_XDS_BOOTSTRAP names the bootstrap)
  --method PATH        method to call (default /echo.Echo/Unary)
  --md KEY=VALUE       request metadata (repeatable; `{i}` in VALUE is the call's index)
  --warmup N           first call until N distinct servers answered (30 s at most)
  --xds-creds          xDS channel credentials (TLS from the control plane, else plaintext)
  --deadline S         each call's deadline in seconds (default 30)
  --hold               after printing, keep the channel (and its xDS stream) until stdin closes
Prints one JSON line: {"servers": {NAME: n}, "codes": {CODE: n}, "errors": [...],
"seconds": [...]}: what the CALLS calls after the warm-up got.
"""
import argparse
import json
import sys
import time

import grpc
import grpc.experimental


def main():
    p = argparse.ArgumentParser()
    p.add_argument("target")
    p.add_argument("calls", type=int)
    p.add_argument("--method", default="/echo.Echo/Unary")
    p.add_argument("--md", action="append", default=[])
    p.add_argument("--warmup", type=int, default=0)
    p.add_argument("--xds-creds", action="store_true")
    p.add_argument("--deadline", type=float, default=30.0)
    p.add_argument("--hold", action="store_true")
    a = p.parse_args()
    if a.xds_creds:
        creds = grpc.xds_channel_credentials(grpc.experimental.insecure_channel_credentials())
        channel = grpc.secure_channel(a.target, creds)
    else:
        channel = grpc.insecure_channel(a.target)
    call = channel.unary_unary(a.method)

    def one(i):
        md = [(k, v.replace("{i}", str(i))) for k, v in (kv.split("=", 1) for kv in a.md)]
        return call(b"ping", metadata=md, timeout=a.deadline, wait_for_ready=True)

    seen = set()
    deadline = time.time() + 30
    i = 0
    while len(seen) < a.warmup and time.time() < deadline:
        try:
            seen.add(json.loads(one("warmup-%d" % i))["server"])
        except grpc.RpcError:
            pass
        i += 1
    out = {"servers": {}, "codes": {}, "errors": [], "seconds": [], "warmed": sorted(seen)}
    for i in range(a.calls):
        start = time.time()
        try:
            server = json.loads(one(i))["server"]
            out["servers"][server] = out["servers"].get(server, 0) + 1
            code = "OK"
        except grpc.RpcError as e:
            code = e.code().name
            if len(out["errors"]) < 5:
                out["errors"].append("%s: %s" % (code, e.details()))
        out["codes"][code] = out["codes"].get(code, 0) + 1
        out["seconds"].append(round(time.time() - start, 3))
    print(json.dumps(out), flush=True)
    if a.hold:
        sys.stdin.read()
    channel.close()


if __name__ == "__main__":
    sys.exit(main())
