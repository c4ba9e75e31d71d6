"""Weights are complete or the run fails (issue 19): stages/lib/gpt2.load_model, the one loader of train, generate,
download and export_peft, takes a model.safetensors only if it holds exactly the tensors its config.json describes;
a tokenizer.json that is not one, and an adapter file that is cut short or corrupt, are one-line input errors naming
the file. Tiny random GPT-2 models on CPU."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel

from stages.lib import cli, gpt2, lora
from stages.lib.cli import InputError

from conftest import TOKENIZER

CONFIG = dict(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0)
FC = "transformer.h.0.mlp.c_fc.weight"


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("good") / "base"
    GPT2LMHeadModel(GPT2Config(**CONFIG)).save_pretrained(path, safe_serialization=True)
    (path / "identity.json").write_text(json.dumps({"name": "tiny", "revision": None, "model_sha256": "0" * 64}))
    return path


def variant(good: Path, dest: Path, tensors=None, config=None) -> Path:
    """A copy of the good model with its tensors and/or config edited (functions of the originals)."""
    shutil.copytree(good, dest)
    if tensors is not None:
        save_file(tensors(load_file(str(good / "model.safetensors"))), str(dest / "model.safetensors"),
                  metadata={"format": "pt"})
    if config is not None:
        cfg = json.loads((good / "config.json").read_text())
        cfg.update(config)
        (dest / "config.json").write_text(json.dumps(cfg))
    return dest


def logits(model):
    with torch.no_grad():
        return model(torch.arange(10).unsqueeze(0)).logits


def mask_buffers(t: dict) -> dict:
    """The causal-mask constants older transformers saved per layer."""
    return {f"transformer.h.{i}.attn.bias": torch.tril(torch.ones(1, 1, 32, 32)).to(torch.uint8) for i in range(2)} | {
        f"transformer.h.{i}.attn.masked_bias": torch.tensor(-1e4) for i in range(2)}


def hub_layout(t: dict) -> dict:
    """As the hub ships GPT-2: the base model's keys without `transformer.`, mask constants, no lm_head."""
    return {k.removeprefix("transformer."): v for k, v in {**t, **mask_buffers(t)}.items()}


# (tensor edit, config edit, what the one line must name besides the file)
BAD = {
    "a tensor missing": (lambda t: {k: v for k, v in t.items() if k != FC}, None, [FC, "is missing"]),
    "config has more layers": (None, {"n_layer": 3}, ["transformer.h.2.ln_1.weight", "n_layer 3", "2 layers"]),
    "untied without lm_head": (None, {"tie_word_embeddings": False}, ["lm_head.weight", "tie_word_embeddings"]),
    "an unexpected tensor": (lambda t: {**t, "transformer.h.0.attn.extra": torch.zeros(3)}, None,
                             ["unexpected tensor transformer.h.0.attn.extra"]),
    "config has fewer layers": (None, {"n_layer": 1}, ["unexpected tensor transformer.h.1.", "n_layer 1", "2 layers"]),
    "mask constant of a layer the config lacks": (
        lambda t: {**t, "transformer.h.2.attn.bias": torch.ones(1, 1, 32, 32)}, None,
        ["unexpected tensor transformer.h.2.attn.bias"]),
    "a shape mismatch": (lambda t: {**t, "transformer.h.1.mlp.c_fc.bias": torch.zeros(65)}, None,
                         ["transformer.h.1.mlp.c_fc.bias has shape [65]", "[64]"]),
    "tied but lm_head differs": (lambda t: {**t, "lm_head.weight": t["transformer.wte.weight"] + 1}, None,
                                 ["lm_head.weight differs", "tie_word_embeddings: true"]),
    "hub layout, a tensor missing": (lambda t: {k: v for k, v in hub_layout(t).items() if k != "h.1.ln_2.bias"},
                                     None, ["transformer.h.1.ln_2.bias is missing"]),
}


@pytest.mark.parametrize("case", list(BAD))
def test_weights_that_do_not_match_their_config_are_one_line_naming_file_and_tensor(good, tmp_path, case):
    tensors, config, names = BAD[case]
    model_dir = variant(good, tmp_path / "m", tensors, config)
    with pytest.raises(InputError) as e:
        gpt2.load_model(model_dir)
    message = str(e.value)
    assert message.startswith(f"{model_dir / 'model.safetensors'}: ") and "\n" not in message
    for name in names:
        assert name in message, message


@pytest.mark.parametrize("case", ["a tensor missing", "config has more layers"])
def test_a_stage_exits_2_with_the_one_line_and_no_load_report(good, tmp_path, case, capfd):
    """As a stage meets it (cli.run): exit 2, one line on stderr, not transformers' "newly initialized" table."""
    tensors, config, names = BAD[case]
    model_dir = variant(good, tmp_path / "m", tensors, config)
    capfd.readouterr()
    assert cli.run("generate", lambda argv: gpt2.load_model(model_dir), []) == 2
    err = capfd.readouterr().err
    assert err_lines(err) == [line for line in err.splitlines() if "generate: error: " in line], err
    assert len(err_lines(err)) == 1 and names[0] in err and "MISSING" not in err and "UNEXPECTED" not in err, err


