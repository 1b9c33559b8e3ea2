"""Decode attention A/B in one process: SDPA vs `common.fast_generation.decode_attention`, same replies.

    python benchmarks/decode_attention.py --adapter runs/demo/best --limit 64

Loads the adapter's base model and the adapter, greedy-generates the final reply of the first `--limit`
conversations of `--data-file` with evaluate.py's generator twice (SDPA for every step, then the batched
matmul decode attention), and prints useful new tokens/s of each and how many replies are identical.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from unittest import mock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import common.fast_generation as fast  # noqa: E402  (the repo root must be on sys.path first)
from common.jsonio import read_json, read_jsonl  # noqa: E402
from common.model import load_model_and_tokenizer  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    """Run both arms and print one line each; return {arm: tokens/s, "identical": count}."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="adapter folder of a train.py run (e.g. runs/demo/best)")
    parser.add_argument("--data-file", default=str(REPO / "data/test.jsonl"), help="conversations (JSONL)")
    parser.add_argument("--limit", type=int, default=64, help="conversations")
    parser.add_argument("--gen-batch-size", type=int, default=64, help="rows decoded together at most")
    parser.add_argument("--max-new-tokens", type=int, default=400, help="generation budget per reply")
    args = parser.parse_args(argv)
    from peft import PeftModel

    base = read_json(Path(args.adapter) / "adapter_config.json")["base_model_name_or_path"]
    model, tokenizer = load_model_and_tokenizer(base)
    model = PeftModel.from_pretrained(model, args.adapter)
    prompts = [row["messages"][:-1] for row in read_jsonl(args.data_file)[: args.limit]]
    replies, result = {}, {}
    for arm, switch in (
        ("sdpa", lambda model: contextlib.nullcontext()),
        ("matmul", fast.decode_with_matmul_attention),
    ):
        with mock.patch.object(fast, "decode_with_matmul_attention", switch):
            stats = fast.GenerationStats()
            replies[arm] = fast.generate_replies(
                model, tokenizer, prompts, args.gen_batch_size, args.max_new_tokens, stats=stats
            )
        result[arm] = stats.tokens_per_s
        print(f"{arm}: {stats.new_tokens} new tokens in {stats.seconds:.1f} s = {stats.tokens_per_s:.1f} tokens/s")
    result["identical"] = sum(a == b for a, b in zip(replies["sdpa"], replies["matmul"], strict=True))
    print(
        f"matmul / sdpa = {result['matmul'] / result['sdpa']:.2f}x; identical replies {result['identical']} of {len(prompts)}"
    )
    return result


if __name__ == "__main__":
    main()
