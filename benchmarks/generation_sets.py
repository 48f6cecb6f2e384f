"""Build the generation sets of the real-task table (docs/training.md, "Generative adapters") from
../shared/data, read in place: NCBI-disease as generative NER (the sentence in, its disease mentions out,
" ; "-joined, "none" when there is none) and sci-cite with the label as text.

    .venv/bin/python benchmarks/generation_sets.py --out var/generation-data
    # -> var/generation-data/{ncbi-disease,sci-cite}/{train,dev,test}.jsonl

Chats ({"messages": [user, assistant]}) by default, for the instruct decoder's chat template;
--prompt-format writes {"prompt", "completion"} pairs instead. Never write into the repository's tracked
folders: the data keeps its authors' terms (../shared/data/README.md).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from training.generation_data import SHARED_SETS, build_shared_sets  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(REPO.parent / "shared" / "data"), help="the shared data folder")
    parser.add_argument("--out", required=True, help="output folder (one sub-folder per set)")
    parser.add_argument("--sets", default=",".join(SHARED_SETS), help=f"comma-separated, of {','.join(SHARED_SETS)}")
    parser.add_argument("--prompt-format", action="store_true", help="{prompt, completion} instead of chats")
    parser.add_argument("--max-examples", type=int, default=None, help="keep the first N of each split")
    args = parser.parse_args(argv)
    paths = build_shared_sets(args.data, args.out, [s for s in args.sets.split(",") if s],
                              chat=not args.prompt_format, max_examples=args.max_examples)
    for name, splits in paths.items():
        for split, path in splits.items():
            print(f"{name} {split}: {sum(1 for _ in path.open())} examples -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
