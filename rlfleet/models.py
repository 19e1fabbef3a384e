"""Loading models and tokenizers, and the offline tiny models.

``builtin:<name>`` model names resolve to a random-init Qwen2 causal LM and a byte-level tokenizer, built here
without any hub access and cached under ``$RLFLEET_CACHE`` (default ``~/.cache/rlfleet``). Everything else is
passed to ``from_pretrained`` as is: a local directory, or a hub name for users who have the hub.

The tiny tokenizer maps byte ``b`` to token id ``b`` (a BPE with no merges over the 256 byte-level symbols), then
four special tokens; ``<|im_end|>`` is the EOS token and ends assistant turns in the chat template.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

BUILTIN_PREFIX = "builtin:"
SPECIAL_TOKENS = ["<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PAD_ID, ENDOFTEXT_ID, IM_START_ID, EOS_ID = 256, 257, 258, 259
VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)

# head_dim = hidden / heads must be one vLLM's CPU attention accepts (32, 64, ...); see platform-notes.
BUILTIN_MODELS: dict[str, dict] = {
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
    # tiny with weights 5x larger at init: its tied output layer can make confident predictions, which a LoRA
    # adapter (it adapts the decoder, never the output layer) cannot give the tiny model: trained to emit EOS, an
    # adapter reaches p(EOS) 0.99 here and stays at 0.04 on tiny (full fine-tuning reaches 0.99 on both)
    "tiny-lora": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, initializer_range=0.1),
    # ~20M parameters: large enough that compute dominates overheads in benchmarks.
    "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=6, num_attention_heads=8,
                  num_key_value_heads=4),
}

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def cache_dir() -> Path:
    return Path(os.environ.get("RLFLEET_CACHE", Path.home() / ".cache" / "rlfleet"))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters (the ByteLevel alphabet)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return dict(zip(printable, map(chr, chars)))


def build_tiny_tokenizer():
    """A byte-level tokenizer (token id == byte value) with pad/eos/chat special tokens and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_to_char = _bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIAL_TOKENS)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<|pad|>",
        eos_token="<|im_end|>",
        bos_token=None,
        unk_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )


def build_tiny_model(out_dir: str | Path, size: str = "tiny", seed: int = 0) -> Path:
    """Build a random-init Qwen2 + byte tokenizer and ``save_pretrained`` both to ``out_dir``. Offline."""
    from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM

    if size not in BUILTIN_MODELS:
        raise ValueError(f"unknown built-in model {size!r}; choose one of {sorted(BUILTIN_MODELS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = Qwen2Config(
        vocab_size=VOCAB_SIZE,
        max_position_embeddings=4096,
        tie_word_embeddings=True,
        bos_token_id=ENDOFTEXT_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        torch_dtype="float32",
        **BUILTIN_MODELS[size],
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=EOS_ID, pad_token_id=PAD_ID, bos_token_id=ENDOFTEXT_ID)
    model.save_pretrained(out, safe_serialization=True)
    build_tiny_tokenizer().save_pretrained(out)
    return out


