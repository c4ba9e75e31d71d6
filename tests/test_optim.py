"""stages.lib.optim: the LoRA authors' AdamW and their loader's epoch order, against plain references from their code.

The AdamW reference is written from microsoft/LoRA examples/NLG/src/optimizer.py (lines 100-128), one parameter at a
time with plain tensor arithmetic:
  m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2;  step = lr sqrt(1 - b2^t) / (1 - b1^t) (lr if no bias correction);
  p = p - step m / (sqrt(v) + eps);  then, if wd > 0, p = p - lr wd p.
The epoch-order reference is their FT_Dataset's length and index rule (data_utils.py lines 208-223) read through
torch's own DistributedSampler and DataLoader, as gpt2_ft.py builds them (lines 287-291).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch.optim.lr_scheduler import LambdaLR

from stages.lib.optim import AuthorsAdamW, AuthorsEpochOrder, authors_param_groups

STEPS = 20


class Net(torch.nn.Module):
    """Linear + LayerNorm + Linear, with biases, and a frozen tensor that must never move."""

    def __init__(self):
        super().__init__()
        self.fc1, self.ln, self.fc2 = torch.nn.Linear(6, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 3)
        self.frozen = torch.nn.Parameter(torch.ones(4), requires_grad=False)

    def forward(self, x):
        return self.fc2(torch.tanh(self.ln(self.fc1(x))))


def make_net(seed=0):
    torch.manual_seed(seed)
    return Net()


def data():
    g = torch.Generator().manual_seed(1)
    return torch.randn(16, 6, generator=g), torch.randn(16, 3, generator=g)


def grads_of(net, x, y, scale):
    net.zero_grad()
    (scale * ((net(x) - y) ** 2).mean()).backward()


def schedule(step):
    """A warm-up then linear decay, so that the learning rate (and the decay, which uses it) changes every step."""
    return (step + 1) / 4 if step < 3 else max(0.0, (STEPS - step) / (STEPS - 3))


def reference_run(net, lr, betas, eps, wd, correct_bias, no_decay_names=(), scale=1.0):
    """STEPS steps of their update, plainly; weight decay 0 for parameters whose name holds a no_decay_names part."""
    x, y = data()
    b1, b2 = betas
    state = {}
    for step in range(STEPS):
        grads_of(net, x, y, scale)
        lr_t = lr * schedule(step)
        with torch.no_grad():
            for name, p in net.named_parameters():
                if p.grad is None:
                    continue
                g = p.grad.clone()
                m, v, t = state.get(name, (torch.zeros_like(p), torch.zeros_like(p), 0))
                t += 1
                m = b1 * m + (1 - b1) * g
                v = b2 * v + (1 - b2) * g * g
                step_size = lr_t * math.sqrt(1 - b2 ** t) / (1 - b1 ** t) if correct_bias else lr_t
                new = p - step_size * m / (torch.sqrt(v) + eps)
                decay = 0.0 if any(part in name for part in no_decay_names) else wd
                if decay > 0:
                    new = new - lr_t * decay * new
                p.copy_(new)
                state[name] = (m, v, t)
    return net


def optimizer_run(net, make_optimizer, scale=1.0):
    x, y = data()
    opt = make_optimizer(net)
    sched = LambdaLR(opt, schedule)
    for _ in range(STEPS):
        grads_of(net, x, y, scale)
        opt.step()
        sched.step()
    return net, opt


def weights(net):
    return {n: p.detach().clone() for n, p in net.named_parameters()}


# --- the specification: 20 steps equal the plain reference ---

@pytest.mark.parametrize("wd", [0.0, 0.1])
@pytest.mark.parametrize("correct_bias", [True, False])
def test_matches_their_update_step_by_step(wd, correct_bias):
    kw = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=wd, correct_bias=correct_bias)
    ours, opt = optimizer_run(make_net(), lambda n: AuthorsAdamW(authors_param_groups(n), **kw))
    ref = reference_run(make_net(), 0.01, (0.9, 0.999), 1e-6, wd, correct_bias)
    for name, w in weights(ref).items():
        torch.testing.assert_close(weights(ours)[name], w, msg=name)
    assert weights(ours)["frozen"].eq(1).all() and ours.frozen not in opt.state


def test_no_decay_bias_group_spares_biases_only():
    """--no_decay_bias: "bias" and "layer_norm.weight" get no decay; our LayerNorm is `ln`, so its weight decays."""
    kw = dict(lr=0.01, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.1, correct_bias=True)
    ours, _ = optimizer_run(make_net(), lambda n: AuthorsAdamW(authors_param_groups(n, no_decay_bias=True), **kw))
    ref = reference_run(make_net(), 0.01, (0.9, 0.98), 1e-6, 0.1, True, no_decay_names=("bias", "layer_norm.weight"))
    for name, w in weights(ref).items():
        torch.testing.assert_close(weights(ours)[name], w, msg=name)


def test_one_group_holds_every_parameter_frozen_included():
    net = make_net()
    (group,) = authors_param_groups(net)
    assert group["params"] == list(net.parameters()) and "weight_decay" not in group


def test_their_defaults():
    (group,) = AuthorsAdamW(make_net().parameters()).param_groups
    assert (group["lr"], group["betas"], group["eps"], group["weight_decay"], group["correct_bias"]) == \
        (1e-3, (0.9, 0.98), 1e-6, 0.0, True)


# --- it is not torch's AdamW ---

@pytest.mark.parametrize("wd", [0.0, 0.1])
def test_differs_from_torch_adamw_with_the_same_settings(wd):
    """torch adds eps to sqrt(v / (1 - b2^t)) and decays before the update; theirs adds eps to sqrt(v) and decays
    after. Small gradients (scale 1e-3) make the eps placement visible; the decay order shows with wd > 0."""
    kw = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=wd)
    ours, _ = optimizer_run(make_net(), lambda n: AuthorsAdamW(n.parameters(), correct_bias=True, **kw), scale=1e-3)
    torchs, _ = optimizer_run(make_net(), lambda n: torch.optim.AdamW(n.parameters(), **kw), scale=1e-3)
    diff = max((weights(ours)[n] - w).abs().max().item() for n, w in weights(torchs).items())
    assert diff > 1e-5, f"AuthorsAdamW moved like torch.optim.AdamW (max difference {diff:.2e})"


def test_bad_arguments():
    params = make_net().parameters()
    for kw in (dict(lr=-1.0), dict(betas=(1.0, 0.9)), dict(betas=(0.9, -0.1)), dict(eps=-1e-6)):
        with pytest.raises(ValueError):
            AuthorsAdamW(params, **kw)


# --- with the transformers Trainer ---

class RegressionNet(torch.nn.Module):
    """The Trainer calls forward(**batch) and reads `loss`."""

    def __init__(self):
        super().__init__()
        self.net = make_net()

    def forward(self, x, labels):
        return {"loss": ((self.net(x) - labels) ** 2).mean()}


def test_the_trainer_steps_it_with_its_own_schedule(tmp_path):
    """Trainer(optimizers=(opt, None)): the Trainer's linear warm-up schedule drives our optimizer, step by step as a
    hand-written loop over the same batch does."""
    from transformers import Trainer, TrainingArguments, get_linear_schedule_with_warmup

    x, y = data()
    rows = [{"x": x[i], "labels": y[i]} for i in range(len(x))]
    kw = dict(lr=0.01, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.1, correct_bias=True)
    model = RegressionNet()
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=len(rows), max_steps=5,
                             warmup_steps=2, lr_scheduler_type="linear", learning_rate=0.01, max_grad_norm=0.0,
                             save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0)
    opt = AuthorsAdamW(authors_param_groups(model), **kw)
    Trainer(model=model, args=args, train_dataset=rows, optimizers=(opt, None)).train()

    hand = RegressionNet()
    opt2 = AuthorsAdamW(authors_param_groups(hand), **kw)
    sched = get_linear_schedule_with_warmup(opt2, 2, 5)
    for _ in range(5):
        opt2.zero_grad()
        hand(x, y)["loss"].backward()
        opt2.step()
        sched.step()
    for name, w in weights(hand).items():
        torch.testing.assert_close(weights(model)[name], w, msg=name)


# --- the epoch order of their train loader ---

class TheirFTDataset(torch.utils.data.Dataset):
    """data_utils.py FT_Dataset's length and index rule (lines 208, 211, 218-223); an item is its example index."""

    def __init__(self, n, batch_size):
        import random

        self.num_examples, self.batch_size = n, batch_size
        self.rng = random.Random(911)
        self.num_batches = int((self.num_examples + self.batch_size - 1) / self.batch_size)

    def __len__(self):
        return self.num_batches * self.batch_size

    def __getitem__(self, item):
        if item >= self.num_examples:
            item = self.rng.randint(0, self.num_examples - 1)
        return torch.tensor(item, dtype=torch.long)


