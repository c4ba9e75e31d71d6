"""The LoRA authors' AdamW and the order in which their training loader visits E2E examples.

Source: microsoft/LoRA, commit c4593f060e6a368d7bb5af5273b8e42810cdef90, examples/NLG/src/: optimizer.py (`AdamW`,
lines 42-130; `create_grouped_parameters`, lines 266-283), data_utils.py (`FT_Dataset`, lines 198-223) and gpt2_ft.py
(the train loader, lines 287-291; the epoch loop, lines 187, 343-347).

Their AdamW differs from torch.optim.AdamW in two places, both kept here:
- epsilon is added to sqrt(v) outside the bias correction: p -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)
  (lines 109-117), i.e. torch's eps scaled by 1 / sqrt(1 - b2^t), large in the first steps;
- decoupled weight decay comes AFTER the Adam update, on the updated weight: p -= lr * wd * p (lines 127-128).
`correct_bias` switches the bias correction (line 112); the class default is True, their command-line default
False (`--correct_bias` is store_true, line 22), and their E2E README command passes `--correct_bias`.

Their loader's order (AuthorsEpochOrder, AuthorsSampler for the Trainer) is the `authors` recipe's `sampler`.
"""
from __future__ import annotations

import math
import random

import torch


class AuthorsAdamW(torch.optim.Optimizer):
    """optimizer.py's AdamW (lines 42-130): defaults lr 1e-3, betas (0.9, 0.98), eps 1e-6, no weight decay, bias
    correction on. A parameter without a gradient is skipped, weight decay included (line 84).

    With the transformers Trainer: build it on `authors_param_groups(model)` and pass `optimizers=(opt, None)`; the
    Trainer then makes its scheduler (`lr_scheduler_type`, `warmup_steps`) on this optimizer and steps it. Do not use
    `optimizer_cls_and_kwargs`: the Trainer would group the parameters itself (no decay on biases and LayerNorm),
    unlike the authors' single group.
    """

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.98), eps: float = 1e-6,
                 weight_decay: float = 0.0, correct_bias: bool = True):
        if lr < 0.0:
            raise ValueError(f"invalid learning rate {lr}: must be >= 0")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"invalid betas {betas}: each must be in [0, 1)")
        if eps < 0.0:
            raise ValueError(f"invalid epsilon {eps}: must be >= 0")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      correct_bias=correct_bias))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if grad.is_sparse:
                    raise RuntimeError("AuthorsAdamW does not support sparse gradients")
                state = self.state[p]
                if len(state) == 0:                                  # lines 93-98
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                state["step"] += 1
                exp_avg.mul_(beta1).add_(grad, alpha=1.0 - beta1)                  # line 107
                exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1.0 - beta2)     # line 108
                denom = exp_avg_sq.sqrt().add_(group["eps"])                       # line 109: eps outside
                step_size = group["lr"]
                if group["correct_bias"]:                                          # lines 112-115
                    step_size = step_size * math.sqrt(1.0 - beta2 ** state["step"]) / (1.0 - beta1 ** state["step"])
                p.addcdiv_(exp_avg, denom, value=-step_size)                       # line 117
                if group["weight_decay"] > 0.0:                                    # lines 127-128: after the update
                    p.add_(p, alpha=-group["lr"] * group["weight_decay"])
        return loss


def authors_param_groups(model: torch.nn.Module, no_decay_bias: bool = False) -> list[dict]:
    """create_grouped_parameters (optimizer.py lines 266-283), as gpt2_ft.py uses it (line 330).

    Default (their E2E run, no `--no_decay_bias`): one group holding every named parameter, frozen ones too (they have
    no gradient, so AdamW skips them), so weight decay hits biases and LayerNorm weights as well. With no_decay_bias:
    names containing "bias" or "layer_norm.weight" go to a second group with weight_decay 0.0; neither their GPT-2 nor
    transformers' names a LayerNorm "layer_norm" (ln_1, ln_2, ln_f), so only biases escape the decay.
    """
    named = list(model.named_parameters())
    if not no_decay_bias:
        return [{"params": [p for _, p in named]}]
    no_decay = ("bias", "layer_norm.weight")
    return [{"params": [p for n, p in named if not any(nd in n for nd in no_decay)]},
            {"params": [p for n, p in named if any(nd in n for nd in no_decay)], "weight_decay": 0.0}]


class AuthorsEpochOrder:
    """The example indices gpt2_ft.py's train loader feeds, epoch by epoch, on one process (their README runs
    `--nproc_per_node=1`).

    FT_Dataset has ceil(n / batch_size) * batch_size items (data_utils.py lines 211, 218-219): the epoch is a
    permutation of those slots, `torch.randperm(slots)` seeded with seed + epoch (DistributedSampler with
    `seed=args.random_seed`, gpt2_ft.py line 290; `set_epoch(epoch)`, line 187; epochs count from 1, line 343). A
    slot >= n is a filler: `random.Random(911).randint(0, n - 1)` (lines 208, 222-223), one stream per dataset, drawn
    when the slot is read, never reseeded. So the fillers sit at random places in the epoch, not in its last batch,
    and may repeat an example of the same epoch. Batches are consecutive runs of batch_size indices; none is partial.

    `epoch(e)` must be called for e = 1, 2, ... in order, as their loop does: the filler stream carries over.
    """

    def __init__(self, n_examples: int, batch_size: int, seed: int):
        if n_examples < 1 or batch_size < 1:
            raise ValueError("n_examples and batch_size must be >= 1")
        self.n, self.batch_size, self.seed = n_examples, batch_size, seed
        self.num_batches = (n_examples + batch_size - 1) // batch_size     # data_utils.py line 211
        self.filler = random.Random(911)                                   # line 208
        self.next_epoch = 1

    def epoch(self, epoch: int) -> list[int]:
        """The indices of epoch `epoch` (from 1), in the order the loader reads them."""
        if epoch != self.next_epoch:
            raise ValueError(f"epoch {epoch} asked, but the filler stream is at epoch {self.next_epoch}")
        self.next_epoch += 1
        g = torch.Generator()
        g.manual_seed(self.seed + epoch)                                    # DistributedSampler.__iter__
        slots = torch.randperm(self.num_batches * self.batch_size, generator=g).tolist()
        return [s if s < self.n else self.filler.randint(0, self.n - 1) for s in slots]


class AuthorsSampler(torch.utils.data.Sampler):
    """AuthorsEpochOrder as the transformers Trainer's sampler. The Trainer calls set_epoch(0), set_epoch(1), ...
    before each epoch (their epoch e + 1); every epoch replays the filler stream from epoch 1, so a run resumed in
    epoch e draws the same order as one that never stopped."""

    def __init__(self, n_examples: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed, self.epoch = n_examples, batch_size, seed, 0
        self.slots = AuthorsEpochOrder(n_examples, batch_size, seed).num_batches * batch_size

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.slots

    def __iter__(self):
        order = AuthorsEpochOrder(self.n, self.batch_size, self.seed)
        for earlier in range(1, self.epoch + 1):
            order.epoch(earlier)
        return iter(order.epoch(self.epoch + 1))
