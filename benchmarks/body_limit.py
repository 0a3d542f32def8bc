"""Body limit figures: a 200 MB body (declared, and streamed chunked) against a live server; /healthz latency
and server RSS meanwhile. Usage: PYTHONPATH=src python benchmarks/body_limit.py"""
import socket, time, threading, httpx, tempfile, os
from pathlib import Path
from genserve.bench.live import LiveServer
d = Path(tempfile.mkdtemp())
def rss(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS"): return int(line.split()[1]) // 1024
with LiveServer(d, workers=0) as srv:
    pid = srv.proc.pid
    r0 = rss(pid)
    # 1) declared 200 MB
    t = time.perf_counter()
    with socket.create_connection(("127.0.0.1", srv.port)) as s:
        s.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 209715200\r\n\r\n")
        head = s.recv(4096)
    t_declared = time.perf_counter() - t
    # 2) 200 MB streamed chunked as fast as possible; health checks meanwhile
    lat = []
    stop = False
    def health():
        with httpx.Client(base_url=srv.url, timeout=30) as c:
            while not stop:
                a = time.perf_counter(); c.get("/healthz"); lat.append(time.perf_counter() - a); time.sleep(0.02)
    th = threading.Thread(target=health); th.start()
    t = time.perf_counter(); sent = 0; got = b""
    with socket.create_connection(("127.0.0.1", srv.port)) as s:
        s.sendall(b"POST /v1/jobs HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"%x\r\n%s\r\n" % (1 << 20, b" " * (1 << 20))
        s.settimeout(0.01)
        try:
            while sent < 200 << 20 and b"\r\n\r\n" not in got:
                s.sendall(chunk); sent += 1 << 20
                try: got += s.recv(4096)
                except (TimeoutError, socket.timeout): pass
        except OSError as e:
            pass
        s.settimeout(5)
        try:
            while b"\r\n\r\n" not in got: got += s.recv(4096)
        except OSError: pass
    t_stream = time.perf_counter() - t
    time.sleep(0.5); stop = True; th.join()
    r1 = rss(pid)
    print(f"declared 200MB: {head[:12]!r} in {t_declared*1000:.1f} ms")
    print(f"chunked: {got[:12]!r} after {sent>>20} MiB offered, {t_stream*1000:.0f} ms")
    print(f"healthz during: n={len(lat)} max={max(lat)*1000:.1f} ms median={sorted(lat)[len(lat)//2]*1000:.1f} ms")
    print(f"server RSS: {r0} MiB before, {r1} MiB after")