def their_epochs(n, batch_size, seed, epochs):
    """gpt2_ft.py lines 287-291 (one process) and 187, 343: batches of indices, epochs counted from 1."""
    data = TheirFTDataset(n, batch_size)
    sampler = torch.utils.data.distributed.DistributedSampler(data, num_replicas=1, rank=0, seed=seed)
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, num_workers=0, shuffle=False,
                                         pin_memory=False, drop_last=True, sampler=sampler)
    out = []
    for epoch in range(1, epochs + 1):
        sampler.set_epoch(epoch)
        out.append([batch.tolist() for batch in loader])
    return out


@pytest.mark.parametrize("n, batch_size", [(21, 8), (24, 8), (1, 4), (37, 5)])
def test_epoch_order_is_their_loaders(n, batch_size):
    order = AuthorsEpochOrder(n, batch_size, seed=110)
    for epoch, batches in enumerate(their_epochs(n, batch_size, 110, 3), start=1):
        assert order.epoch(epoch) == [i for batch in batches for i in batch]


def test_e2e_train_set_gets_three_fillers_anywhere_in_the_epoch():
    """42,061 examples, batch 8: 5,258 full batches, 3 filler slots per epoch, not confined to the last batch."""
    order = AuthorsEpochOrder(42061, 8, seed=110)
    assert order.num_batches == 5258
    g = torch.Generator()
    g.manual_seed(110 + 1)
    slots = torch.randperm(5258 * 8, generator=g).tolist()
    fillers = [pos for pos, s in enumerate(slots) if s >= 42061]
    assert len(fillers) == 3 and any(pos < 5257 * 8 for pos in fillers)
    epoch = order.epoch(1)
    assert len(epoch) == 5258 * 8 and set(epoch) == set(range(42061))


def test_epochs_must_come_in_order():
    order = AuthorsEpochOrder(10, 4, seed=0)
    with pytest.raises(ValueError, match="epoch 2"):
        order.epoch(2)


def test_the_sampler_gives_their_order_epoch_by_epoch_and_the_same_after_a_resume():
    """AuthorsSampler is AuthorsEpochOrder behind the Trainer's set_epoch(0, 1, ...): a sampler asked for epoch 2
    alone (a run resumed there) draws what a sampler that went through epochs 1 and 2 draws."""
    from stages.lib.optim import AuthorsEpochOrder, AuthorsSampler

    order = AuthorsEpochOrder(23, 8, seed=110)
    epochs = [order.epoch(e) for e in (1, 2, 3)]
    straight = AuthorsSampler(23, 8, seed=110)
    seen = []
    for e in range(3):
        straight.set_epoch(e)
        seen.append(list(straight))
    assert seen == epochs and len(straight) == 24  # three whole batches of 8: one filler an epoch
    resumed = AuthorsSampler(23, 8, seed=110)
    resumed.set_epoch(2)
    assert list(resumed) == epochs[2]
