"""The worker's prompt-embedding cache (genserve/backends/prompt_cache.py) on the real demo
pipelines, called as the worker calls the runners: a second identical prompt is a hit, outputs are
byte-identical (the raw pixel / frame values) with and without the cache (request and step level, image and video), negative
prompts are keyed as texts of their own, and the cache stays within its byte cap."""
import queue

import numpy as np
import pytest
import torch

from genserve.backends.demo import ensure_demo_model
from genserve.backends.prompt_cache import ClipText, Embedder, PromptCache
from genserve.backends.runner import PipelineRunner
from genserve.backends.step_runner import run_steps
from genserve.storage import LocalResultStore

pytestmark = pytest.mark.slow

IMAGE = {"width": 32, "height": 32, "num_frames": 0, "steps": 2, "guidance": 1.0, "fps": 8}
VIDEO = {"width": 32, "height": 32, "num_frames": 5, "steps": 2, "guidance": 1.0, "fps": 8}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {k: ensure_demo_model(k, root / f"demo-{k}") for k in ("image", "video")}


def raw(kind, output, fps, **_):
    """The output's exact values (an MP4 would hide, or add, differences)."""
    return np.asarray(output).tobytes()


def runner(models, tmp_path_factory, cache_bytes):
    r = PipelineRunner("cpu", LocalResultStore(tmp_path_factory.mktemp("results")), encode=raw)
    for kind in ("image", "video"):
        r.load(kind, {"path": str(models[kind]), "kind": kind, "dtype": "float32", "prompt_cache_bytes": cache_bytes})
    return r


@pytest.fixture(scope="module")
def cached(models, tmp_path_factory):
    return runner(models, tmp_path_factory, 1 << 20)


@pytest.fixture(scope="module")
def plain(models, tmp_path_factory):
    return runner(models, tmp_path_factory, 0)


def run(r, kind, jobs, **params):
    """Run one request-level batch; {job id: (output bytes, execution)}."""
    events = []
    msg = {"batch_id": "b", "model": kind, "kind": kind, "params": {**(IMAGE if kind == "image" else VIDEO), **params},
           "jobs": [{"id": jid, "prompt": prompt, "negative_prompt": neg, "seed": 7} for jid, prompt, neg in jobs]}
    r.run(msg, events.append, set())
    return {e["job_id"]: (r.store.read(e["result"]["key"]), e["execution"]) for e in events if e["ev"] == "job_done"}


def test_a_second_identical_prompt_hits_and_gives_identical_bytes(cached, plain):
    first = run(cached, "image", [("i1", "a red fox", None)])["i1"]
    second = run(cached, "image", [("i2", "a red fox", None)])["i2"]
    off = run(plain, "image", [("i3", "a red fox", None)])["i3"]
    assert first[1]["prompt_cache"] == "miss" and second[1]["prompt_cache"] == "hit"
    assert off[1]["prompt_cache"] is None  # prompt_cache_bytes = 0: off
    assert first[0] == second[0] == off[0]
    other = run(cached, "image", [("i4", "a blue fox", None)])["i4"]
    assert other[1]["prompt_cache"] == "miss" and other[0] != first[0]  # the bytes say something


def test_a_batch_mixing_hits_and_misses_equals_the_uncached_batch(cached, plain):
    run(cached, "image", [("m0", "a green owl", None)])
    jobs = [("m1", "a green owl", None), ("m2", "a grey wolf", None)]
    got, want = run(cached, "image", jobs), run(plain, "image", jobs)
    assert [got[j][1]["prompt_cache"] for j in ("m1", "m2")] == ["hit", "miss"]
    assert got["m1"][0] == want["m1"][0] and got["m2"][0] == want["m2"][0]


