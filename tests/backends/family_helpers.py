"""Running jobs through PipelineRunner the way the worker does, and reading their outputs back."""
from __future__ import annotations

import io

import numpy as np
from PIL import Image

from genserve.backends.image_input import data_url


def job(jid: str, seed: int, negative: str | None = None, prompt: str = "a red fox", image: str | None = None):
    return {"id": jid, "prompt": prompt, "negative_prompt": negative, "seed": seed, "image": image}


def run_batch(runner, model: str, kind: str, jobs: list[dict], **params):
    p = {"width": 32, "height": 32, "num_frames": 5 if kind == "video" else 0, "steps": 2, "guidance": 3.0, "fps": 8}
    p.update(params)
    events: list[dict] = []
    mem = runner.run({"batch_id": f"b-{jobs[0]['id']}", "model": model, "kind": kind, "params": p, "jobs": jobs},
                     events.append, set())
    return events, mem


def output(runner, jid: str, kind: str) -> np.ndarray:
    """The job's output as uint8 pixels: (H, W, 3) for an image, (F, H, W, 3) for a video."""
    if kind == "image":
        return np.asarray(Image.open(io.BytesIO(runner.store.local_path(f"{jid}/output.png").read_bytes())).convert("RGB"))
    import av

    with av.open(str(runner.store.local_path(f"{jid}/output.mp4"))) as c:
        return np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])


def diff(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.abs(a.astype(np.int16) - b.astype(np.int16)).max())


def sample_image() -> str:
    rng = np.random.RandomState(3)
    return data_url(Image.fromarray((rng.rand(40, 56, 3) * 255).astype("uint8")))
