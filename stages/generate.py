"""generate: beam-search one output per distinct test MR, in order of first appearance (the E2E scorers' format).

A method's recipe (`<recipe>.generate.search`) picks one of three searches, each as its source code runs it:
`authors` is gpt2_beam.py's (stages/lib/beam.py), then gpt2_decode.py's cut; `li-liang` is Li & Liang's fork's
generate() (stages/lib/li_liang_beam.py), then run_generation.py's text; `transformers` is transformers' own.
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

import datasets
import torch
from transformers import GPT2LMHeadModel, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import SuppressTokensLogitsProcessor

from stages.lib import authors_data, beam, cli, decoding, fidelity, gpt2, li_liang, li_liang_beam, lora, speed
from stages.lib import params as P
from stages.lib import runtime
from stages.lib.cli import InputError
from stages.lib.gpt2 import EOS
from stages.lib.outputs import atomic_file, check_writable, exclusive, write_json

def config(p: P.Params, method: str) -> dict:
    """What the outputs depend on: exactly the keys dvc.yaml declares for generate-base / generate-<method>@<seed>
    (the model itself comes in as a file)."""
    recipe = P.recipe(p, method)
    return {"decode": P.decode(p, method).model_dump(), "layout": recipe.layout, "pad_token": recipe.pad_token,
            "speed": {"precision": p.speed.precision, "compile": p.speed.compile}}


def read_config(params: dict | P.Params, method: str = "base") -> dict:
    """The decoding settings, flat: `config`'s, with `generate.<method>` laid over the shared ones, and the
    runtime's batch size (which changes no output: tests/test_train_generate.py)."""
    p = params if isinstance(params, P.Params) else P.validate(params)
    cfg = config(p, method)
    run = speed.resolve(p.speed, p.runtime, speed.device_type())
    return {**cfg["decode"], "layout": cfg["layout"], "pad_token": cfg["pad_token"], "speed": run,
            "batch_size": p.runtime.generate_batch_size}


def load_model(method: str, base: Path, model_dir: Path, pad_token: bool) -> GPT2LMHeadModel:
    """The model to decode with, every weight checked finite (a NaN model would write garbage and exit 0)."""
    if method == "full":
        return gpt2.load_model(model_dir)  # its [PAD] row, if its recipe has one, was trained and saved with it
    model = gpt2.load_model(base)
    if pad_token:  # the frozen [PAD] row LoRA trained beside, rebuilt as it was (stages/lib/li_liang.py)
        li_liang.add_pad_row(model)
    if method == "lora":
        path = model_dir / "adapter.safetensors"
        try:
            lora.load_adapter(model, path, base=gpt2.base_identity(base))
        except (FileNotFoundError, ValueError, TypeError) as e:  # lora.py's messages name the file already
            raise InputError(str(e) if str(path) in str(e) else f"{path}: {e}") from None
        gpt2.check_finite(model, str(path))
        model = lora.merge_lora(model)
    return model


