"""Decode attention A/B in one process: SDPA, `decode_attention` on cache views and on whole cache buffers.

    python benchmarks/decode_attention.py --adapter runs/demo/best --limit 64

Loads the adapter's base model (in `--dtype`, as evaluate.py: auto picks the fastest here) and the
adapter, greedy-generates the final reply of the first `--limit` conversations of `--data-file` with
evaluate.py's generator three times (SDPA for every step; `common.fast_generation.decode_attention` on a
view of each layer's first cached positions, as up to commit cf81d0d, which a bf16 bmm copies; the same
on the whole contiguous buffer with its spare room masked, as now), and prints useful new tokens/s of
each and how many replies equal SDPA's. (The Q @ K^T arm of earlier versions: docs/results.md.)
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from unittest import mock

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import common.fast_generation as fast  # noqa: E402  (the repo root must be on sys.path first)
from common.artifacts import precision_autocast  # noqa: E402
from common.jsonio import read_json, read_jsonl  # noqa: E402
from common.model import load_config, load_model_and_tokenizer  # noqa: E402
from common.precision import resolve_precision  # noqa: E402

MATMUL_ATTENTION = fast.decode_with_matmul_attention  # the arms below patch the module's name


@contextlib.contextmanager
def on_views(model):
    """`decode_with_matmul_attention`, with each decode step given views of the cached positions."""
    with MATMUL_ATTENTION(model):
        fast._WHOLE_BUFFER["on"] = False
        yield


def main(argv: list[str] | None = None) -> dict:
    """Run both arms and print one line each; return {arm: tokens/s, "identical": count}."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--adapter", required=True, help="adapter folder of a train.py run (e.g. runs/demo/best)")
    parser.add_argument("--data-file", default=str(REPO / "data/test.jsonl"), help="conversations (JSONL)")
    parser.add_argument("--limit", type=int, default=64, help="conversations")
    parser.add_argument("--gen-batch-size", type=int, default=64, help="rows decoded together at most")
    parser.add_argument("--max-new-tokens", type=int, default=400, help="generation budget per reply")
    parser.add_argument("--dtype", default="auto", help="auto, bf16, fp16 or fp32 (as evaluate.py --dtype)")
    args = parser.parse_args(argv)
    from peft import PeftModel

    base = read_json(Path(args.adapter) / "adapter_config.json")["base_model_name_or_path"]
    precision = resolve_precision(args.dtype, torch.device("cpu"), load_config(base), measure_peak=False)
    print(precision.describe())
    model, tokenizer = load_model_and_tokenizer(base, dtype=precision.dtype)
    model = PeftModel.from_pretrained(model, args.adapter)
    prompts = [row["messages"][:-1] for row in read_jsonl(args.data_file)[: args.limit]]
    replies, result = {}, {}
    for arm, switch in (
        ("sdpa", lambda model: contextlib.nullcontext()),
        ("matmul on views", on_views),
        ("matmul on whole buffers", MATMUL_ATTENTION),
    ):
        with mock.patch.object(fast, "decode_with_matmul_attention", switch), precision_autocast(precision):
            stats = fast.GenerationStats()
            replies[arm] = fast.generate_replies(
                model, tokenizer, prompts, args.gen_batch_size, args.max_new_tokens, stats=stats
            )
        result[arm] = stats.tokens_per_s
        print(f"{arm}: {stats.new_tokens} new tokens in {stats.seconds:.1f} s = {stats.tokens_per_s:.1f} tokens/s")
    for arm in ("matmul on views", "matmul on whole buffers"):
        result[f"identical {arm}"] = sum(a == b for a, b in zip(replies["sdpa"], replies[arm], strict=True))
        print(
            f"{arm} / sdpa = {result[arm] / result['sdpa']:.2f}x; "
            f"replies identical to sdpa's {result[f'identical {arm}']} of {len(prompts)}"
        )
    return result


if __name__ == "__main__":
    main()
