"""The CLI's HTTP side: following a job's event stream (reconnecting), and ``genserve jobs``,
``cancel`` and ``result``.

A job is durable on the server, so a dropped stream (a restart, a drain, a proxy timeout) is no
reason to give up: :func:`follow` reconnects with ``Last-Event-ID`` and the server replays what was
missed, until ``reconnect_s`` passes without a connection.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from ..server.status import JobStatus, is_terminal
from .common import DEFAULT_URL, FORMATTER, URL_HELP, size_arg

DEFAULT_RECONNECT_S = 300.0
STATUSES = [s.value for s in JobStatus]


class CLIError(Exception):
    """An expected failure: ``main`` prints ``genserve: <message>`` and exits with ``code``."""

    def __init__(self, message: str, code: int = 1) -> None:
        super().__init__(message)
        self.code = code


def auth_headers(a: argparse.Namespace) -> dict[str, str]:
    """``--api-key`` (or ``$GENSERVE_API_KEY``) as a Bearer token."""
    key = getattr(a, "api_key", None) or os.environ.get("GENSERVE_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def api_error(resp: httpx.Response) -> CLIError:
    try:
        err = resp.json()["error"]
        return CLIError(f"{resp.status_code} {err.get('code')}: {err.get('message')}")
    except (ValueError, KeyError, TypeError):
        return CLIError(f"HTTP {resp.status_code}: {resp.text[:200].strip()}")


def expect(resp: httpx.Response, *ok: int) -> httpx.Response:
    if resp.status_code not in (ok or (200,)):
        raise api_error(resp)
    return resp


def follow(client: httpx.Client, job_id: str, on_event: Callable[[str, dict[str, Any]], None],
           reconnect_s: float = DEFAULT_RECONNECT_S, on_reconnect: Callable[[str], None] | None = None) -> str:
    """Feed the job's events to ``on_event`` until a terminal one, whose name is returned."""
    from httpx_sse import connect_sse

    last_id = 0
    down_since: float | None = None
    backoff = 0.25
    while True:
        reason = "the stream ended"
        try:
            headers = {"Last-Event-ID": str(last_id)} if last_id else {}
            with connect_sse(client, "GET", f"/v1/jobs/{job_id}/events", headers=headers) as source:
                if source.response.status_code != 200:
                    source.response.read()
                    raise api_error(source.response)
                down_since, backoff = None, 0.25
                for sse in source.iter_sse():
                    if sse.id:
                        last_id = max(last_id, int(sse.id))
                    if not sse.event or sse.event == "message":
                        continue
                    if sse.event == "reconnect":  # the server is draining: come back with Last-Event-ID
                        reason = "the server is restarting"
                        break
                    data = json.loads(sse.data) if sse.data else {}
                    on_event(sse.event, data)
                    if is_terminal(sse.event):
                        return sse.event
        except httpx.TransportError as e:
            reason = f"connection lost ({type(e).__name__})"
        now = time.monotonic()
        down_since = down_since if down_since is not None else now
        if now - down_since > reconnect_s:
            raise CLIError(f"lost the event stream of job {job_id} for {reconnect_s:g}s; the job is kept on the "
                           f"server: `genserve jobs` / `genserve result {job_id}`")
        if on_reconnect:
            on_reconnect(f"{reason}; reconnecting (last event {last_id})")
        time.sleep(backoff)
        backoff = min(backoff * 2, 5.0)


class QueueWatch:
    """While a job waits, poll its queue position (the event stream only says when it starts)."""

    def __init__(self, base_url: str, job_id: str, show: Callable[[int | None], None], every: float = 1.0,
                 headers: dict[str, str] | None = None) -> None:
        self.stop = threading.Event()
        self._args = (base_url, job_id, show, every)
        self._headers = headers or {}
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "QueueWatch":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        base_url, job_id, show, every = self._args
        with httpx.Client(base_url=base_url, timeout=5, headers=self._headers) as c:
            while not self.stop.is_set():
                try:
                    job = c.get(f"/v1/jobs/{job_id}").json()
                    if job.get("status") != JobStatus.QUEUED:
                        return
                    if not self.stop.is_set():
                        show(job.get("queue_position"))
                except (httpx.HTTPError, ValueError):
                    pass  # the server may be restarting; the stream side reports that
                self.stop.wait(every)


def save_result(client: httpx.Client, job_id: str, out: str | None, index: int = 0) -> tuple[Path, int]:
    res = expect(client.get(f"/v1/jobs/{job_id}/result", params={"index": index} if index else None))
    ext = ".mp4" if res.headers.get("content-type", "").startswith("video/") else ".png"
    path = Path(out or f"{job_id}{'-%d' % index if index else ''}{ext}")
    path.write_bytes(res.content)
    return path, len(res.content)


