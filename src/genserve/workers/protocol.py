"""The server <-> worker message protocol. Messages are plain dicts sent over a multiprocessing Pipe.

server -> worker (``op``):
  load     {model, spec: {path, kind, dtype, true_cfg_scale?, max_sequence_length?,
                   source?, endpoint_url?, region?, cache?}, reason}   (source: s3://…, fetched into cache)
  unload   {model}                        (GPU: kept in the host-RAM tier when it fits)
  run      {batch_id, model, kind, params: {width, height, num_frames, steps, guidance, fps},
            jobs: [{id, prompt, negative_prompt, seed, image?}]}   (image: a data URL)
  run (step mode) adds {mode: "step", max_size} and per job {steps, guidance}: a running set that
           later ``join`` messages add to (step-level batching, backends/step_runner.py)
  join     {batch_id, jobs: [...]}        (enter the running set at its next step; dropped when
                                           that set already ended — the engine requeues them)
  pause    {batch_id, job_ids}            (step mode: out of the set at the next step boundary, latents
                                           kept on the worker; a later run/join of the job resumes it)
  cancel   {batch_id, job_ids}            (honoured at the next step boundary)
  shutdown {}
  hello    {}                             (a restarted server re-attached: unload all, say ready again)
worker -> server (``ev``):
  ready        {worker, device, device_name, pid, threads, interop_threads, thread_env: {OMP_NUM_THREADS, …, OMP_WAIT_POLICY},
                capacity_bytes,
                finished_before?: {job_id: {inference_start, inference_end, output_written}}}
                                      (a Ray actor after a re-attach: the jobs it finished for the old server)
  heartbeat    {t}                    (every heartbeat_s, from its own thread)
  loaded       {model, cached, load_start, load_end, bytes, tier: disk | page_cache | host | resident,
                compiled, compile_s, compiles}   (compile + warm-up: inside load_start..load_end)
  unloaded     {model, freed_bytes, kept_in, used_bytes, resident}
  load_failed  {model, code, message}
  started      {batch_id, t}
  progress     {batch_id, step, total}            (step mode: {batch_id, step, jobs: [[job_id, done, total]]},
                                                   one per denoiser call; each job counts its own steps)
  job_started  {batch_id, job_id, t, joined_step, resumed_from?} (step mode: the job entered the set)
  job_paused   {batch_id, job_id, step}       (step mode: taken out for a higher-priority job)
  job_canceled {batch_id, job_id, t}
  job_done     {batch_id, job_id, result: {key, content_type, bytes}, inference_start, inference_end,
                output_written, step?: {joined_step, shared_with, paused_at},
                execution: {cache, steps_computed, steps_reused, prompt_cache, compiled}}
  batch_done   {batch_id, t, peak_bytes, estimated_bytes, compiles}  (peak: measured on CUDA, else 0; estimate: a
                hint; compiles: graphs torch.compile made during the batch)
  batch_failed {batch_id, code, message}

"""
from __future__ import annotations

LOAD, UNLOAD, RUN, JOIN, PAUSE, CANCEL, SHUTDOWN, HELLO = (
    "load", "unload", "run", "join", "pause", "cancel", "shutdown", "hello")
