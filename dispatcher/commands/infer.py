"""`vbert classify`, `tag`, `embed` and `generate`: the tenant API."""
from __future__ import annotations

import json
from pathlib import Path

import click

from dispatcher.commands.remote import remote, texts_of


@click.command()
@click.option("--adapter", "adapter_name", required=True, help="One of the tenant's adapters (classify head).")
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0), help="Scores per text; 0 = all.")
@click.option("--truncate/--no-truncate", default=True, show_default=True)
@click.argument("texts", nargs=-1)
@remote(is_admin=False)
def classify(r, adapter_name, top_k, truncate, texts) -> None:
    """Classify each TEXT (or each line of stdin) with the tenant's adapter."""
    texts = texts_of(texts)
    results = r.call(lambda c: c.classify(adapter_name, texts, top_k=top_k, truncate=truncate))
    rows = [{"text": t, **res} for t, res in zip(texts, results)]
    if r.output == "table":
        rows = [{"text": x["text"], "label": x["label"], "score": x["scores"][x["label"]]} for x in rows]
    r.show(rows, ["label", "score", "text"])


@click.command()
@click.option("--adapter", "adapter_name", required=True, help="One of the tenant's adapters (tag head).")
@click.option("--truncate/--no-truncate", default=True, show_default=True)
@click.argument("texts", nargs=-1)
@remote(is_admin=False)
def tag(r, adapter_name, truncate, texts) -> None:
    """Tag the tokens of each TEXT (or each line of stdin): per-token labels, then the entities."""
    texts = texts_of(texts)
    results = r.call(lambda c: c.tag(adapter_name, texts, truncate=truncate))
    if r.output == "json":
        return r.show([{"text": t, **res} for t, res in zip(texts, results)])
    r.show([{"input": i, **tok} for i, x in enumerate(results) for tok in x["tokens"]],
           ["input", "token", "start_char", "end_char", "label", "score"])     # chars: -1 for [CLS], [SEP]
    entities = [{"input": i, **e} for i, x in enumerate(results) for e in x["entities"]]
    if entities:
        click.echo()
        r.show(entities, ["input", "label", "text", "start_char", "end_char", "start_token", "end_token", "score"])


@click.command()
@click.option("--adapter", "adapter_name", default="default", show_default=True,
              help="An adapter with an embed head; 'default' = the bare backbone.")
@click.option("--normalize/--no-normalize", default=None, help="Default: the head's own setting.")
@click.option("--truncate/--no-truncate", default=True, show_default=True)
@click.argument("texts", nargs=-1)
@remote(is_admin=False)
def embed(r, adapter_name, normalize, truncate, texts) -> None:
    """Embed each TEXT (or each line of stdin)."""
    texts = texts_of(texts)
    vectors = r.call(lambda c: c.embed(texts, adapter=adapter_name, normalize=normalize, truncate=truncate))
    rows = [{"text": t, "embedding": v} for t, v in zip(texts, vectors)]
    if r.output == "table":
        rows = [{"dim": len(x["embedding"]), "head": x["embedding"][:4], "text": x["text"]} for x in rows]
    r.show(rows, ["dim", "head", "text"])


@click.command()
@click.option("--adapter", "adapter_name", default="default", show_default=True,
              help="A decoder adapter of the tenant; 'default' = the bare decoder.")
@click.option("--chat", is_flag=True, help="Send PROMPT as a user message through the chat template.")
@click.option("--system", default=None, help="With --chat: a system message first.")
@click.option("--max-new-tokens", default=0, show_default=True, type=click.IntRange(min=0),
              help="0 = up to the context and the tenant's token quota.")
@click.option("--temperature", default=None, type=click.FloatRange(min=0), help="Default 1.0; 0 = greedy.")
@click.option("--top-p", default=None, type=click.FloatRange(0, 1, min_open=True))
@click.option("--top-k", default=0, show_default=True, type=click.IntRange(min=0), help="0 = off.")
@click.option("--min-p", default=None, type=click.FloatRange(0, 1),
              help="Keep the tokens at least this times as likely as the most likely one (default 0: off).")
@click.option("--seed", default=None, type=click.IntRange(min=0), help="Reproducible sampling.")
@click.option("--stop", multiple=True, help="A stop string (repeatable); not included in the text.")
@click.option("--include-stop", is_flag=True, help="Keep the stop string that ended the text at its end.")
@click.option("--presence-penalty", default=None, type=click.FloatRange(-2, 2),
              help="Lower a generated token's logit by this once (OpenAI's; default 0).")
@click.option("--frequency-penalty", default=None, type=click.FloatRange(-2, 2),
              help="Lower a generated token's logit by this per time generated (OpenAI's; default 0).")
@click.option("--repetition-penalty", default=None, type=click.FloatRange(min=0, min_open=True),
              help="Divide positive / multiply negative logits of prompt and generated tokens (default 1: off).")
@click.option("--logit-bias", multiple=True, metavar="TOKEN_ID=BIAS",
              help="Add BIAS (-100..100) to a token's logit (repeatable; -100 bans it).")
