"""Training-step time with and without stages.lib.runtime.keep_freed_memory, side by side in one run.

A LoRA step of a small GPT-2 (2 layers, 128 wide, GPT-2's 50,257-token vocabulary, batch 8 x 70 tokens, label
smoothing as in training) in fresh subprocesses, alternating the two settings; prints per-step wall, user and
system time, page faults, and the ratio of medians.

    python benchmarks/bench_allocator.py [--rounds 3] [--steps 15]
"""
import argparse
import json
import statistics
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time, torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.trainer_pt_utils import LabelSmoother
from stages.lib import lora, runtime
if sys.argv[1] == "on":
    runtime.keep_freed_memory()
torch.manual_seed(0)
m = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=128, n_head=4, vocab_size=50257, n_positions=128))
lora.add_lora(m, rank=4, alpha=32, dropout=0.1)
opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], 1e-3)
smooth, x = LabelSmoother(0.1), torch.randint(0, 50257, (8, 70))
def step():
    smooth(m(input_ids=x), x, shift_labels=True).backward(); opt.step(); opt.zero_grad()
step()
r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
n = int(sys.argv[2])
for _ in range(n):
    step()
r1 = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"wall": (time.perf_counter() - t0) / n, "user": (r1.ru_utime - r0.ru_utime) / n,
                  "sys": (r1.ru_stime - r0.ru_stime) / n, "faults": (r1.ru_minflt - r0.ru_minflt) / n}))
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=15)
    a = ap.parse_args()
    runs = {"off": [], "on": []}
    for _ in range(a.rounds):
        for setting in runs:
            out = subprocess.run([sys.executable, "-c", CHILD, setting, str(a.steps)], capture_output=True, text=True,
                                 check=True).stdout
            runs[setting].append(json.loads(out.strip().splitlines()[-1]))
    for setting, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        print(f"keep_freed_memory {setting:3}: wall {med['wall']:.3f} s/step  user {med['user']:.3f}  "
              f"sys {med['sys']:.3f}  page faults {med['faults']:,.0f}/step  (median of {len(rs)} processes)")
    off, on = (statistics.median(r["wall"] for r in runs[s]) for s in ("off", "on"))
    print(f"step time on / off: {on / off:.2f}")


if __name__ == "__main__":
    main()
