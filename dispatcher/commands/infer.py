"""`vbert classify`, `tag` and `embed`: the tenant API."""
from __future__ import annotations

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


COMMANDS = [classify, tag, embed]