def run_info(method: str, model_dir: Path, mrs: list[str], preds: list[str]) -> dict:
    """What the score stage adds to the metrics: what was trained, and how far the outputs follow their MRs
    (stages/lib/fidelity.py). Deterministic: timings go to --costs."""
    info = {"trainable_params": 0, "test_mrs": len(preds), **fidelity.fidelity(mrs, preds)}  # base: none trained
    if method != "base":
        path = model_dir / "train_info.json"
        try:
            info["trainable_params"] = int(json.loads(path.read_text())["trainable_params"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(f"{path}: cannot read trainable_params ({e})") from None
    return info


class NoRepeatNGramInOutput(LogitsProcessor):
    """Ban a token that would repeat an n-gram of the *generated* text (columns from `prompt_len` on)."""

    def __init__(self, n: int, prompt_len: int):
        self.n, self.prompt_len = n, prompt_len

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        # The same bans as transformers' NoRepeatNGramLogitsProcessor, without its per-hypothesis device-to-host
        # copy every step (tests/test_speed.py compares them).
        return decoding.ban_repeated_ngrams(input_ids[:, self.prompt_len:], scores, self.n)


def one_line(text: str) -> str:
    """The scorers read one output per line: a generated newline would shift every later output."""
    return re.sub(r"\s+", " ", text).strip()


@torch.no_grad()
def generate(model, contexts: list[list[int]], cfg: dict, decode) -> list[str]:
    """One output line per context, in input order, with the search `cfg["search"]` names. `decode`: token ids ->
    text with special tokens kept and no clean-up, as both authors' scripts decode."""
    model.eval()
    start = time.perf_counter()
    if cfg["search"] == "transformers":
        return transformers_search(model, contexts, cfg, decode, start)
    outputs = []
    for first in range(0, len(contexts), cfg["batch_size"]):  # batches of the search's own size: progress
        batch = contexts[first:first + cfg["batch_size"]]
        if cfg["search"] == "authors":
            # gpt2_beam.py's search (stages/lib/beam.py), then gpt2_decode.py's cut at <|endoftext|> and a blank line.
            ids = beam.authors_beam_search(
                model, batch, num_beams=cfg["num_beams"], length_penalty=cfg["length_penalty"],
                no_repeat_ngram_size=cfg["no_repeat_ngram_size"], max_new_tokens=cfg["max_new_tokens"],
                eos_ids=cfg["eos_ids"], batch_size=cfg["batch_size"])
            outputs += [authors_data.cut_like_gpt2_decode(decode(row)) for row in ids]
        else:
            # Li & Liang's fork's generate() (stages/lib/li_liang_beam.py), then run_generation.py's text.
            ids = li_liang_beam.li_liang_beam_search(
                model, batch, num_beams=cfg["num_beams"], max_new_tokens=cfg["max_new_tokens"],
                length_penalty=cfg["length_penalty"], banned_ids=cfg["banned_ids"], eos_id=cfg["eos_ids"][0],
                early_stopping=cfg["early_stopping"], batch_size=cfg["batch_size"])
            outputs += [li_liang_beam.run_generation_text(decode, c, row, cfg["max_new_tokens"], cfg["eos_ids"][0])
                        for c, row in zip(batch, ids)]
        progress(len(outputs), len(contexts), start)
    return [one_line(o) for o in outputs]


def progress(done: int, total: int, start: float) -> None:
    """`generate: 160/630 outputs, 41 s, ETA 1.8 min` on stderr after each batch (a log line, not a bar)."""
    elapsed = time.perf_counter() - start
    eta = elapsed / done * (total - done)
    print(f"generate: {done}/{total} outputs, {elapsed:.0f} s, ETA {eta / 60:.1f} min", file=sys.stderr, flush=True)


def transformers_search(model, contexts: list[list[int]], cfg: dict, decode, start: float) -> list[str]:
    """transformers' beam search, stopping per `early_stopping`. Left-padded batches (GPT-2 continues from the
    right end); position ids follow the attention mask, so a padded context decodes like an unpadded one."""
    outputs = []
    for first in range(0, len(contexts), cfg["batch_size"]):
        batch = contexts[first:first + cfg["batch_size"]]
        ids, mask = (t.to(model.device) for t in decoding.left_pad(batch, pad=EOS))
        width = ids.shape[1]
        ban = [NoRepeatNGramInOutput(cfg["no_repeat_ngram_size"], width)] if cfg["no_repeat_ngram_size"] else []
        if cfg["banned_ids"]:
            ban.append(SuppressTokensLogitsProcessor(cfg["banned_ids"], device=model.device))
        out = model.generate(
            input_ids=ids, attention_mask=mask, do_sample=False, num_beams=cfg["num_beams"],
            length_penalty=cfg["length_penalty"], logits_processor=LogitsProcessorList(ban),
            max_new_tokens=cfg["max_new_tokens"], eos_token_id=cfg["eos_ids"], pad_token_id=EOS,
            early_stopping=cfg["early_stopping"],
        )
        rows = out[:, width:].cpu().tolist()  # one copy per batch; a row ends at an EOS, then pads (EOS too)
        outputs += [one_line(decode(row[:next((i for i, t in enumerate(row) if t in cfg["eos_ids"]), len(row))]))
                    for row in rows]
        progress(len(outputs), len(contexts), start)
    return outputs


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--method", choices=("base", "lora", "full"), required=True)
    ap.add_argument("--data", required=True, help="preprocess output (Arrow dataset test/)")
    ap.add_argument("--base", required=True, help="pretrained model directory (download output)")
    ap.add_argument("--model", required=True, help="models/<method>: training output (the base itself for base)")
    ap.add_argument("--out", required=True, help="predictions file, one line per test MR; info goes beside it")
    ap.add_argument("--costs", required=True, help="metrics file for decoding time and throughput")
    args = ap.parse_args(argv)
    runtime.keep_freed_memory()
    datasets.disable_progress_bars()

    p = P.read()
    cfg = read_config(p, args.method)
    max_new = ("authors.generate.max_new_tokens" if args.method == "base"
               else P.key_of(p, args.method, "generate", "max_new_tokens"))
    out = Path(args.out)
    for path in (out, out.with_suffix(".json"), args.costs):
        check_writable(path)
    with exclusive(out):  # one run per output: a second one stops here, named
        return decode_all(args, p, cfg, max_new)


def decode_all(args, p: P.Params, cfg: dict, max_new: str) -> int:
    base, model_dir, out = Path(args.base), Path(args.model), Path(args.out)
    data = Path(args.data) / cfg["layout"]  # the layout the method trained on
    test = gpt2.load_prepared(data, "test")
    fidelity.check_mrs(test["mr"], source=f"{data}/test")  # every MR parses before any decoding
    contexts = test["context_ids"]
    tok = gpt2.load_tokenizer(base / "tokenizer.json")
    if cfg["pad_token"]:
        li_liang.add_pad_token(tok)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = load_model(args.method, base, model_dir, cfg["pad_token"]).to(device)
    longest = max(len(c) for c in contexts)
    gpt2.check_fits(model, longest + cfg["max_new_tokens"],
                    f"longest test context ({longest}) + {max_new} ({cfg['max_new_tokens']})")
    model = speed.compile_for_generation(model, cfg["speed"]["compile"])
    start = time.perf_counter()
    with speed.precision_context(cfg["speed"]["precision"], device):
        preds = generate(model, contexts, cfg, lambda ids: tok.decode(ids, clean_up_tokenization_spaces=False))
    seconds = time.perf_counter() - start
    info = run_info(args.method, model_dir, test["mr"], preds)
    # Both files or neither: a full disk while writing the second one removes the first too.
    try:
        with atomic_file(out) as lines, atomic_file(out.with_suffix(".json")) as meta:
            lines.writelines(pred + "\n" for pred in preds)
            json.dump(info, meta, indent=2, sort_keys=True)
            meta.write("\n")
    except OSError as e:
        raise InputError(f"{out.parent}: cannot write {out.name} and {out.with_suffix('.json').name} "
                         f"({e.strerror or e})") from None
    write_json(args.costs, {"generate_time_s": round(seconds, 1), "outputs_per_s": round(len(preds) / seconds, 3)})
    empty = sum(not p for p in preds)
    print(f"generate-{args.method}: {len(preds)} outputs ({empty} empty) -> {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(cli.run("generate", main))