def err_lines(err: str) -> list[str]:
    """stderr's lines but for transformers' progress bars (\r-separated "Loading weights" updates)."""
    return [line for line in err.splitlines() if line.strip() and "Loading weights" not in line]


@pytest.mark.parametrize("name, tensors, config", [
    ("hub layout with mask constants", hub_layout, None),
    ("mask constants", lambda t: {**t, **mask_buffers(t)}, None),
    ("tied, lm_head equal to the embedding", lambda t: {**t, "lm_head.weight": t["transformer.wte.weight"].clone()},
     None),
])
def test_the_same_weights_in_other_valid_layouts_load_silently_to_the_same_model(good, tmp_path, capfd, caplog,
                                                                                 name, tensors, config):
    want = logits(gpt2.load_model(good))
    model_dir = variant(good, tmp_path / "m", tensors, config)
    capfd.readouterr()
    caplog.clear()
    with caplog.at_level("WARNING"):
        got = logits(gpt2.load_model(model_dir))
    assert torch.equal(got, want)
    out = capfd.readouterr()
    said = out.err + out.out + caplog.text
    assert "UNEXPECTED" not in said and "MISSING" not in said and "tie" not in said, said


def test_an_untied_model_loads_its_own_output_layer(good, tmp_path):
    head = torch.randn(64, 16, generator=torch.Generator().manual_seed(3))
    model_dir = variant(good, tmp_path / "m", lambda t: {**t, "lm_head.weight": head}, {"tie_word_embeddings": False})
    model = gpt2.load_model(model_dir)
    assert torch.equal(model.lm_head.weight, head) and model.lm_head.weight is not model.transformer.wte.weight


@pytest.mark.parametrize("cut", [100, 0.5])
def test_a_truncated_weights_file_names_the_file(good, tmp_path, cut):
    model_dir = variant(good, tmp_path / "m")
    data = (model_dir / "model.safetensors").read_bytes()
    (model_dir / "model.safetensors").write_bytes(data[:cut if isinstance(cut, int) else int(len(data) * cut)])
    with pytest.raises(InputError, match=r"model\.safetensors: not a readable safetensors file \(.*\)$"):
        gpt2.load_model(model_dir)


# --- the tokenizer ---

@pytest.mark.parametrize("content", [b"{not json", b"", b"\xff\xfe\x00", TOKENIZER.read_bytes()[:5000]])
def test_a_tokenizer_json_that_is_not_json_is_one_line_naming_it(tmp_path, content):
    path = tmp_path / "tokenizer.json"
    path.write_bytes(content)
    with pytest.raises(InputError) as e:
        gpt2.load_tokenizer(path)
    assert str(e.value).startswith(f"{path}: not a tokenizer.json (") and "\n" not in str(e.value)


# --- the adapter ---

@pytest.fixture
def adapter(good, tmp_path) -> Path:
    model = lora.add_lora(gpt2.load_model(good), rank=2, alpha=4)
    path = tmp_path / "adapter.safetensors"
    lora.save_adapter(model, path, base=gpt2.base_identity(good))
    return path


@pytest.mark.parametrize("damage", ["header cut", "data cut", "garbage", "empty"])
def test_a_corrupt_adapter_is_a_value_error_naming_it_and_leaves_the_model_alone(good, adapter, damage):
    data = adapter.read_bytes()
    header = 8 + int.from_bytes(data[:8], "little")
    adapter.write_bytes({"header cut": data[:header - 10], "data cut": data[:header + 40],
                         "garbage": b"<html>not found</html>" * 10, "empty": b""}[damage])
    model = gpt2.load_model(good)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError) as e:
        lora.load_adapter(model, adapter, base=gpt2.base_identity(good))
    assert str(e.value).startswith(f"{adapter}: not a readable adapter file (") and "\n" not in str(e.value)
    assert not lora._lora_layers(model) and model.state_dict().keys() == before.keys()


def test_generate_turns_a_truncated_adapter_into_exit_2(good, adapter, tmp_path, capsys):
    """generate's load_model turns load_adapter's ValueError into an InputError: exit 2, not an internal error."""
    from stages import generate

    adapter.write_bytes(adapter.read_bytes()[:200])
    status = cli.run("generate", lambda argv: generate.load_model("lora", good, adapter.parent, False), [])
    err = capsys.readouterr().err
    assert status == 2 and len(err_lines(err)) == 1 and str(adapter) in err and "internal error" not in err, err


# --- export_peft loads the base through the same loader ---

def test_export_peft_refuses_a_base_with_a_missing_tensor(good, adapter, tmp_path):
    from stages.tools.export_peft import ExportError, export

    broken = variant(good, tmp_path / "broken", lambda t: {k: v for k, v in t.items() if k != FC})
    with pytest.raises(ExportError, match=rf"^--base: .*model\.safetensors: tensor {FC} is missing"):
        export(adapter, broken, tmp_path / "peft", verify=False)
    assert not (tmp_path / "peft").exists()
    with safe_open(str(broken / "model.safetensors"), framework="pt") as f:
        assert FC not in f.keys()
