"""The ``genserve`` command: serve, submit, jobs, cancel, result, models, bench, config, simulate.

Expected failures (server down, bad arguments, missing files, invalid config) end in one line on
stderr — ``genserve: …`` — and a non-zero exit, never a traceback (see :func:`main`)."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

DEFAULT_URL = os.environ.get("GENSERVE_URL", "http://127.0.0.1:8000")
URL_HELP = "server URL (default: $GENSERVE_URL or http://127.0.0.1:8000)"
CONFIG_HELP = "config file (default: ./genserve.toml, else $GENSERVE_CONFIG, else the built-in demo catalog)"
LOG_LEVELS = ["critical", "error", "warning", "info", "debug"]
FORMATTER = argparse.RawDescriptionHelpFormatter


def size_arg(text: str) -> tuple[int, int]:
    """``--size`` as WIDTHxHEIGHT, checked before anything is sent."""
    from ..config.load import parse_size

    try:
        w, h = parse_size(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not WIDTHxHEIGHT (e.g. 512x512)") from None
    if w <= 0 or h <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: width and height must be positive")
    return w, h


def _load_config(path_arg: str | None):
    """The config every command reads: --config, else ./genserve.toml, else $GENSERVE_CONFIG."""
    from ..config.env import find_config
    from ..config.load import load_config

    return load_config(find_config(path_arg))


def cmd_serve(a: argparse.Namespace) -> int:
    from ..server.http.app import create_app
    from ..server.http.serve import serve

    config = _load_config(a.config).with_overrides(host=a.host, port=a.port, data_dir=a.data_dir, workers=a.workers)
    from ..server.observe.logs import configure

    configure(a.log_format, a.log_level.upper())
    s = config.server
    from ..server.security.auth import bind_refusal
    from ..server.security.keys import KeyStore

    keys = KeyStore(s.data_dir)
    refusal = bind_refusal(s.host, keys, config.access, a.insecure)
    keys.close()
    if refusal:
        print(f"genserve: {refusal}", file=sys.stderr)
        return 2
    print(f"genserve: serving {', '.join(config.models)} on http://{s.host}:{s.port} (data in {s.data_dir})", flush=True)
    # log_config=None: uvicorn's loggers go through the root handler, so --log-format applies to them too.
    # SIGTERM / SIGINT drain first (server.drain_s), then exit 0: docs/operations.md.
    serve(create_app(config), host=s.host, port=s.port, drain_s=s.drain_s, log_level=a.log_level,
          access_log=a.access_log, log_config=None)
    return 0


def cmd_submit(a: argparse.Namespace) -> int:
    import httpx
    from tqdm import tqdm

    from ..server.status import JobStatus
    from .jobs import QueueWatch, auth_headers, expect, follow, save_result

    body = {k: v for k, v in {
        "model": a.model, "prompt": a.prompt, "negative_prompt": a.negative_prompt, "steps": a.steps,
        "num_frames": a.frames, "guidance": a.guidance, "seed": a.seed, "priority": a.priority, "id": a.id,
        "webhook": a.webhook, "timeout_s": a.timeout,
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


def cmd_models(a: argparse.Namespace) -> int:
    if a.url is None:
        config = _load_config(a.config)
        rows = [{"id": n, **m.public()} for n, m in config.models.items()]
    else:
        import httpx

        from .jobs import auth_headers, expect

        rows = expect(httpx.get(f"{a.url}/v1/models", timeout=10, headers=auth_headers(a))).json()["data"]
    if a.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(f"{'MODEL':<20} {'KIND':<6} {'BATCH':>5} {'WAIT ms':>7} {'STEPS':>9} {'SIZES / LIMIT':<30} SOURCE")
    for m in rows:
        sizes = ", ".join(m["sizes"]) if m.get("sizes") else f"≤ {m['max_pixels']} px"
        print(f"{m['id']:<20} {m['kind']:<6} {m['max_batch_size']:>5} {m['max_wait_ms']:>7} "
              f"{m['default_steps']:>4}/{m['max_steps']:<4} {sizes:<30} {m['source']}")
    return 0


def _read_json(path: str) -> dict:
    from .jobs import CLIError

    try:
        return json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise CLIError(f"{path}: not a JSON result file ({e})", 2) from None


def cmd_bench(a: argparse.Namespace) -> int:
    from ..bench.report import compare, table

    if a.compare:
        x, y = (_read_json(p) for p in a.compare)
        print(compare(x, y))
        return 0
    import asyncio

    from tqdm import tqdm

    from ..bench.runner import run
    from ..bench.workload import WorkloadError, load_workload

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
        from ..bench.plot import plot

        print(f"wrote {plot(result, a.plot)}", file=sys.stderr)
    return 0 if result["summary"]["errors"] == 0 or a.allow_errors else 1


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("genserve")
    except PackageNotFoundError:
        return "0+unknown"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="genserve", description="Self-hosted inference for image and video diffusion models.",
        formatter_class=FORMATTER,
        epilog="examples:\n  genserve serve                               # the demo catalog on http://127.0.0.1:8000\n"
               "  genserve submit \"a red fox\" --size 64x64 -o fox.png\n  genserve jobs --status queued\n"
               "  genserve config check\n\nRun `genserve COMMAND --help` for a command's options.")
    p.add_argument("--version", action="version", version=f"genserve {_version()}")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")
    s = sub.add_parser("serve", help="start the server", formatter_class=FORMATTER, description="Start the server.",
                       epilog="examples:\n  genserve serve\n  genserve serve --config prod.toml --host 0.0.0.0 --port 8000\n"
                              "  genserve serve --log-format json --log-level info --access-log\n"
                              "  GENSERVE_SERVER__WEBHOOK_SECRET=whsec_… genserve serve")
    s.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    s.add_argument("--host", help="bind address (overrides server.host; default 127.0.0.1)")
    s.add_argument("--port", type=int, help="port (overrides server.port; default 8000)")
    s.add_argument("--data-dir", metavar="DIR", help="job store, results and built demo models (overrides server.data_dir)")
    s.add_argument("--workers", type=int, help="CPU workers when there is no GPU (overrides server.workers; default 1)")
    s.add_argument("--log-format", choices=["text", "json"], default="text",
                   help="json: one object per line with job_id, batch_id, worker, stage and timings (default text)")
    s.add_argument("--insecure", action="store_true",
                   help="serve on a non-loopback address without any API key (anyone reaching the port is admin)")
    s.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="least severe level logged (default info)")
    s.add_argument("--access-log", action="store_true", help="log one line per HTTP request (off by default)")
    s.set_defaults(func=cmd_serve)
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
    j.add_argument("--no-wait", action="store_true", help="print the job id (or JSON with --json) and return at once")
    j.add_argument("--json", action="store_true", help="print the job record as JSON on stdout; no progress bar")
    j.add_argument("--out", "-o", metavar="FILE", help="output file (default: <job id>.png|.mp4)")
    j.add_argument("--reconnect-timeout", type=float, default=300.0, metavar="SECONDS",
                   help="keep reconnecting a dropped event stream this long (default 300)")
    j.add_argument("--url", default=DEFAULT_URL, help=URL_HELP)
    j.add_argument("--api-key", help="sent as a Bearer token (default: $GENSERVE_API_KEY)")
    j.add_argument("--quiet", "-q", action="store_true", help="no progress bar or summary; print only the output path")
    j.set_defaults(func=cmd_submit)
    from .jobs import add_parsers as add_job_parsers

    add_job_parsers(sub, DEFAULT_URL, FORMATTER)
    b = sub.add_parser("bench", help="load-test a genserve or OpenAI-images endpoint; compare result files",
                       formatter_class=FORMATTER, description="Load-test an endpoint, or compare two result files.",
                       epilog="examples:\n  genserve bench -n 200 -c 8 --out a.json\n"
                              "  genserve bench --pattern poisson --rate 4 -n 500 --plot run.png\n"
                              "  genserve bench --api openai --url http://host:8000 --api-key KEY\n"
                              "  genserve bench --compare a.json b.json")
    b.add_argument("--url", default=DEFAULT_URL, help=URL_HELP)
    b.add_argument("--api", choices=["genserve", "openai"], default="genserve",
                   help="genserve: /v1/jobs + SSE, with per-stage breakdown and cost; openai: /v1/images/generations")
    b.add_argument("-n", "--requests", type=int, default=100, help="requests to send (default 100)")
    b.add_argument("--workload", help="TOML/JSON request mix and arrival pattern (default: demo-image 64x64, 8 steps)")
    b.add_argument("--pattern", choices=["closed", "rate", "poisson", "bursts"], help="arrival pattern (overrides the file)")
    b.add_argument("-c", "--concurrency", type=int, help="closed loop: requests in flight")
    b.add_argument("--rate", type=float, help="rate / poisson: requests per second")
    b.add_argument("--burst-size", type=int, help="bursts: requests per burst")
    b.add_argument("--burst-interval", type=float, help="seconds between bursts")
    b.add_argument("--seed", type=int, default=0, help="draws the request mix and Poisson arrivals")
    b.add_argument("--timeout", type=float, default=600.0, help="per request, seconds")
    b.add_argument("--api-key", help="sent as a Bearer token (OpenAI-compatible endpoints)")
    b.add_argument("--label", help="a name for this run in tables and comparisons")
    b.add_argument("--out", "-o", default="bench-result.json", help="result file (default bench-result.json)")
    b.add_argument("--plot", help="write a PNG: latency distribution and throughput over time")
    b.add_argument("--allow-errors", action="store_true", help="exit 0 even if some requests failed")
    b.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), help="print two result files side by side")
    b.add_argument("--quiet", "-q", action="store_true", help="no progress bar")
    b.set_defaults(func=cmd_bench)
    m = sub.add_parser("models", help="list the model catalog (of a config file, or of a running server with --url)",
                       formatter_class=FORMATTER, description="List the model catalog.",
                       epilog="examples:\n  genserve models\n  genserve models --config prod.toml --json\n"
                              "  genserve models --url http://127.0.0.1:8000   # with queue depths")
    m.add_argument("--config", metavar="FILE", help=CONFIG_HELP)
    m.add_argument("--url", help="ask this running server instead of reading a config")
    m.add_argument("--api-key", help="with --url: sent as a Bearer token (default: $GENSERVE_API_KEY)")
    m.add_argument("--json", action="store_true", help="print JSON")
    m.set_defaults(func=cmd_models)
    from .config import add_parsers as add_config_parsers
    from .simulate import add_parsers

    add_config_parsers(sub)
    add_parsers(sub)
    from .keys import add_parsers as add_key_parsers

    add_key_parsers(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    return run(a)


def run(a: argparse.Namespace) -> int:
    """Run a parsed command; expected failures become one line on stderr and an exit status."""
    import httpx

    from ..config.errors import ConfigError, ConfigErrors
    from .jobs import CLIError

    try:
        return a.func(a)
    except ConfigErrors as e:
        print(f"genserve: invalid config ({len(e.errors)} errors):", file=sys.stderr)
        for err in e.errors:
            print(f"  {err}", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"genserve: invalid config: {e}", file=sys.stderr)
        return 2
    except CLIError as e:
        print(f"genserve: {e}", file=sys.stderr)
        return e.code
    except httpx.ConnectError as e:
        url = str(e.request.url.copy_with(path="/", query=None)) if _has_request(e) else "the server"
        print(f"genserve: cannot connect to {url} (is `genserve serve` running? set --url or $GENSERVE_URL)",
              file=sys.stderr)
        return 3
    except httpx.TimeoutException as e:
        print(f"genserve: the server did not answer in time ({type(e).__name__})", file=sys.stderr)
        return 3
    except httpx.HTTPError as e:
        print(f"genserve: HTTP error: {e}", file=sys.stderr)
        return 3
    except OSError as e:
        print(f"genserve: {e.filename or ''}{': ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("genserve: interrupted", file=sys.stderr)
        return 130


def _has_request(e: Exception) -> bool:
    try:
        e.request  # noqa: B018  (raises RuntimeError when the error has no request)
        return True
    except RuntimeError:
        return False


if __name__ == "__main__":
    sys.exit(main())