def test_negative_prompts_are_texts_of_their_own(cached, plain):
    g = {"guidance": 5.0}
    a = run(cached, "image", [("n1", "a castle", "fog")], **g)["n1"]
    b = run(cached, "image", [("n2", "a castle", "rain")], **g)["n2"]  # same prompt, new negative: miss
    c = run(cached, "image", [("n3", "a castle", "rain")], **g)["n3"]
    d = run(cached, "image", [("n4", "a castle", None)], **g)["n4"]  # none = "", not cached yet
    e = run(cached, "image", [("n5", "a castle", None)], **g)["n5"]
    assert [x[1]["prompt_cache"] for x in (a, b, c, d, e)] == ["miss", "miss", "hit", "miss", "hit"]
    want = run(plain, "image", [("p2", "a castle", "rain"), ("p4", "a castle", None)], **g)
    assert b[0] == c[0] == want["p2"][0] and d[0] == e[0] == want["p4"][0] and a[0] != b[0]


def test_video_hits_and_gives_identical_bytes(cached, plain):
    g = {"guidance": 3.0}
    first = run(cached, "video", [("v1", "waves", None)], **g)["v1"]
    second = run(cached, "video", [("v2", "waves", None)], **g)["v2"]
    off = run(plain, "video", [("v3", "waves", None)], **g)["v3"]
    assert (first[1]["prompt_cache"], second[1]["prompt_cache"]) == ("miss", "hit")
    assert first[0] == second[0] == off[0]


def run_set(r, jobs):
    events = []
    msg = {"batch_id": "s", "model": "image", "kind": "image", "params": IMAGE, "mode": "step", "max_size": 4,
           "jobs": [{"id": jid, "prompt": prompt, "negative_prompt": None, "seed": 3, "steps": 2, "guidance": g}
                    for jid, prompt, g in jobs]}
    run_steps(r, msg, events.append, set(), queue.Queue(), set())
    return {e["job_id"]: (r.store.read(e["result"]["key"]), e["execution"]) for e in events if e["ev"] == "job_done"}


def test_step_level_uses_the_cache_and_gives_identical_bytes(cached, plain):
    jobs = [("s1", "a lighthouse", 4.0), ("s2", "a harbour", 1.0)]
    first, second, off = run_set(cached, jobs), run_set(cached, [(j + "b", p, g) for j, p, g in jobs]), run_set(plain, jobs)
    assert [first[j][1]["prompt_cache"] for j in ("s1", "s2")] == ["miss", "miss"]
    assert [second[j][1]["prompt_cache"] for j in ("s1b", "s2b")] == ["hit", "hit"]
    assert off["s1"][1]["prompt_cache"] is None
    for j in ("s1", "s2"):
        assert first[j][0] == second[j + "b"][0] == off[j][0]


def test_eviction_keeps_the_cache_within_its_byte_cap(cached):
    pipe = cached.pipes["image"]
    one = 77 * 32 * 4  # a demo CLIP embedding: 77 tokens x 32 floats
    emb = Embedder("image", ClipText(), PromptCache(int(2.5 * one)))
    for text in ("a", "b", "c"):
        emb.rows(pipe, [text], [""], "cpu")
    assert len(emb.cache) == 2 and emb.cache.nbytes == 2 * one <= emb.cache.max_bytes
    assert emb.rows(pipe, ["a"], [""], "cpu")[1] == [False]  # the oldest went first
    assert emb.rows(pipe, ["c"], [""], "cpu")[1] == [True]
    assert emb.cache.nbytes <= emb.cache.max_bytes


def test_lru_order_and_entries_larger_than_the_cap():
    c = PromptCache(100)
    c.put(("a",), torch.zeros(10))  # 40 bytes
    c.put(("b",), torch.zeros(10))
    assert c.get(("a",)) is not None  # a is now the most recent
    c.put(("c",), torch.zeros(10))  # 120 > 100: b goes
    assert c.get(("b",)) is None and c.get(("a",)) is not None and c.get(("c",)) is not None
    c.put(("big",), torch.zeros(100))  # 400 bytes: never kept
    assert c.get(("big",)) is None and c.nbytes == 80
    assert (c.hits, c.misses) == (3, 2)
