#!/usr/bin/env python3
"""A loopback proxy in front of a KMS-compatible server (moto) for fault injection.

moto does not enforce disabled keys and answers some errors differently from real KMS;
this proxy lets tests (and bench/) add latency, answer DisabledException, throttle, or drop
connections, hold Decrypt answers until several are in flight, and counts calls per KMS
operation. Control it with
POST /__proxy {"mode": "ok"|"disabled"|"down", "latency_ms": N, "throttle": N,
"disabled_keys": [ARN, ...], "hold_decrypts": N}
and read counts with GET /__proxy ("decrypts_in_flight_max": the most Decrypts it held at
once; with "hold_decrypts": N, none is answered until N are in flight, or 10 s passed).

    kms_proxy.py --port 0 --upstream http://127.0.0.1:5000   # prints the port it took
"""

import argparse
import http.client
import json
import socket
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

STATE = {"mode": "ok", "latency_ms": 0, "throttle": 0, "calls": {}, "disabled_keys": [], "hold_decrypts": 0,
         "decrypts_in_flight": 0, "decrypts_in_flight_max": 0}
LOCK = threading.Lock()
HELD = threading.Condition(LOCK)


def hold_decrypt():
    """Count this Decrypt in flight; with hold_decrypts set, wait until that many are."""
    with HELD:
        STATE["decrypts_in_flight"] += 1
        STATE["decrypts_in_flight_max"] = max(STATE["decrypts_in_flight_max"], STATE["decrypts_in_flight"])
        HELD.notify_all()
        HELD.wait_for(lambda: STATE["decrypts_in_flight_max"] >= STATE["hold_decrypts"], timeout=10)


def release_decrypt():
    with HELD:
        STATE["decrypts_in_flight"] -= 1


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Buffer each reply and send it in one piece: headers and body in separate segments
    # meet delayed ACKs and cost ~40 ms per call.
    wbufsize = 1 << 16

    def setup(self):
        super().setup()
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, *args):
        pass

    def reply(self, status, body, ctype="application/x-amz-json-1.1"):
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()

    def do_GET(self):
        with LOCK:
            self.reply(200, {k: v for k, v in STATE.items()}, "application/json")

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.path.startswith("/__proxy"):
            with LOCK:
                STATE.update(json.loads(body or b"{}"))
                if STATE.get("reset_calls"):
                    STATE["calls"] = {}
                    STATE.pop("reset_calls")
                HELD.notify_all()
            return self.reply(200, {"ok": True}, "application/json")
        op = self.headers.get("X-Amz-Target", "?").split(".")[-1]
        with LOCK:
            STATE["calls"][op] = STATE["calls"].get(op, 0) + 1
            mode, latency = STATE["mode"], STATE["latency_ms"]
            disabled_keys = list(STATE["disabled_keys"])
            throttled = STATE["throttle"] > 0
            if throttled:
                STATE["throttle"] -= 1
        if op == "Decrypt":
            hold_decrypt()
        try:
            return self.forward(op, body, mode, latency, disabled_keys, throttled)
        finally:
            if op == "Decrypt":
                release_decrypt()

    def forward(self, op, body, mode, latency, disabled_keys, throttled):
        if latency:
            time.sleep(latency / 1000)
        if mode == "down":
            self.close_connection = True
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        if throttled:
            return self.reply(400, {"__type": "ThrottlingException", "message": "Rate exceeded"})
        try:
            req = json.loads(body or b"{}")
        except ValueError:
            req = {}
        uses = {req.get("KeyId"), req.get("SourceKeyId"), req.get("DestinationKeyId")}
        if disabled_keys and uses & set(disabled_keys):
            return self.reply(400, {"__type": "DisabledException", "message": "key is disabled (injected)"})
        if mode == "disabled" and op in ("Decrypt", "GenerateDataKey", "ReEncrypt", "Encrypt"):
            return self.reply(400, {"__type": "DisabledException", "message": "key is disabled (injected)"})
        up = urllib.parse.urlparse(self.server.upstream)
        conn = http.client.HTTPConnection(up.hostname, up.port, timeout=30)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("connection", "content-length")}
        conn.request("POST", self.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status)
        for k, v in resp.getheaders():
            if k.lower() not in ("connection", "content-length", "transfer-encoding", "server", "date"):
                self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.wfile.flush()
        conn.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--upstream", required=True)
    ap.add_argument("--latency-ms", type=int, default=0)
    a = ap.parse_args()
    STATE["latency_ms"] = a.latency_ms
    srv = ThreadingHTTPServer(("127.0.0.1", a.port), Handler)
    srv.daemon_threads = True
    srv.upstream = a.upstream
    print(srv.server_address[1], flush=True)
    srv.serve_forever()


if __name__ == "__main__":
    main()