def resolve_model_path(name_or_path: str) -> str:
    """Map ``builtin:<size>`` to its cached directory, building it once (safe under concurrent callers)."""
    if not name_or_path.startswith(BUILTIN_PREFIX):
        return name_or_path
    size = name_or_path[len(BUILTIN_PREFIX):]
    target = cache_dir() / "models" / f"{size}-v1"
    if (target / "config.json").is_file():
        return str(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{size}-"))
    try:
        build_tiny_model(tmp, size=size)
        try:
            os.rename(tmp, target)  # atomic: readers see a complete model or none
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(target)


WEIGHT_SUFFIXES = (".safetensors", ".bin")


def model_dir_problem(path: str | Path) -> str | None:
    """What keeps the local model directory ``path`` from loading, as a ``model.name_or_path`` problem: no
    ``config.json``, no weight files (``*.safetensors``, ``*.bin``), or shards that its index names but the
    directory lacks; None when it has them (or is not a local directory)."""
    path = Path(path).expanduser()
    if not path.is_dir():
        return None
    if not (path / "config.json").is_file():
        return (f"model.name_or_path: directory {str(path)!r} has no config.json; it is not a Hugging Face model "
                "directory (write one with save_pretrained, or point at one)")
    files = {f.name for f in path.iterdir() if f.is_file()}
    for index in sorted(files):
        if index.endswith(".index.json"):  # a sharded checkpoint: every shard it maps to must be there
            try:
                shards = set(json.loads((path / index).read_text()).get("weight_map", {}).values())
            except (OSError, ValueError, AttributeError):
                return f"model.name_or_path: {str(path / index)!r} is not a readable weight index; copy it again"
            if missing := sorted(shards - files):
                return (f"model.name_or_path: directory {str(path)!r} lacks {len(missing)} of the {len(shards)} "
                        f"weight shard(s) that {index} names ({', '.join(missing[:3])}"
                        f"{', ...' if len(missing) > 3 else ''}); copy the missing files in")
    if not any(name.endswith(WEIGHT_SUFFIXES) and not name.startswith("training_args") for name in files):
        return (f"model.name_or_path: directory {str(path)!r} has config.json but no weights (no *.safetensors or "
                "*.bin file); copy the weights in (model.safetensors or pytorch_model.bin, or the shards and their "
                "index), or point at a complete model directory")
    return None


def engine_dtype(model, generation, on_gpu: bool) -> torch.dtype:
    """The engines' dtype: ``generation.dtype``, or ``model.dtype``'s where it is 'auto'."""
    name = model.dtype if generation.dtype == "auto" else generation.dtype
    return torch_dtype(name, "cuda" if on_gpu else "cpu")


def publish_dtype(model, generation, learner_dtype: torch.dtype, engines_on_gpu: bool) -> torch.dtype:
    """The dtype the learner packs its publications in: its compute dtype, or the engines' where
    ``generation.dtype`` names one."""
    return learner_dtype if generation.dtype == "auto" else engine_dtype(model, generation, engines_on_gpu)


def torch_dtype(name: str, device: str) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(resolve_model_path(name_or_path), trust_remote_code=trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(name_or_path: str, dtype: torch.dtype = torch.float32, device: str = "cpu",
                   trust_remote_code: bool = False):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # "Loading weights" / "Writing model shards" bars: noise in an actor's log
    model = AutoModelForCausalLM.from_pretrained(
        resolve_model_path(name_or_path), dtype=dtype, trust_remote_code=trust_remote_code
    )
    return model.to(device)


FLOAT32_ATTENTION = "rlfleet_sdpa_float32"  # the attention implementation of a learner under autocast on CPU


def _sdpa_in_float32(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention with q, k, v (and a float mask) in float32 and autocast off; its output in the
    dtype q came in (the compute dtype under autocast)."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    with torch.autocast(query.device.type, enabled=False):
        out, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                              **kwargs)
    return out.to(query.dtype), weights


def float32_attention_on_cpu(model: torch.nn.Module, compute_dtype: torch.dtype, device: torch.device) -> bool:
    """A learner on CPU computing in bfloat16 (or float16) under autocast: run its attention in float32, the rest
    stays in the compute dtype. torch's CPU flash-attention backward is much slower in bfloat16 than in float32
    while the matrix products around it are several times faster (AMX): on this project's Xeon the 18M model's
    bfloat16 learner step takes 0.82-0.87x, the tiny model's 0.57-0.63x its time with bfloat16 attention
    (bench/RESULTS.md section 12).

    Applies to models using transformers' SDPA attention; the mask is SDPA's (registered under the same name).
    Returns whether the model now uses it."""
    if (device.type != "cpu" or compute_dtype == torch.float32 or model.config._attn_implementation != "sdpa"
            or not model._can_set_attn_implementation()):  # a model whose code fixes its attention: left as it is
        return False
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(FLOAT32_ATTENTION, _sdpa_in_float32)
    AttentionMaskInterface.register(FLOAT32_ATTENTION, sdpa_mask)
    model.set_attn_implementation(FLOAT32_ATTENTION)
    return model.config._attn_implementation == FLOAT32_ATTENTION


GPU_INFLIGHT_GROUPS = 256  # continuous engine on GPU: vLLM sizes its KV cache from gpu_memory_utilization at start


def kv_bytes_per_token(name_or_path: str, dtype_bytes: int, trust_remote_code: bool = False) -> int:
    """The KV cache one token takes in every layer: 2 (keys, values) x layers x KV heads x head dim x dtype bytes."""
    from transformers import AutoConfig

    c = AutoConfig.from_pretrained(resolve_model_path(name_or_path), trust_remote_code=trust_remote_code)
    c = getattr(c, "text_config", c)
    heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return 2 * c.num_hidden_layers * heads * head_dim * dtype_bytes


def inflight_groups(cfg) -> int:
    """``generation.max_inflight_groups``, or its default: under ``replay.staleness_unit: token`` one staleness
    window, ``(max_staleness + 1) * groups_per_step``; else the groups one generator's KV cache holds with every
    sequence at ``model.max_model_len`` (CPU: ``kv_cache_space_gib``), at least 1 and at most 4096."""
    gen = cfg.generation
    if gen.max_inflight_groups is not None:
        return gen.max_inflight_groups
    if cfg.replay.staleness_unit == "token":  # what admission counts no longer caps the groups generating: one window
        return (cfg.replay.max_staleness + 1) * cfg.learner.groups_per_step
    if cfg.cluster.generator_num_gpus:
        return GPU_INFLIGHT_GROUPS
    dtype_bytes = engine_dtype(cfg.model, cfg.generation, on_gpu=False).itemsize  # auto is float32 on CPU
    per_group = gen.num_generations * cfg.model.max_model_len * kv_bytes_per_token(
        cfg.model.name_or_path, dtype_bytes, cfg.model.trust_remote_code)
    return max(1, min(4096, int(gen.kv_cache_space_gib * 2**30 // per_group)))
