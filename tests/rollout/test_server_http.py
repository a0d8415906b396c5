"""HTTP-level failures of a rollout server give clear errors (a fake server, no SGLang)."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from drpo_megatron.rollout.engine import generate_groups
from drpo_megatron.rollout.server import ServerConfig, ServerError, SGLangServer

GOOD = {"text": "4", "output_ids": [7, 8],
        "meta_info": {"output_token_logprobs": [[-0.1, 7, None], [-0.2, 8, None]],
                      "finish_reason": {"type": "stop"}, "weight_version": "3"}}
BODIES = {
    "/generate?notjson": (200, b"<html>502 bad gateway</html>"),
    "/generate?truncated": (200, json.dumps([GOOD]).encode()[:-15]),
    "/generate?http500": (500, b"internal error: out of memory"),
    "/generate?short_logprobs": (200, json.dumps([{**GOOD, "meta_info": {
        **GOOD["meta_info"], "output_token_logprobs": [[-0.1, 7, None]]}}]).encode()),
    "/generate?good": (200, json.dumps([GOOD]).encode()),
    "/begin_weight_update?fail": (400, json.dumps({"success": False,
                                                   "message": "session already open"}).encode()),
}


@pytest.fixture(scope="module")
def fake():
    mode = {"q": "good"}

    class H(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            code, body = BODIES[f"{self.path}?{mode['q']}"]
            self.send_response(code)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *a):
            pass

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), H)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    s = SGLangServer("unused", ServerConfig(port=httpd.server_address[1], request_timeout_s=5),
                     "/tmp", name="fake-0")
    yield s, mode
    httpd.shutdown()


def _gen(s):
    return generate_groups(s, [[1, 2]], ["4"], n=1, temperature=1.0, top_p=1.0, max_new_tokens=2)


@pytest.mark.parametrize("q,match", [
    ("notjson", r"fake-0: generate \(/generate\) returned a body that is not JSON"),
    ("truncated", r"returned a body that is not JSON"),
    ("http500", r"fake-0: generate \(/generate\) returned HTTP 500: internal error"),
    ("short_logprobs", r"has 2 output_ids but 1 log-probs \(truncated response\)"),
])
def test_malformed_responses_raise_clear_errors(fake, q, match):
    s, mode = fake
    mode["q"] = q
    with pytest.raises(ServerError, match=match):
        _gen(s)


def test_good_response_and_failed_update_call(fake):
    s, mode = fake
    mode["q"] = "good"
    (smp,) = _gen(s)
    assert smp.response_ids == [7, 8] and smp.weight_version == "3"
    mode["q"] = "fail"
    with pytest.raises(ServerError, match="begin_weight_update.*HTTP 400.*session already open"):
        s.begin_weight_update()
