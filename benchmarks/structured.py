#!/usr/bin/env python
"""Structured output: what a grammar costs a decode step.

    python benchmarks/structured.py --json benchmarks/results/cpu-DATE/structured/structured.json

The default decoder (SmolLM2-135M-Instruct; --model for another) in our engine: --batch requests at once, each
sampling --tokens tokens (temperature 0.8, seeded, never the end of sequence), with every request free, or
every request under one grammar (vbert.structured, llguidance):
- regex: `[A-Za-z ,.'\\n]+` (letters and punctuation, never complete: every row stays masked to the end);
- json: a JSON Schema whose one property is a free string (rows leave when they close the object);
- choice: one of 32 strings of 40 characters (rows leave after a few tokens; mostly prefill);
- tools: OpenAI tool calling with tool_choice "auto" and one get_weather tool (dispatcher.tool_calling: any text,
  or text then a tagged call; the prompts ask for none, so rows write text under the grammar to the end).
The end-of-sequence tokens get a logit bias of -100 in every contender (ignore_eos alone does not keep a
grammar's rows running: a drawn end of sequence completes a grammar that accepts there). Contenders run in a
rotating order, --rounds rounds each. Reported per contender: the median time of the decode
steps that ran all --batch rows (each row one token), its ratio to free text's with a 95 % bootstrap interval,
the time the runner spent in the grammars per constrained row-step (the masks and the token advances, timed
inside the step), the mean tokens per request, how many answers completed their grammar (the others reached
--tokens) and whether every completed answer follows it.

Writes JSON and a PNG next to it.
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from tqdm import tqdm  # noqa: E402

from decode_lora import bootstrap_median  # noqa: E402
from dispatcher.tool_calling import TAG, tool_plan  # noqa: E402
from generation import git_state  # noqa: E402
from generation_workload import load_average, load_default_decoder, machine, utc_now  # noqa: E402
from scheduler.generation_engine import GenerationEngine, GenerationEngineConfig  # noqa: E402
from scheduler.generation_policy import GenerationSchedulerConfig  # noqa: E402
from scheduler.generation_runner import GenerationRunner  # noqa: E402
from scheduler.types import Request  # noqa: E402
from vbert import structured as structured_mod  # noqa: E402
from vbert.detokenize import FinishReason  # noqa: E402
from vbert.sampling import SamplingParams  # noqa: E402
from vbert.structured import StructuredOutput  # noqa: E402

REGEX = "[A-Za-z ,.'\\n]+"
SCHEMA = {"type": "object", "properties": {"story": {"type": "string"}}, "required": ["story"],
          "additionalProperties": False}
CHOICES = tuple(f"option {i:02d}: " + "abcdefghijklmnopqrstuvwxyz"[i % 26] * 28 for i in range(32))
TOOLS = tool_plan({"tools": [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather of a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"],
        "additionalProperties": False}}}]})
PROMPTS = ["Write a short story about a lighthouse keeper.", "Describe the water cycle in detail.",
           "Tell me about the history of the printing press.", "Explain how a bicycle works.",
           "Write a letter to a friend about a trip to the mountains.", "What makes a good cup of tea?",
           "Describe a busy market in the morning.", "Write a poem about autumn leaves."]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", type=Path, required=True, help="where to write the results (a PNG goes next to it)")
    p.add_argument("--model", default=None, help="a local HF Llama-family checkpoint (default SmolLM2-135M-Instruct)")
    p.add_argument("--cache-dir", default="./var/models")
    p.add_argument("--batch", type=int, default=16, help="requests at once")
    p.add_argument("--tokens", type=int, default=48, help="tokens each request samples at most")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--contenders", nargs="+", default=["free", "regex", "json", "choice", "tools"],
                   choices=["free", "regex", "json", "choice", "tools"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    a = p.parse_args(argv)
    for name in ("batch", "tokens", "rounds"):
        if getattr(a, name) < 1:
            p.error(f"--{name} must be >= 1")
    if "free" not in a.contenders:
        p.error("--contenders must include free (the baseline)")
    return a


def structured_of(name: str) -> StructuredOutput | None:
    if name == "tools":
        return TOOLS.structured()
    return {"free": None, "regex": StructuredOutput("regex", REGEX), "json": StructuredOutput("json", SCHEMA),
            "choice": StructuredOutput("choice", CHOICES)}[name]


def follows(name: str, text: str) -> bool:
    if name == "regex":
        return re.fullmatch(REGEX, text) is not None
    if name == "json":
        try:
            return set(json.loads(text)) == {"story"}
        except ValueError:
            return False
    if name == "choice":
        return text in CHOICES
    if name == "tools":
        return TAG not in text or TOOLS.parse(text) is not None
    return True


class GrammarTimer:
    """Adds up the seconds spent in Matcher.fill and Matcher.consume (the runner's grammar work)."""

    def __init__(self):
        self.seconds, self.calls = 0.0, 0
        self._fill, self._consume = structured_mod.Matcher.fill, structured_mod.Matcher.consume

    def __enter__(self):
        timer, fill, consume = self, self._fill, self._consume

        def timed_fill(m, out):
            t = time.perf_counter()
            fill(m, out)
            timer.seconds += time.perf_counter() - t
            timer.calls += 1

        def timed_consume(m, token):
            t = time.perf_counter()
            ok = consume(m, token)
            timer.seconds += time.perf_counter() - t
            return ok
        structured_mod.Matcher.fill, structured_mod.Matcher.consume = timed_fill, timed_consume
        return self

    def __exit__(self, *exc):
        structured_mod.Matcher.fill, structured_mod.Matcher.consume = self._fill, self._consume


def run_round(backbone, name: str, prompts: list[list[int]], a, seed: int) -> dict:
    steps: list[float] = []

    def on_step(batch, out):
        if batch.num_rows == a.batch and all(r.num_tokens == 1 for r in batch.rows):
            steps.append(out.compute_s)
    backbone.kv.clear_prefix_cache()
    no_eos = tuple((t, -100.0) for t in backbone.eos_token_ids)   # a grammar that accepts ends at an end of sequence
    engine = GenerationEngine(GenerationEngineConfig(), GenerationSchedulerConfig(max_running=a.batch),
                              GenerationRunner(backbone.model, backbone.kv), backbone.tokenizer,
                              backbone.eos_token_ids, on_step=on_step).start()
    try:
        with GrammarTimer() as timer:
            streams = []
            for i, ids in enumerate(prompts):
                sampling = SamplingParams(temperature=0.8, seed=seed * 1000 + i, max_new_tokens=a.tokens,
                                          structured=structured_of(name), logit_bias=no_eos)
                req = Request(tenant_id=1, adapter_id=None, deadline=time.monotonic() + 3600, prompt_ids=list(ids),
                              max_new_tokens=a.tokens)
                streams.append(engine.submit(req, sampling, ignore_eos=True))
            results = [s.final() for s in streams]
    finally:
        engine.stop(drain=False, timeout=10)
    return {"full_decode_steps_s": steps, "grammar_s": timer.seconds, "grammar_row_steps": timer.calls,
            "tokens": [len(r.token_ids) for r in results],
            "stopped": sum(r.finish_reason is FinishReason.STOP for r in results),
            "valid": all(follows(name, r.text) for r in results if r.finish_reason is FinishReason.STOP),
            "texts": [r.text for r in results[:2]]}


def main(argv=None) -> int:
    a = parse_args(argv)
    threads, device, backbone = load_default_decoder(a)
    prompts = [backbone.tokenize_prompt(PROMPTS[i % len(PROMPTS)], 200, False, False) for i in range(a.batch)]
    for name in a.contenders:                 # compile each grammar once (the server caches the tokenizer too)
        if structured_of(name) is not None:
            backbone.structured.check(structured_of(name))
    runs: dict[str, list[dict]] = {n: [] for n in a.contenders}
    started = time.perf_counter()
    with tqdm(total=a.rounds * len(a.contenders), desc="structured", unit="run") as bar:
        for r in range(a.rounds):
            order = a.contenders[r % len(a.contenders):] + a.contenders[:r % len(a.contenders)]
            for name in order:
                runs[name].append(run_round(backbone, name, prompts, a, seed=r))
                bar.update(1)
    free = [s for run in runs["free"] for s in run["full_decode_steps_s"]]
    rows = []
    for name in a.contenders:
        steps = [s for run in runs[name] for s in run["full_decode_steps_s"]]
        row_steps = sum(run["grammar_row_steps"] for run in runs[name])
        median = statistics.median(steps) if steps else None
        ratios = [s / statistics.median(free) for s in steps] if steps and free else []
        rows.append({
            "contender": name, "grammar": None if structured_of(name) is None else {
                "kind": structured_of(name).kind, "value": structured_of(name).value},
            "full_decode_steps": len(steps), "step_ms_median": None if median is None else median * 1e3,
            "over_free": None if median is None else median / statistics.median(free),
            "over_free_ci95": bootstrap_median(ratios, seed=1) if len(ratios) > 1 else None,
            "grammar_us_per_row_step": (sum(run["grammar_s"] for run in runs[name]) / row_steps * 1e6)
            if row_steps else 0.0,
            "mean_tokens_per_request": statistics.fmean(t for run in runs[name] for t in run["tokens"]),
            "answers": sum(len(run["tokens"]) for run in runs[name]),
            "completed": sum(run["stopped"] for run in runs[name]),
            "all_completed_valid": all(run["valid"] for run in runs[name]), "sample_texts": runs[name][0]["texts"]})
    result = {"benchmark": "structured", "model": backbone.name, "device": device.describe(),
              "torch_threads": threads, "machine": machine(), "date": utc_now(), "git": git_state(),
              "load_average_after": load_average(),
              "parameters": {k: str(v) if isinstance(v, Path) else v for k, v in vars(a).items()},
              "contenders": rows, "timed_s": time.perf_counter() - started}
    a.json.write_text(json.dumps(result, indent=2))
    plot(result, a.json.with_suffix(".png"))
    for r in rows:
        ms = "n/a" if r["step_ms_median"] is None else f"{r['step_ms_median']:.1f} ms"
        over = "" if r["over_free"] is None else f" ({r['over_free']:.3f}x free)"
        tqdm.write(f"{r['contender']:7s}: full decode step {ms}{over} over {r['full_decode_steps']} steps; grammar "
                   f"{r['grammar_us_per_row_step']:.0f} us per row-step; {r['mean_tokens_per_request']:.1f} "
                   f"tokens/request; {r['completed']} of {r['answers']} completed, all valid: "
                   f"{r['all_completed_valid']}")
    return 0


def plot(result: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["contenders"] if r["step_ms_median"] is not None]
    fig, ax = plt.subplots(figsize=(7, 4))
    names = [r["contender"] for r in rows]
    grammar_ms = [r["grammar_us_per_row_step"] * result["parameters"]["batch"] / 1e3 for r in rows]
    rest = [r["step_ms_median"] - g for r, g in zip(rows, grammar_ms)]
    ax.bar(names, rest, label="model and sampling")
    ax.bar(names, grammar_ms, bottom=rest, label="grammar masks and advances")
    for i, r in enumerate(rows):
        ax.text(i, r["step_ms_median"], f"{r['over_free']:.2f}x", ha="center", va="bottom")
    ax.set_ylabel(f"decode step of {result['parameters']['batch']} rows (ms, median)")
    ax.set_title(f"Structured output on {result['model']} ({result['device']})")
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
