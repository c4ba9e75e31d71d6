"""generate: beam-search one output per distinct test MR, in order of first appearance (the E2E scorers' format).

Decoding follows the paper (Table 11, GPT-2 M on E2E): beam 10, length penalty 0.9, no repeated 4-grams, at
most 64 new tokens. The authors' README runs gpt2_beam.py with length penalty 0.8; both are one parameter away.
Like gpt2_beam.py, a finished hypothesis scores sum(log p) / length**penalty and the n-gram ban looks at the
generated text only (transformers' own `no_repeat_ngram_size` would also ban 4-grams of the MR). Remaining
differences: gpt2_beam.py drops finished beams from the search (its beam shrinks; transformers refills to 10)
and collects finished hypotheses for all 64 steps, which `generate.early_stopping: never` approaches at about
twice the decoding time (`true`, the default, stops once 10 hypotheses are finished).

`--method base` decodes with the pretrained model itself (no fine-tuning): the floor both methods must beat.
LoRA is merged into the base weights before decoding (section 4.1: no added inference latency).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch
from transformers import GPT2LMHeadModel, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

from stages import lora
from stages import params as P
from stages import runtime
from stages.e2e import DataError
from stages.outputs import atomic_file, write_json
from stages.preprocess import load_tokenizer
from stages.train import EOS, base_identity, read_jsonl


def read_config(params: dict) -> dict:
    return {
        "num_beams": P.number(params, "generate.num_beams", kind=int, min=1),
        "length_penalty": P.number(params, "generate.length_penalty"),
        "no_repeat_ngram_size": P.number(params, "generate.no_repeat_ngram_size", kind=int, min=0),
        "max_new_tokens": P.number(params, "generate.max_new_tokens", kind=int, min=1),
        "batch_size": P.number(params, "generate.batch_size", kind=int, min=1),
        "early_stopping": P.choice(params, "generate.early_stopping", (True, False, "never")),
    }


def load_model(method: str, base: Path, model_dir: Path) -> GPT2LMHeadModel:
    if method == "full":
        return GPT2LMHeadModel.from_pretrained(model_dir, use_safetensors=True)
    model = GPT2LMHeadModel.from_pretrained(base, use_safetensors=True)
    if method == "lora":
        lora.load_adapter(model, model_dir / "adapter.safetensors", base=base_identity(base))
        model = lora.merge_lora(model)
    return model


def run_info(method: str, model_dir: Path, seconds: float, n: int) -> dict:
    """What the score stage adds to the metrics: the training run's cost, and decoding time."""
    info = {"trainable_params": 0, "generate_time_s": round(seconds, 1), "test_mrs": n}  # base: nothing trained
    if method != "base":
        info.update(json.loads((model_dir / "train_info.json").read_text()))
        info.pop("method", None)
    return info


class NoRepeatNGramInOutput(LogitsProcessor):
    """Ban a token that would repeat an n-gram of the *generated* text (columns from `prompt_len` on)."""

    def __init__(self, n: int, prompt_len: int):
        self.ban, self.prompt_len = NoRepeatNGramLogitsProcessor(n), prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        return self.ban(input_ids[:, self.prompt_len:], scores)


def one_line(text: str) -> str:
    """The scorers read one output per line: a generated newline would shift every later output."""
    return re.sub(r"\s+", " ", text).strip()


@torch.no_grad()
def generate(model, contexts: list[list[int]], cfg: dict, decode) -> list[str]:
    """Left-padded batches (GPT-2 continues from the right end); position ids follow the attention mask, so a
    padded context decodes like an unpadded one. Batches keep input order."""
    model.eval()
    outputs = []
    for start in range(0, len(contexts), cfg["batch_size"]):
        batch = contexts[start:start + cfg["batch_size"]]
        width = max(len(c) for c in batch)
        ids = torch.full((len(batch), width), EOS, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, c in enumerate(batch):
            ids[i, width - len(c):] = torch.tensor(c)
            mask[i, width - len(c):] = 1
        ids, mask = ids.to(model.device), mask.to(model.device)
        ban = [NoRepeatNGramInOutput(cfg["no_repeat_ngram_size"], width)] if cfg["no_repeat_ngram_size"] else []
        out = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=False, num_beams=cfg["num_beams"],
            length_penalty=cfg["length_penalty"], logits_processor=LogitsProcessorList(ban),
            max_new_tokens=cfg["max_new_tokens"], eos_token_id=EOS, pad_token_id=EOS,
            early_stopping=cfg["early_stopping"],
        )
        outputs += [one_line(decode(row[width:].tolist())) for row in out]
    return outputs


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=("base", "lora", "full"), required=True)
    ap.add_argument("--data", required=True, help="preprocess output (test.jsonl)")
    ap.add_argument("--base", required=True, help="pretrained model directory (download output)")
    ap.add_argument("--model", required=True, help="models/<method>: training output (the base itself for base)")
    ap.add_argument("--out", required=True, help="predictions file, one line per test MR; info goes beside it")
    args = ap.parse_args(argv)
    runtime.keep_freed_memory()

    cfg = read_config(P.load())
    test = read_jsonl(Path(args.data) / "test.jsonl")
    base, model_dir, out = Path(args.base), Path(args.model), Path(args.out)
    tok = load_tokenizer(base / "tokenizer.json")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(args.method, base, model_dir).to(device)
    start = time.perf_counter()
    contexts = [t["context_ids"] for t in test]
    preds = generate(model, contexts, cfg, lambda ids: tok.decode(ids, skip_special_tokens=True))
    info = run_info(args.method, model_dir, time.perf_counter() - start, len(preds))
    with atomic_file(out) as f:
        f.writelines(p + "\n" for p in preds)
    write_json(out.with_suffix(".json"), info)
    empty = sum(not p for p in preds)
    print(f"generate-{args.method}: {len(preds)} outputs ({empty} empty) -> {out}", file=sys.stderr)


if __name__ == "__main__":
    try:
        main()
    except (DataError, P.ParamError, ValueError) as e:
        sys.exit(f"generate: error: {e}")
