"""LoRA adapters: peft on the learner, the adapter's tensors for the engines, checks before start. No Ray, no vLLM.

With ``model.lora`` set, the learner wraps its model with peft (``get_peft_model``) and trains the adapter's
parameters only (the base weights are frozen and carry no optimizer state). What it publishes is the adapter alone,
under peft's names (``base_model.model.<module>.lora_A.weight``, as ``adapter_model.safetensors`` holds them), with
:func:`adapter_config`, which travels with every publication (``rlfleet.transport.Contents`` of kind ``adapter``):
the engines register it in memory (:meth:`rlfleet.generation.engine.Engine.load_weights`) and sample every request
with it. The update of an adapted linear layer is ``W x + (alpha / r) B A x``.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor

from rlfleet.config import LoraConfig

VLLM_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vllm.config.lora.MaxLoRARanks
ADAPTER = "default"  # peft's name of the one adapter
UNSERVED = ("lm_head", "embed_tokens")  # adapted by peft, not as peft does by vLLM 0.32 (tested)


def engine_rank(r: int) -> int:
    """The engine's ``max_lora_rank``: vLLM's smallest rank slot that holds ``r``."""
    for slot in VLLM_RANKS:
        if r <= slot:
            return slot
    raise ValueError(f"model.lora.r: {r} is above the largest rank vLLM serves ({VLLM_RANKS[-1]}); use at most "
                     f"{VLLM_RANKS[-1]}")


def peft_config(cfg: LoraConfig):
    """peft's ``LoraConfig`` for ``model.lora``."""
    from peft import LoraConfig as PeftLoraConfig

    return PeftLoraConfig(r=cfg.r, lora_alpha=cfg.scaling_alpha, lora_dropout=cfg.dropout,
                          target_modules=cfg.target_modules, bias="none", task_type="CAUSAL_LM")


def adapter_config(cfg: LoraConfig) -> dict:
    """The adapter's config as ``adapter_config.json`` holds it (what vLLM's ``PEFTHelper`` reads); the target
    modules are resolved by the engine from the tensors' names."""
    return {"r": cfg.r, "lora_alpha": cfg.scaling_alpha, "target_modules": cfg.target_modules, "bias": "none",
            "peft_type": "LORA", "task_type": "CAUSAL_LM"}


def add_adapter(model: torch.nn.Module, cfg: LoraConfig, seed: int = 0) -> torch.nn.Module:
    """``model`` with ``cfg``'s adapter injected in place (peft): its linear layers become LoRA layers whose
    ``base_layer`` keeps the frozen weight; only the adapter's parameters require grad. A is drawn from ``seed``
    (every rank of a learner group draws the same), B is 0. Returns the peft wrapper (``save_pretrained``,
    ``disable_adapter``); ``model`` itself is still the module to call."""
    from peft import get_peft_model

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return get_peft_model(model, peft_config(cfg), adapter_name=ADAPTER)


def is_adapter_parameter(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def peft_name(name: str) -> str:
    """A parameter's name in the HF model (``model.layers.0.self_attn.q_proj.lora_A.default.weight``) -> its name
    in peft's saved adapter (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``)."""
    return "base_model.model." + name.replace(f".{ADAPTER}.", ".")


def adapter_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The adapter's tensors of a model's state dict (HF names), under peft's names."""
    return {peft_name(k): v for k, v in state.items() if is_adapter_parameter(k)}


def merged_state(state: dict[str, Tensor], cfg: LoraConfig) -> dict[str, Tensor]:
    """Base + adapter as one plain state dict under the base model's names: ``W + (alpha / r) B A`` for every
    adapted layer (computed in float32), every other tensor as it is."""
    scale = cfg.scaling_alpha / cfg.r
    out = {}
    for name, value in state.items():
        if is_adapter_parameter(name):
            continue
        match = re.fullmatch(r"(.*)\.base_layer\.(weight|bias)", name)
        if match is None:
            out[name] = value
            continue
        module, kind = match.groups()
        if kind == "weight":
            a = state[f"{module}.lora_A.{ADAPTER}.weight"].float()  # [r, in]
            b = state[f"{module}.lora_B.{ADAPTER}.weight"].float()  # [out, r]
            value = (value.float() + scale * (b @ a)).to(value.dtype)
        out[f"{module}.{kind}"] = value
    return out


def lora_problems(cfg: LoraConfig, module_names: list[str]) -> list[str]:
    """What keeps ``model.lora`` from working on a model with these module names: a rank vLLM cannot serve, target
    modules the model does not have."""
    problems = []
    try:
        engine_rank(cfg.r)
    except ValueError as err:
        problems.append(str(err))
    if cfg.target_modules != "all-linear":
        unserved = [t for t in cfg.target_modules if t in UNSERVED]
        if unserved:
            problems.append(f"model.lora.target_modules: {unserved}: vLLM's engines do not apply an adapter of the "
                            "output layer or the embeddings as peft does (measured: their log-probs differ from the "
                            "learner's); adapt the decoder's layers only (e.g. 'all-linear')")
        leaves = {name.rsplit(".", 1)[-1] for name in module_names}
        missing = [t for t in cfg.target_modules if t not in leaves and t not in module_names]
        if missing:
            linear = sorted({n.rsplit(".", 1)[-1] for n in module_names if "proj" in n or "fc" in n})
            problems.append(f"model.lora.target_modules: {missing} are not modules of the model; its linear layers "
                            f"include {linear[:12]} (or use 'all-linear')")
    return problems
