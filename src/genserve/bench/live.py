"""Start and stop a real ``genserve serve`` process: used by the integration tests and benchmarks."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from ..server.status import TERMINAL


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    def __init__(self, data_dir: Path, config_text: str | None = None, workers: int = 1,
                 extra_args: list[str] | None = None, env: dict[str, str] | None = None) -> None:
        self.data_dir = Path(data_dir)
        self.env = {**os.environ, **(env or {})}
        self.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)  # as genserve makes its own
        self.config_path = None
        if config_text is not None:
            self.config_path = self.data_dir / "genserve.toml"
            self.config_path.write_text(config_text)
        self.workers = workers
        self.extra_args = list(extra_args or [])
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log_path = self.data_dir / f"server-{self.port}.log"

    def start(self, timeout: float = 360.0) -> "LiveServer":
        cmd = [sys.executable, "-m", "genserve.cli", "serve", "--port", str(self.port), "--host", "127.0.0.1",
               "--data-dir", str(self.data_dir), "--workers", str(self.workers)]
        if self.config_path:
            cmd += ["--config", str(self.config_path)]
        cmd += self.extra_args
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True,
                                     env=self.env)
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.log()}")
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout}s:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-6000:]

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if kill:
            os.killpg(self.proc.pid, signal.SIGKILL)  # the server and its workers, like a machine crash
        else:
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self.proc = None
        self._log.close()

    def __enter__(self) -> "LiveServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def post_concurrently(url: str, bodies: list[dict], path: str = "/v1/jobs") -> list[httpx.Response]:
    """POST every body at once (one client per thread, released together by a barrier)."""
    import threading

    out: list[httpx.Response] = [None] * len(bodies)  # type: ignore[list-item]
    barrier = threading.Barrier(len(bodies))

    def go(i: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            barrier.wait()
            out[i] = c.post(path, json=bodies[i])

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def wait_for(client: httpx.Client, job_id: str, timeout: float = 120.0, statuses=tuple(TERMINAL)) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["status"] in statuses:
            return job
        time.sleep(0.05)
    raise AssertionError(f"job {job_id} still {job['status']} after {timeout}s")


def sse_events(client: httpx.Client, job_id: str, timeout: float = 120.0, headers=None) -> list[tuple[str, dict, int]]:
    import json

    out = []
    with client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=timeout, headers=headers or {}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        ev, eid = None, None
        for line in r.iter_lines():
            if line.startswith("id:"):
                eid = int(line[3:])
            elif line.startswith("event:"):
                ev = line[6:].strip()
            elif line.startswith("data:"):
                out.append((ev, json.loads(line[5:]), eid))
    return out


def wait_until(pred, timeout: float = 60.0, what: str = "condition", every: float = 0.1):
    """Poll ``pred`` until it returns something truthy (which is returned) or time runs out."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = pred()
        if got:
            return got
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class s3_server:
    """A real S3 API over HTTP on loopback (moto's server), with ``buckets`` created; the AWS
    credentials it needs are dummies set in the environment (which workers and servers inherit).
    Use as a context manager: yields the endpoint URL."""

    def __init__(self, *buckets: str) -> None:
        self.buckets = buckets
        self.server = None

    def __enter__(self) -> str:
        import boto3
        from moto.server import ThreadedMotoServer

        for k, v in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"),
                     ("AWS_DEFAULT_REGION", "us-east-1")):
            os.environ.setdefault(k, v)
        port = free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=port)
        self.server.start()
        url = f"http://127.0.0.1:{port}"
        s3 = boto3.client("s3", endpoint_url=url, region_name="us-east-1")
        for b in self.buckets:
            s3.create_bucket(Bucket=b)
        return url

    def __exit__(self, *exc) -> None:
        if self.server is not None:
            self.server.stop()