@click.option("--truncate-prompt", is_flag=True, help="Keep a too-long prompt's last tokens instead of failing.")
@click.option("--ignore-eos", is_flag=True, help="Do not stop at the end-of-sequence token.")
@click.option("--min-tokens", default=None, type=click.IntRange(min=0),
              help="No stop token or stop string ends the first this many tokens (default 0: off).")
@click.option("--json-schema", default=None, metavar="SCHEMA",
              help="The answer is JSON following this JSON Schema (JSON text, or @FILE).")
@click.option("--json-object", is_flag=True, help="The answer is a JSON object.")
@click.option("--regex", default=None, help="The whole answer matches this regular expression.")
@click.option("--choice", multiple=True, help="The answer is exactly one of these strings (repeatable).")
@click.option("--grammar", default=None, metavar="LARK", help="The answer follows this Lark grammar (text, or @FILE).")
@click.option("--tool", "tools", multiple=True, metavar="TOOL",
              help='With --chat: a function the model may call, {"name", "description", "parameters": a JSON Schema} '
                   "as JSON (or @FILE); repeatable.")
@click.option("--tool-choice", default=None, metavar="auto|required|none|NAME",
              help="With --tool: text or calls (auto, the default), calls (required), text (none) or one call of NAME.")
@click.argument("prompt", required=False)
@remote(is_admin=False)
def generate(r, adapter_name, chat, system, max_new_tokens, temperature, top_p, top_k, min_p, seed, stop, include_stop,
             presence_penalty, frequency_penalty, repetition_penalty, logit_bias, truncate_prompt, ignore_eos,
             min_tokens, json_schema, json_object, regex, choice, grammar, tools, tool_choice, prompt) -> None:
    """Generate a continuation of PROMPT (or of stdin), streamed to stdout as it is produced: only the
    generated text goes to stdout, so it can be piped. With -o json: one JSON object per message. With --tool,
    the answer's calls follow the text as one JSON line each on stderr ({"id", "name", "arguments"})."""
    bias = {}
    for item in logit_bias:
        token, _, value = item.partition("=")
        try:
            bias[int(token)] = float(value)
        except ValueError:
            raise click.BadParameter(f"{item!r} is not TOKEN_ID=BIAS", param_hint="--logit-bias") from None
    given = {k: v for k, v in (("json", json_schema), ("json_object", json_object or None), ("regex", regex),
                                ("choice", list(choice) or None), ("grammar", grammar)) if v is not None}
    if len(given) > 1:
        raise click.UsageError("give at most one of --json-schema, --json-object, --regex, --choice, --grammar")
    for kind, flag in (("json", "--json-schema"), ("grammar", "--grammar")):
        if isinstance(given.get(kind), str) and given[kind].startswith("@"):
            try:
                given[kind] = Path(given[kind][1:]).read_text()
            except OSError as e:
                raise click.BadParameter(str(e), param_hint=flag) from None
    tool_list = [_tool_arg(t) for t in tools]
    if (tool_list or tool_choice) and not chat:
        raise click.UsageError("--tool and --tool-choice need --chat")
    if prompt is None or prompt == "-":
        prompt = click.get_text_stream("stdin").read()
    if not prompt.strip():
        raise click.UsageError("give a PROMPT (or text on stdin)")
    messages = None
    if chat:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        prompt = None

    def run(client):
        last = None
        for event in client.generate(prompt, messages=messages, adapter=adapter_name, max_new_tokens=max_new_tokens,
                                     temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, stop=stop,
                                     truncate_prompt=truncate_prompt, ignore_eos=ignore_eos, timeout=r.timeout,
                                     presence_penalty=presence_penalty, frequency_penalty=frequency_penalty,
                                     repetition_penalty=repetition_penalty, logit_bias=bias, min_p=min_p,
                                     min_tokens=min_tokens, structured_output=given or None,
                                     include_stop_str_in_output=include_stop or None, tools=tool_list or None,
                                     tool_choice=tool_choice):
            if r.output == "json":
                click.echo(json.dumps(event))
            else:
                click.echo(event["text"], nl=False)
            last = event
        if r.output == "table":
            click.echo()
            for call in (last or {}).get("tool_calls", ()):
                click.echo(json.dumps(call), err=True)
            if last is not None and "usage" in last:
                u = last["usage"]
                cached = f" ({u['cached_prompt_tokens']} cached)" if u.get("cached_prompt_tokens") else ""
                click.echo(f"[{last['finish_reason']}: {u['prompt_tokens']} prompt{cached} + {u['completion_tokens']} "
                           f"generated tokens, first token after "
                           f"{last['metadata'].get('time_to_first_token_ms', 0):.0f} ms]", err=True)

    r.call(run)


def _tool_arg(value: str) -> dict:
    """One --tool: JSON text or @FILE, an object with a name."""
    try:
        text = Path(value[1:]).read_text() if value.startswith("@") else value
        tool = json.loads(text)
    except (OSError, ValueError) as e:
        raise click.BadParameter(str(e), param_hint="--tool") from None
    fn = tool.get("function", tool) if isinstance(tool, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise click.BadParameter('expected {"name": ..., "description": ..., "parameters": {...}}', param_hint="--tool")
    return tool


COMMANDS = [classify, tag, embed, generate]