def cmd_jobs(a: argparse.Namespace) -> int:
    params: dict[str, Any] = {"limit": a.limit}
    if a.status:
        params["status"] = a.status
    if a.model:
        params["model"] = a.model
    with httpx.Client(base_url=a.url, timeout=30, headers=auth_headers(a)) as c:
        rows = expect(c.get("/v1/jobs", params=params)).json()["data"]
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'ID':<34} {'STATUS':<9} {'MODEL':<16} {'SIZE':>9} {'STEPS':>5} {'QUEUE':>5} {'TOTAL s':>8}  RECEIVED")
    for j in rows:
        p = j["params"]
        total = j["breakdown"].get("total_s")
        received = j["timestamps"].get("received")
        print(f"{j['id']:<34} {j['status']:<9} {j['model']:<16} {'%dx%d' % (p['width'], p['height']):>9} "
              f"{p['steps']:>5} {j['queue_position'] if j['queue_position'] is not None else '-':>5} "
              f"{'-' if total is None else f'{total:.2f}':>8}  "
              f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(received)) if received else '-'}")
    if not rows:
        print("(no jobs)", file=sys.stderr)
    return 0


def cmd_cancel(a: argparse.Namespace) -> int:
    with httpx.Client(base_url=a.url, timeout=30, headers=auth_headers(a)) as c:
        job = expect(c.post(f"/v1/jobs/{a.id}/cancel")).json()
    state = job["status"] if is_terminal(job["status"]) else f"{job['status']}, cancel requested"
    print(f"job {job['id']}: {state}")
    return 0


def cmd_result(a: argparse.Namespace) -> int:
    with httpx.Client(base_url=a.url, timeout=httpx.Timeout(30.0, read=300.0), headers=auth_headers(a)) as c:
        path, size = save_result(c, a.id, a.out, a.index)
    print(f"saved {path} ({size} bytes)", file=sys.stderr)
    print(path)
    return 0


