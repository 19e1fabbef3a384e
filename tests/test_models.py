"""The offline tiny model: built without a hub, loadable by transformers' Auto classes."""

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rlfleet.cli import main
from rlfleet.models import EOS_ID, PAD_ID, VOCAB_SIZE, build_tiny_model, resolve_model_path


def test_tiny_model_cli_builds_loadable_model(tmp_path, capsys):
    assert main(["tiny-model", str(tmp_path / "m")]) == 0
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "m")
    tok = AutoTokenizer.from_pretrained(tmp_path / "m")
    assert model.config.vocab_size == VOCAB_SIZE == len(tok)
    cfg = model.config
    assert cfg.hidden_size // cfg.num_attention_heads in {32, 64, 80, 96, 112, 128}  # vLLM CPU attention
    assert tok.eos_token_id == EOS_ID and tok.pad_token_id == PAD_ID


def test_byte_tokenizer_ids_are_bytes_and_round_trip(tmp_path):
    tok = AutoTokenizer.from_pretrained(build_tiny_model(tmp_path / "m"))
    text = "aab é!"
    ids = tok(text).input_ids
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
    chat = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert chat == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_builds_are_deterministic(tmp_path):
    a = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "a", seed=3))
    b = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "b", seed=3))
    c = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path / "c", seed=4))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not all(torch.equal(sa[k], sc[k]) for k in sa)


def test_builtin_name_resolves_to_cached_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("RLFLEET_CACHE", str(tmp_path))
    path = resolve_model_path("builtin:tiny")
    assert path.startswith(str(tmp_path)) and resolve_model_path("builtin:tiny") == path
    assert resolve_model_path("Qwen/Qwen3-0.6B") == "Qwen/Qwen3-0.6B"  # hub names pass through untouched
