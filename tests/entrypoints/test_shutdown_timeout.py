"""SIGTERM with a stream still running past --shutdown-timeout: the stream ends with an
error event and [DONE] (not a cut connection), and the server exits 0."""

from __future__ import annotations

import json
import signal

import httpx

from tests.conftest import requires_smollm2
from tests.entrypoints.serve_process import free_port, start_server

pytestmark = requires_smollm2


def test_streams_cut_by_the_shutdown_timeout_end_with_an_error_event():
    process, base = start_server(free_port(), "--shutdown-timeout", "1")
    try:
        body = {"model": "smollm2-135m-instruct", "prompt": "Once upon a time", "max_tokens": 4000,
                "ignore_eos": True, "stream": True}
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as response:
            lines = response.iter_lines()
            first = next(line for line in lines if line.startswith("data: "))
            assert json.loads(first[6:])["choices"]
            process.send_signal(signal.SIGTERM)
            events = [line[6:] for line in lines if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        error = json.loads(events[-2])["error"]
        assert error["type"] == "server_error" and "shut" in error["message"]
        assert process.wait(timeout=60) == 0
    finally:
        if process.poll() is None:
            process.kill()