def add_parsers(sub) -> None:
    j = sub.add_parser("submit", help="submit a job, follow its progress, save the output", formatter_class=FORMATTER,
                       description="Submit a job, follow its progress (reconnecting if the stream drops) and save "
                                   "the output.",
                       epilog="examples:\n  genserve submit \"a lighthouse at dusk\" --size 64x64 --steps 8 -o out.png\n"
                              "  genserve submit \"waves\" --model demo-video --frames 9\n"
                              "  genserve submit \"a cat\" --no-wait              # print the job id and return\n"
                              "  genserve submit \"a cat\" --json > job.json      # the final job record as JSON")
    j.add_argument("prompt", help="the text prompt")
    j.add_argument("--model", default="demo-image", help="model name (see `genserve models`; default demo-image)")
    j.add_argument("--size", type=size_arg, metavar="WxH", help="output size, e.g. 512x512 (default: the model's)")
    j.add_argument("--steps", type=int, help="denoising steps (default: the model's)")
    j.add_argument("--frames", type=int, help="video models: number of frames")
    j.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: the model's)")
    j.add_argument("--negative-prompt", help="what the image should not show")
    j.add_argument("--seed", type=int, help="random seed (default: random; the job record keeps it)")
    j.add_argument("--priority", choices=["high", "standard", "low"], help="queue class (default standard)")
    j.add_argument("--id", help="client-supplied id: resubmitting with it never duplicates the job")
    j.add_argument("--timeout", type=float, metavar="SECONDS", help="deadline from submission (≤ the model's timeout_s)")
    j.add_argument("--webhook", metavar="URL", help="POST signed job events here (needs server.webhook_secret)")
    j.add_argument("--lora", type=lora_arg, action="append", metavar="NAME[:SCALE]",
                   help="a LoRA adapter (see GET /v1/loras) and its scale (default 1); repeatable")
    j.add_argument("--no-wait", action="store_true", help="print the job id (or JSON with --json) and return at once")
    j.add_argument("--json", action="store_true", help="print the job record as JSON on stdout; no progress bar")
    j.add_argument("--out", "-o", metavar="FILE", help="output file (default: <job id>.png|.mp4)")
    j.add_argument("--reconnect-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="keep reconnecting a dropped event stream this long (default 300)")
    j.add_argument("--url", default=DEFAULT_URL, help=URL_HELP)
    j.add_argument("--api-key", help="sent as a Bearer token (default: $GENSERVE_API_KEY)")
    j.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary; print only the output path")
    j.set_defaults(func=cmd_submit)
    key_help = "sent as a Bearer token (default: $GENSERVE_API_KEY)"
    j = sub.add_parser("jobs", help="list recent jobs, newest first", formatter_class=FORMATTER,
                       description="List recent jobs, newest first.",
                       epilog="examples:\n  genserve jobs\n  genserve jobs --status queued --model demo-image\n"
                              "  genserve jobs --status failed -n 200 --json")
    j.add_argument("--status", choices=STATUSES, help="only jobs in this status")
    j.add_argument("--model", help="only jobs for this model")
    j.add_argument("-n", "--limit", type=int, default=50, help="at most this many jobs (1-1000, default 50)")
    j.add_argument("--json", action="store_true", help="print the job records as JSON")
    j.add_argument("--url", default=DEFAULT_URL, help=URL_HELP)
    j.add_argument("--api-key", help=key_help)
    j.set_defaults(func=cmd_jobs)
    c = sub.add_parser("cancel", help="cancel a job", formatter_class=FORMATTER,
                       description="Cancel a queued or running job (a running one stops at its next step).",
                       epilog="example:\n  genserve cancel 0f3c…")
    c.add_argument("id", help="the job id")
    c.add_argument("--url", default=DEFAULT_URL, help=URL_HELP)
    c.add_argument("--api-key", help=key_help)
    c.set_defaults(func=cmd_cancel)
    r = sub.add_parser("result", help="download a finished job's output", formatter_class=FORMATTER,
                       description="Download a succeeded job's output (PNG or MP4).",
                       epilog="examples:\n  genserve result 0f3c… -o cat.png\n  genserve result 0f3c… --index 1")
    r.add_argument("id", help="the job id")
    r.add_argument("-o", "--out", metavar="FILE", help="output file (default: <job id>.png|.mp4)")
    r.add_argument("--index", type=int, default=0, help="which output, for jobs with several (default 0)")
    r.add_argument("--url", default=DEFAULT_URL, help=URL_HELP)
    r.add_argument("--api-key", help=key_help)
    r.set_defaults(func=cmd_result)


def lora_arg(text: str) -> dict:
    """``--lora ink:0.8`` as {"name": "ink", "scale": 0.8}, checked before anything is sent."""
    name, _, scale = text.partition(":")
    if not name:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME or NAME:SCALE (e.g. ink:0.8)")
    try:
        return {"name": name, "scale": float(scale)} if scale else {"name": name}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: the scale must be a number (e.g. ink:0.8)") from None


def cmd_submit(a: argparse.Namespace) -> int:
    import httpx
    from tqdm import tqdm

    from ..server.status import JobStatus

    body = {k: v for k, v in {
        "model": a.model, "prompt": a.prompt, "negative_prompt": a.negative_prompt, "steps": a.steps,
        "num_frames": a.frames, "guidance": a.guidance, "seed": a.seed, "priority": a.priority, "id": a.id,
        "webhook": a.webhook, "timeout_s": a.timeout, "loras": a.lora,
    }.items() if v is not None}
    if a.size:
        body["width"], body["height"] = a.size
    with httpx.Client(base_url=a.url, timeout=httpx.Timeout(30.0, read=None), headers=auth_headers(a)) as client:
        job = expect(client.post("/v1/jobs", json=body), 202).json()
        if a.no_wait:
            print(json.dumps(job, indent=2) if a.json else job["id"])
            return 0
        say = (lambda msg: None) if a.quiet or a.json else (lambda msg: tqdm.write(msg, file=sys.stderr))
        say(f"job {job['id']} queued (model {job['model']})")
        bar = tqdm(total=job["params"]["steps"], unit="step", file=sys.stderr, disable=a.quiet or a.json)

        def queued(pos: int | None) -> None:
            if bar.n == 0:
                bar.set_description("queued" + (f" ({pos} ahead)" if pos is not None else ""))

        def on_event(event: str, data: dict) -> None:
            if event == "progress":
                bar.total, bar.n = data["total"], data["step"]
                bar.refresh()
            elif event == "started":
                watch.stop.set()
                bar.set_description(f"batch of {data.get('batch_size')} on {data.get('worker')}")
            elif event == "queued" and bar.n:  # retried: back in the queue
                bar.set_description("queued again")

        with QueueWatch(a.url, job["id"], queued, headers=auth_headers(a)) as watch:
            final = follow(client, job["id"], on_event, reconnect_s=a.reconnect_timeout, on_reconnect=say)
        bar.close()
        job = expect(client.get(f"/v1/jobs/{job['id']}")).json()
        if final != JobStatus.SUCCEEDED:
            if a.json:
                print(json.dumps(job, indent=2))
            err = job.get("error") or {}
            print(f"genserve: job {job['id']} {job['status']}: {err.get('code') or ''} {err.get('message') or ''}".rstrip(),
                  file=sys.stderr)
            return 1
        out, size = save_result(client, job["id"], a.out)
        if a.json:
            print(json.dumps({**job, "output": str(out)}, indent=2))
            return 0
        b = {k: "-" if v is None else f"{v:.3f}s" for k, v in job["breakdown"].items()}
        say(f"saved {out} ({size} bytes); queue {b['queue_wait_s']}, cold start {b['cold_start_s']}, "
            f"inference {b['inference_s']}, total {b['total_s']}, batch of {job['batch']['size']}")
        print(out)
    return 0
