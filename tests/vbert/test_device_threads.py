"""CPU thread discipline (vbert/device.py): the start-up thread computes on one thread, step threads get
the reserved intra-op threads. Run in a child process: the setting is process-wide."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_reserved_threads_go_to_step_threads():
    code = textwrap.dedent("""
        import threading, torch
        from vbert.device import enter_step_thread, reserve_cpu_for_steps, step_threads
        assert step_threads() == torch.get_num_threads()       # nothing reserved: torch's count
        enter_step_thread()                                     # a no-op before a reservation
        assert reserve_cpu_for_steps(3) == 3
        assert torch.get_num_threads() == 1                     # this thread makes no OpenMP pool
        assert reserve_cpu_for_steps() == 3                     # idempotent: the count stays
        seen = []
        import numba
        def step():
            seen.append(torch.get_num_threads())
            enter_step_thread()
            seen.append(torch.get_num_threads())
            seen.append(numba.get_num_threads())              # numba's parallel kernels too (LoRA in decode)
        t = threading.Thread(target=step); t.start(); t.join()
        assert seen[1] == 3 and seen[2] == 3, seen
        reserve_cpu_for_steps(1)                                # a replica with one step thread
        t = threading.Thread(target=step); t.start(); t.join()
        assert seen[4:] == [1, 1], seen
        reserve_cpu_for_steps(3)
        assert step_threads() == 3 and torch.get_num_threads() == 1
        try:
            reserve_cpu_for_steps(0)
        except ValueError as e:
            assert "num_threads" in str(e)
        else:
            raise AssertionError("0 threads accepted")
        print("ok")
    """)
    env = {**os.environ, "NUMBA_NUM_THREADS": "4"}          # numba's pool: 4 threads whatever the machine
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_engine_step_thread_takes_the_reserved_threads(tmp_path):
    """The generation engine's loop calls its runner's enter_step_thread on the thread that runs steps;
    a request computed there still gives its tokens."""
    pytest.importorskip("transformers")
    code = textwrap.dedent(f"""
        import threading, time, torch
        from pathlib import Path
        from tests.decoder_models import write_tiny_decoder_checkpoint
        from vbert.decoder_backbone import DecoderBackbone, DecoderBackboneConfig
        from vbert.device import DeviceContext, reserve_cpu_for_steps
        from vbert.sampling import SamplingParams
        from scheduler.generation_engine import GenerationEngine, GenerationEngineConfig
        from scheduler.generation_policy import GenerationSchedulerConfig
        from scheduler.generation_runner import GenerationRunner
        from scheduler.types import Request
        reserve_cpu_for_steps(2)
        path = write_tiny_decoder_checkpoint(Path({str(tmp_path)!r}) / "tiny", seed=0)
        bb = DecoderBackbone.load(DecoderBackboneConfig(path=str(path), kv_cache_bytes=1 << 20),
                                  DeviceContext.create("cpu"))
        assert torch.get_num_threads() == 1
        seen = []
        class Runner(GenerationRunner):
            def execute(self, batch):
                seen.append((threading.current_thread().name, torch.get_num_threads()))
                return super().execute(batch)
        engine = GenerationEngine(GenerationEngineConfig(), GenerationSchedulerConfig(), Runner(bb.model, bb.kv),
                                  bb.tokenizer, bb.eos_token_ids).start()
        try:
            req = Request(tenant_id=1, adapter_id=None, deadline=time.monotonic() + 60, prompt_ids=[5, 6, 7],
                          max_new_tokens=3)
            result = engine.submit(req, SamplingParams(temperature=0, max_new_tokens=3), ignore_eos=True).final()
        finally:
            engine.stop(drain=False, timeout=5)
        assert len(result.token_ids) == 3, result
        assert seen and all(name != "MainThread" and n == 2 for name, n in seen), seen
        print("ok")
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
