"""The ``genserve`` command: serve, submit, models, bench."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DEFAULT_URL = os.environ.get("GENSERVE_URL", "http://127.0.0.1:8000")


def cmd_serve(a: argparse.Namespace) -> int:
    from .config import ConfigError, load_config
    from .server.app import create_app
    from .server.serve import serve

    try:
        config = load_config(a.config or os.environ.get("GENSERVE_CONFIG")).with_overrides(
            host=a.host, port=a.port, data_dir=a.data_dir, workers=a.workers)
    except ConfigError as e:
        print(f"genserve: invalid config: {e}", file=sys.stderr)
        return 2
    from .logs import configure

    configure(a.log_format)
    s = config.server
    from .auth.keys import KeyStore
    from .server.auth import bind_refusal

    keys = KeyStore(s.data_dir)
    refusal = bind_refusal(s.host, keys, config.access, a.insecure)
    keys.close()
    if refusal:
        print(f"genserve: {refusal}", file=sys.stderr)
        return 2
    print(f"genserve: serving {', '.join(config.models)} on http://{s.host}:{s.port} (data in {s.data_dir})", flush=True)
    # log_config=None: uvicorn's loggers go through the root handler, so --log-format applies to them too.
    # SIGTERM / SIGINT drain first (server.drain_s), then exit 0: docs/operations.md.
    serve(create_app(config), host=s.host, port=s.port, drain_s=s.drain_s, log_level="warning", log_config=None)
    return 0


def _fail(resp) -> int:
    try:
        err = resp.json()["error"]
        print(f"genserve: {resp.status_code} {err.get('code')}: {err.get('message')}", file=sys.stderr)
    except Exception:
        print(f"genserve: HTTP {resp.status_code}: {resp.text[:500]}", file=sys.stderr)
    return 1


def _auth(a: argparse.Namespace) -> dict[str, str]:
    key = getattr(a, "api_key", None) or os.environ.get("GENSERVE_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def cmd_submit(a: argparse.Namespace) -> int:
    import httpx
    from tqdm import tqdm

    from .status import JobStatus, is_terminal

    body = {k: v for k, v in {
        "model": a.model, "prompt": a.prompt, "negative_prompt": a.negative_prompt, "steps": a.steps,
        "num_frames": a.frames, "guidance": a.guidance, "seed": a.seed, "priority": a.priority, "id": a.id,
    }.items() if v is not None}
    if a.size:
        w, _, h = a.size.lower().partition("x")
        body["width"], body["height"] = int(w), int(h)
    with httpx.Client(base_url=a.url, timeout=httpx.Timeout(30.0, read=None), headers=_auth(a)) as client:
        r = client.post("/v1/jobs", json=body)
        if r.status_code != 202:
            return _fail(r)
        job = r.json()
        print(f"job {job['id']} queued (model {job['model']})", file=sys.stderr)
        bar = tqdm(total=job["params"]["steps"], unit="step", file=sys.stderr, disable=a.quiet)
        final = None
        with client.stream("GET", f"/v1/jobs/{job['id']}/events") as stream:
            event = None
            for line in stream.iter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                elif line.startswith("data:"):
                    data = json.loads(line[5:])
                    if event == "progress":
                        bar.total = data["total"]
                        bar.n = data["step"]
                        bar.refresh()
                    elif event == "started":
                        bar.set_description(f"batch of {data.get('batch_size')} on {data.get('worker')}")
                    elif is_terminal(event):
                        final = event
                        break
        bar.close()
        job = client.get(f"/v1/jobs/{job['id']}").json()
        if final != JobStatus.SUCCEEDED:
            err = job.get("error") or {}
            print(f"job {job['id']} {job['status']}: {err.get('code')} {err.get('message') or ''}", file=sys.stderr)
            return 1
        res = client.get(f"/v1/jobs/{job['id']}/result")
        ext = ".mp4" if res.headers.get("content-type", "").startswith("video/") else ".png"
        out = Path(a.out or f"{job['id']}{ext}")
        out.write_bytes(res.content)
        b = {k: "-" if v is None else f"{v:.3f}s" for k, v in job["breakdown"].items()}
        print(f"saved {out} ({len(res.content)} bytes); queue {b['queue_wait_s']}, cold start {b['cold_start_s']}, "
              f"inference {b['inference_s']}, total {b['total_s']}, batch of {job['batch']['size']}", file=sys.stderr)
        print(out)
    return 0


def cmd_models(a: argparse.Namespace) -> int:
    if a.url is None:
        from .config import ConfigError, load_config

        try:
            config = load_config(a.config)
        except ConfigError as e:
            print(f"genserve: invalid config: {e}", file=sys.stderr)
            return 2
        rows = [{"id": n, **m.public()} for n, m in config.models.items()]
    else:
        import httpx

        r = httpx.get(f"{a.url}/v1/models", timeout=10, headers=_auth(a))
        if r.status_code != 200:
            return _fail(r)
        rows = r.json()["data"]
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'MODEL':<20} {'KIND':<6} {'BATCH':>5} {'WAIT ms':>7} {'STEPS':>9} {'SIZES / LIMIT':<30} SOURCE")
    for m in rows:
        sizes = ", ".join(m["sizes"]) if m.get("sizes") else f"≤ {m['max_pixels']} px"
        print(f"{m['id']:<20} {m['kind']:<6} {m['max_batch_size']:>5} {m['max_wait_ms']:>7} "
              f"{m['default_steps']:>4}/{m['max_steps']:<4} {sizes:<30} {m['source']}")
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    from .bench.report import compare, table

    if a.compare:
        x, y = (json.loads(Path(p).read_text()) for p in a.compare)
        print(compare(x, y))
        return 0
    import asyncio

    from tqdm import tqdm

    from .bench.runner import run
    from .bench.workload import WorkloadError, load_workload

    try:
        workload = load_workload(a.workload).with_arrival(
            pattern=a.pattern, concurrency=a.concurrency, rate=a.rate, burst_size=a.burst_size,
            burst_interval_s=a.burst_interval)
    except (WorkloadError, OSError, TypeError) as e:
        print(f"genserve: invalid workload: {e}", file=sys.stderr)
        return 2
    bar = tqdm(total=a.requests, unit="req", file=sys.stderr, disable=a.quiet)
    errors = 0

    def done(r: dict) -> None:
        nonlocal errors
        errors += not r["ok"]
        bar.set_postfix(errors=errors, refresh=False)
        bar.update(1)

    print(f"genserve bench: {a.requests} requests to {a.url} ({a.api}), {workload.arrival.describe()}", file=sys.stderr)
    result = asyncio.run(run(a.url, workload, a.requests, api=a.api, seed=a.seed, timeout=a.timeout,
                             api_key=a.api_key, on_done=done, label=a.label))
    bar.close()
    print(table(result))
    out = Path(a.out)
    out.write_text(json.dumps(result, indent=1))
    print(f"\nwrote {out}", file=sys.stderr)
    if a.plot:
        from .bench.plot import plot

        print(f"wrote {plot(result, a.plot)}", file=sys.stderr)
    return 0 if result["summary"]["errors"] == 0 or a.allow_errors else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="genserve", description="Self-hosted inference for image and video diffusion models")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="start the server")
    s.add_argument("--config", help="genserve.toml (default: $GENSERVE_CONFIG or the built-in demo catalog)")
    s.add_argument("--host")
    s.add_argument("--port", type=int)
    s.add_argument("--data-dir")
    s.add_argument("--workers", type=int, help="CPU workers when there is no GPU (default 1)")
    s.add_argument("--log-format", choices=["text", "json"], default="text",
                   help="json: one object per line with job_id, batch_id, worker, stage and timings")
    s.add_argument("--insecure", action="store_true",
                   help="serve on a non-loopback address without any API key (anyone reaching the port is admin)")
    s.set_defaults(func=cmd_serve)
    j = sub.add_parser("submit", help="submit a job, follow its progress, save the output")
    j.add_argument("prompt")
    j.add_argument("--model", default="demo-image")
    j.add_argument("--size", help="WIDTHxHEIGHT")
    j.add_argument("--steps", type=int)
    j.add_argument("--frames", type=int, help="video models: number of frames")
    j.add_argument("--guidance", type=float)
    j.add_argument("--negative-prompt")
    j.add_argument("--seed", type=int)
    j.add_argument("--priority", choices=["high", "standard", "low"])
    j.add_argument("--id", help="client-supplied id: resubmitting with it never duplicates the job")
    j.add_argument("--out", "-o", help="output file (default: <job id>.png|.mp4)")
    j.add_argument("--url", default=DEFAULT_URL)
    j.add_argument("--quiet", "-q", action="store_true")
    j.add_argument("--api-key", help="sent as a Bearer token (default: $GENSERVE_API_KEY)")
    j.set_defaults(func=cmd_submit)
    b = sub.add_parser("bench", help="load-test a genserve or OpenAI-images endpoint; compare result files")
    b.add_argument("--url", default=DEFAULT_URL)
    b.add_argument("--api", choices=["genserve", "openai"], default="genserve",
                   help="genserve: /v1/jobs + SSE, with per-stage breakdown and cost; openai: /v1/images/generations")
    b.add_argument("-n", "--requests", type=int, default=100)
    b.add_argument("--workload", help="TOML/JSON request mix and arrival pattern (default: demo-image 64x64, 8 steps)")
    b.add_argument("--pattern", choices=["closed", "rate", "poisson", "bursts"], help="arrival pattern (overrides the file)")
    b.add_argument("-c", "--concurrency", type=int, help="closed loop: requests in flight")
    b.add_argument("--rate", type=float, help="rate / poisson: requests per second")
    b.add_argument("--burst-size", type=int)
    b.add_argument("--burst-interval", type=float, help="seconds between bursts")
    b.add_argument("--seed", type=int, default=0, help="draws the request mix and Poisson arrivals")
    b.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    b.add_argument("--api-key", help="sent as a Bearer token (OpenAI-compatible endpoints)")
    b.add_argument("--label", help="a name for this run in tables and comparisons")
    b.add_argument("--out", "-o", default="bench-result.json")
    b.add_argument("--plot", help="write a PNG: latency distribution and throughput over time")
    b.add_argument("--allow-errors", action="store_true", help="exit 0 even if some requests failed")
    b.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="print two result files side by side")
    b.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_bench)
    m = sub.add_parser("models", help="list the model catalog (of a config file, or of a running server with --url)")
    m.add_argument("--config")
    m.add_argument("--url")
    m.add_argument("--json", action="store_true")
    m.add_argument("--api-key", help="with --url: sent as a Bearer token (default: $GENSERVE_API_KEY)")
    m.set_defaults(func=cmd_models)
    from .sim.cli import add_parsers

    add_parsers(sub)
    from .auth.cli import add_parsers as add_key_parsers

    add_key_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    return a.func(a)


if __name__ == "__main__":
    sys.exit(main())
