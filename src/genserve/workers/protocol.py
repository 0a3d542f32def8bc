"""The server <-> worker message protocol. Messages are plain dicts sent over a multiprocessing Pipe.

server -> worker (``op``):
  load     {model, spec: {path, kind, dtype}}
  run      {batch_id, model, kind, params: {width, height, num_frames, steps, guidance, fps},
            jobs: [{id, prompt, negative_prompt, seed}]}
  cancel   {batch_id, job_ids}            (honoured at the next step boundary)
  shutdown {}
worker -> server (``ev``):
  ready        {worker, device, pid, threads}
  heartbeat    {t}                    (every heartbeat_s, from its own thread)
  loaded       {model, cached, load_start, load_end, bytes}
  load_failed  {model, code, message}
  started      {batch_id, t}
  progress     {batch_id, step, total}
  job_canceled {batch_id, job_id, t}
  job_done     {batch_id, job_id, result: {key, content_type, bytes}, inference_start, inference_end,
                output_written}
  batch_done   {batch_id, t}
  batch_failed {batch_id, code, message}

Room to grow (DESIGN §7): a later ``join`` op can add jobs to a running batch at a step boundary;
nothing here assumes a batch is fixed beyond what ``run`` says.
"""
from __future__ import annotations

LOAD, RUN, CANCEL, SHUTDOWN = "load", "run", "cancel", "shutdown"
