"""One typed config tree for a run: YAML in, dotted overrides, validated once at load.

    cfg = load_config("recipes/configs/tiny_cpu.yaml", overrides=["rl.group_size=16"])

Every section is a dataclass, in the grain of Megatron-Core's `TransformerConfig`. Unknown keys are
rejected with a did-you-mean, values are coerced to the field's type, and cross-field rules (TP divides
the heads, PP divides the layers, ...) are checked once in `validate`. Errors name the dotted field.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

CARDS_DIR = Path(__file__).parent / "model" / "cards"
LOOPBACK = "127.0.0.1"  # the default bind address of every server, and the address of a one-host run


class ConfigError(ValueError):
    """A config value is missing, unknown, of the wrong type, or inconsistent; the message names it."""


@dataclass
class ModelConfig:
    """Architecture of the GPTModel. `card` names a YAML file in model/cards (or a path); its values are
    defaults that keys given here override."""

    card: Optional[str] = None
    family: Literal["llama", "qwen2", "qwen3", "qwen3_moe"] = "llama"
    num_layers: int = 2
    hidden_size: int = 64
    ffn_hidden_size: int = 176
    num_attention_heads: int = 4
    num_query_groups: int = 2
    kv_channels: Optional[int] = None
    vocab_size: int = 256
    max_position_embeddings: int = 512
    rotary_base: float = 10000.0
    rope_scaling_factor: Optional[float] = None  # llama3-style RoPE frequency scaling
    norm_epsilon: float = 1e-6
    qkv_bias: bool = False
    qk_layernorm: bool = False
    tie_word_embeddings: bool = False
    init_method_std: float = 0.02
    params_dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    transformer_impl: Literal["auto", "local", "transformer_engine"] = "auto"
    fp8: Optional[Literal["delayed", "tensorwise", "blockwise", "mxfp8"]] = None
    make_vocab_size_divisible_by: int = 128
    # Mixture of experts (family qwen3_moe; None: a dense MLP). Every layer's MLP is a Megatron-Core MoE layer:
    # a top-k softmax router (norm_topk_prob: the k weights renormalised to sum to 1) over num_moe_experts
    # SwiGLU experts of width moe_ffn_hidden_size, no shared expert (model/moe.py).
    num_moe_experts: Optional[int] = None
    moe_router_topk: int = 2
    moe_ffn_hidden_size: Optional[int] = None
    moe_norm_topk_prob: bool = True
    moe_aux_loss_coeff: float = 0.0  # load-balancing (switch) loss weight; logged as moe_load_balancing_loss


@dataclass
class ParallelConfig:
    """Model-parallel sizes; data parallelism is what the world size leaves over."""

    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    context_parallel_size: int = 1
    expert_model_parallel_size: int = 1
    sequence_parallel: bool = False
    use_distributed_optimizer: bool = False
    backend: Literal["auto", "gloo", "nccl"] = "auto"
    # how long a collective of any process group (the world's and every megatron group) waits for its peers
    # before it fails the rank (Megatron-LM's --distributed-timeout-minutes)
    distributed_timeout_minutes: int = 10


@dataclass
class SourceConfig:
    """One text source of a blend."""

    path: str = ""
    kind: Literal["jsonl", "parquet", "text", "megatron", "synthetic", "pydoc"] = "synthetic"
    text_field: str = "text"
    weight: float = 1.0
    text_unit: Literal["file", "paragraph"] = "file"  # kind text: a document is a file or a paragraph
    split: str = "train"  # kind synthetic: which split of the generator
    seed: int = 0  # kind synthetic: generator seed
    synthetic: dict[str, Any] = field(default_factory=dict)  # kind synthetic: SyntheticSpec fields and "kinds"


@dataclass
class TokenizerConfig:
    kind: Literal["byte", "hf", "trained"] = "byte"
    path: Optional[str] = None


@dataclass
class ProxyConfig:
    """The frozen proxy model that scores chunks for entropy / logprob_window site selection (RPT uses a small
    separate model) and gives the `run` reward its surprisal weights. `card`: a model card (name or YAML path)
    sharing the policy's tokenizer; `load`: its checkpoint (a complete iter_* folder). Unset: the reference
    model (rl.reference, else checkpoint.load) scores instead."""

    card: Optional[str] = None
    load: Optional[str] = None


@dataclass
class DataConfig:
    """Where episodes come from: sources, chunking, site selection and the prompt template."""

    sources: list[SourceConfig] = field(default_factory=lambda: [SourceConfig()])
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    context_len: int = 192  # leaves 34 tokens of template beside rollout.max_new_tokens in seq_length + 1 = 257
    min_context: int = 16
    answer_horizon: int = 1
    sites_per_chunk: int = 1
    # single: every site of a chunk is its own episode; interleaved: one episode reads the chunk and thinks and
    # answers at each of its sites in turn, earlier thoughts kept in context (rl/interleaved.py)
    episode_format: Literal["single", "interleaved"] = "single"
    # entropy_weighted: k sites drawn without replacement with probability proportional to the proxy's entropy
    # (no threshold; data.entropy_max still bounds it)
    site_selection: Literal["uniform", "entropy", "logprob_window", "entropy_weighted"] = "uniform"
    site_classes: list[str] = field(default_factory=list)  # labelled (synthetic) text: only sites of these classes
    entropy_threshold: float = 1.0
    entropy_max: Optional[float] = None  # entropy sites: also at most this (nats), leaving near-impossible tokens out
    entropy_top_k: int = 16
    logprob_window: tuple[float, float] = (-4.5, -1.0)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    think_open: str = "<think>"
    think_close: str = "</think>"
    answer_open: str = "<answer>"
    answer_close: str = "</answer>"
    prompt_template: str = "{context}<think>"
    seed: int = 1234
    max_document_bytes: int = 4 << 20  # longer documents (or lines) are skipped as too_long, never loaded
    shard_bytes: int = 16 << 20  # the unit dealt to DP ranks: byte range of JSONL/text, docs of a Megatron dataset
    prefetch_documents: int = 8  # documents built into episodes ahead on a background thread (0: inline)


@dataclass
class SGLangConfig:
    """Real SGLang servers: started as child processes (python=..., `replicas` of them) or attached (url=... and/or
    urls=[...]); several make a fleet (rollout/sglang/fleet.py) that shares each step's groups and gets every
    weight version."""

    url: Optional[str] = None
    urls: list[str] = field(default_factory=list)  # more attached replicas (same api_key)
    replicas: int = 1  # servers the trainer starts when none is attached
    python: str = "sglang-venv/bin/python"
    host: str = LOOPBACK  # where a started server binds
    port: int = 30000
    api_key: Optional[str] = None
    extra_args: list[str] = field(default_factory=list)
    startup_timeout_s: float = 300.0
    request_timeout_s: float = 600.0  # one /generate call
    retry_backoff_s: float = 5.0  # an attached replica that failed is tried again after this, doubling
    max_restarts: int = 2
    weight_sync: Literal["tensor", "distributed", "disk"] = "tensor"
    weights_dir: Optional[str] = None  # disk channel: a folder every replica can read (default: the run's)
    group_host: Optional[str] = None  # distributed channel: the trainer's address the replicas connect to
    # (default: MASTER_ADDR, or the first Slurm node: rank 0's host)
    # "fp8": the server runs blockwise FP8 weights (--quantization fp8, started from an FP8 folder); every push
    # sends weight + weight_scale_inv per linear layer (weights/fp8.py). Needs a GPU server.
    quantization: Optional[Literal["fp8"]] = None
    # with rl.routing_replay: each rollout carries the experts the server routed it to, for
    # moe/rollout_routing_mismatch (a started server gets --enable-return-routed-experts; an attached one needs it)
    routed_experts: bool = True
    # distributed/disk channels: send each tensor's changed elements (bit-exact deltas: int32 indices or a bitmask,
    # with the values) when fewer bytes than the tensor; the servers run rntp's served model classes that apply them
    # (rollout/sglang/plugins; an owned server is started with them, an attached one is checked)
    delta_sync: bool = False
    delta_max_density: float = 0.5  # a tensor with a larger fraction of its elements changed goes whole


@dataclass
class RolloutConfig:
    """Who writes the thoughts, where it runs, and how they are sampled.

    placement: `colocated` (the engine shares the trainer's devices and sleeps while it trains; the
    in-process megatron engine always is) or `separate` (an SGLang server on devices of its own, serving
    while the trainer trains). off_policy_steps: 0 (each step's rollouts come from the newest weights) or
    1 (the rollouts of step n+1 are generated while step n trains, from weights one version older; needs
    `separate` and a TIS or icepop correction, see rollout/prefetch.py)."""

    engine: Literal["megatron", "sglang"] = "megatron"
    placement: Literal["colocated", "separate"] = "colocated"
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 32
    stop: list[str] = field(default_factory=lambda: ["</answer>"])
    off_policy_steps: int = 0
    weight_bucket_mb: int = 512
    sglang: SGLangConfig = field(default_factory=SGLangConfig)


@dataclass
class RewardConfig:
    """The reward by registry name, its parameters, and weighted shaping terms."""

    name: str = "exact"
    params: dict[str, Any] = field(default_factory=dict)
    format_weight: float = 0.0
    length_cost: float = 0.0
    overlong_buffer: int = 0
    ntp_weight: float = 0.0
    shuffle: bool = False  # control run: each rollout gets another rollout's reward (no information left)
    # The no-thought model p_bar of info_gain / vrcli: the live policy, an EMA of it (RLP), or the reference.
    baseline: Literal["policy", "ema", "frozen"] = "ema"
    ema_decay: float = 0.999  # p_bar <- d p_bar + (1 - d) p after every optimizer step (RLP: 0.999)
    # Where the baseline cancels from the gradient (config.baseline_role: "metric"), it is scored only every this
    # many steps, for the logged info_gain (one forward per site); 0: never
    info_gain_interval: int = 10


@dataclass
class RLConfig:
    """How rewards become gradients (docs/method.md, section 4)."""

    objective: Literal["ntp", "rntp", "mixed"] = "rntp"
    group_size: int = 8
    advantage: Literal["grpo", "dr_grpo", "rloo"] = "grpo"
    dynamic_sampling: bool = False
    clip_eps_low: float = 0.2
    clip_eps_high: float = 0.2
    dual_clip_c: Optional[float] = None
    ratio_type: Literal["token", "gspo"] = "token"
    kl_coef: float = 0.0
    kl_type: Literal["k1", "k2", "k3"] = "k3"
    reference: Optional[str] = None  # the frozen KL reference's checkpoint (default: checkpoint.load's weights)
    tis_cap: Optional[float] = None
    icepop: Optional[tuple[float, float]] = None
    aggregation: Literal["token_mean", "seq_mean", "dr_grpo"] = "token_mean"
    # None: by the reward (RunConfig resolves it): `thought` for a reward that scores the true continuation after the
    # thought (a likelihood reward: no answer is read, RLP), else `thought_and_answer`; a value given here wins
    train_on: Optional[Literal["thought_and_answer", "thought"]] = None
    logprob_chunk_size: int = 1024
    # MoE: old log-probs from a recording pass over the step's micro-batches whose experts the training forward
    # replays (Megatron-Core's RouterReplay; rl/routing_replay.py)
    routing_replay: bool = False
    # a group's rollouts train as one sequence [context | y_1 | ... | y_G], groups packed into rows
    # (rl/shared_context.py); falls back to one rollout a row, saying why once, where it cannot apply
    shared_context: bool = True


@dataclass
class ScheduleConfig:
    """Steps, batch sizes and the optimizer's learning-rate schedule."""

    train_steps: int = 100
    token_budget: Optional[int] = None
    flops_budget: Optional[float] = None  # also stop once the run's flops_total (rntp_megatron/flops.py) reaches it
    global_batch_size: int = 8
    micro_batch_size: int = 1
    seq_length: int = 256
    lr: float = 1e-3
    min_lr: float = 0.0
    lr_schedule: Literal["constant", "cosine", "wsd"] = "constant"
    warmup_steps: int = 0
    wsd_decay_fraction: float = 0.2
    weight_decay: float = 0.0
    clip_grad: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8


@dataclass
class CheckpointConfig:
    """Where checkpoints go and when: every `save_interval` steps and every `save_interval_minutes` of wall
    time, whichever comes first (0 turns either off), at the end of the run, and on SIGTERM/SIGUSR1."""

    dir: Optional[str] = None
    save_interval: int = 500
    save_interval_minutes: float = 30.0
    keep_last: int = 2
    load: Optional[str] = None


@dataclass
class WandbConfig:
    """Weights & Biases (the `wandb` extra): the JSONL metrics, the run config, final tables and curves.
    mode: online, offline (files under WANDB_DIR or logging.dir, `wandb sync` later) or disabled."""

    project: str = "rntp"
    entity: Optional[str] = None
    mode: Literal["online", "offline", "disabled"] = "online"
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggingConfig:
    dir: str = "runs/default"
    log_interval: int = 1
    jsonl: bool = True
    tensorboard: bool = False
    plot: bool = True
    progress: bool = True
    wandb: Optional[WandbConfig] = None  # logging.wandb: {project, entity, mode, tags}


@dataclass
class RunConfig:
    """The whole tree of a run."""

    seed: int = 1234
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def __post_init__(self) -> None:
        if self.rl.train_on is None:  # unset: the reward decides (an explicit value is never replaced)
            self.rl.train_on = default_train_on(self.reward.name)


def default_train_on(reward_name: str) -> str:
    """rl.train_on when unset: `thought` for a likelihood reward (it scores the true continuation after the thought,
    never the policy's answer, so an advantage on the answer tokens would push text no reward read), else
    `thought_and_answer`. An unknown name resolves as a string reward; looking it up reports it."""
    from rntp_megatron.rewards.registry import get_reward

    try:
        likelihood = get_reward(reward_name).kind == "likelihood"
    except ValueError:
        likelihood = False
    return "thought" if likelihood else "thought_and_answer"


# ---------------------------------------------------------------------------------------------------
# Building dataclasses from plain dicts, with coercion and errors that name the field.


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """`value` converted to the annotated type `tp`, or a ConfigError naming `where`."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} fits none of {args}")
    if origin is Literal:
        if value not in args:
            close = difflib.get_close_matches(str(value), [str(a) for a in args], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{where}: {value!r} is not one of {list(args)}{hint}; fix: "
                              f"{where}: {close[0] if close else args[0]}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping for {tp.__name__}, got {value!r}; fix: "
                              f"{where}: {{...}} with fields {[f.name for f in dataclasses.fields(tp)][:6]}")
        return from_dict(tp, value, where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {value!r}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    raise ConfigError(f"{where}: unsupported field type {tp!r}")


def from_dict(cls: type, data: dict[str, Any], where: str = "") -> Any:
    """An instance of dataclass `cls` from a nested dict; unknown keys raise with a did-you-mean."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {'.'.join(filter(None, [where, close[0]]))!r}?" if close else ";"
            raise ConfigError(f"unknown config key {path!r}{hint} fix: rename or remove it (known keys"
                              f"{' of ' + where if where else ''}: {', '.join(names)})")
        try:
            kwargs[key] = _coerce(value, hints[key], path)
        except ConfigError as e:
            if "fix:" in str(e):
                raise
            if hints[key] in (str, Optional[str]) and isinstance(value, (int, float, bool)):
                raise ConfigError(f"{e}; fix: {path}: {str(value)!r} (quoted, a string)") from None
            raise ConfigError(f"{e}; fix: {path}: {_example(cls, key)} (the default)") from None
    return cls(**kwargs)


def _example(cls: type, name: str) -> str:
    """The default of field `name` of dataclass `cls`, written as YAML (a value that passes validation)."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    value = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
    return yaml.safe_dump(_plain(value), default_flow_style=True).strip().removesuffix("...").strip()


def to_dict(cfg: Any) -> dict[str, Any]:
    """The config as plain YAML-able data (tuples become lists)."""
    return yaml.safe_load(yaml.safe_dump(_plain(dataclasses.asdict(cfg))))


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def apply_override(data: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` (value parsed as YAML) in the nested dict `data`."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.key=value; fix: e.g. "
                          "--set rl.group_size=16")
    dotted, raw = override.split("=", 1)
    keys = dotted.strip().split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {k!r} is not a section; fix: set {k} itself "
                              f"(--set {'.'.join(keys[:keys.index(k) + 1])}=VALUE)")
    node[keys[-1]] = yaml.safe_load(raw) if raw.strip() else ""


def load_card(name: str) -> dict[str, Any]:
    """The model card's values: a name in model/cards (without .yaml) or a path to a YAML file."""
    path = Path(name)
    if not path.suffix:
        path = CARDS_DIR / f"{name}.yaml"
    if not path.exists():
        known = sorted(p.stem for p in CARDS_DIR.glob("*.yaml"))
        raise ConfigError(f"model.card: no model card {name!r} (built-in cards: {', '.join(known)}); fix: "
                          f"model.card: one of those, or the path of a YAML file of ModelConfig fields")
    card = yaml.safe_load(path.read_text()) or {}
    if not isinstance(card, dict):
        raise ConfigError(f"model.card: {path} must hold a mapping of ModelConfig fields; fix: write it as "
                          "`num_layers: 2` lines, one a field")
    return card


def build_config(data: Optional[dict[str, Any]] = None, overrides: list[str] = ()) -> RunConfig:
    """A validated RunConfig from nested data plus dotted overrides; model card values fill the gaps."""
    data = yaml.safe_load(yaml.safe_dump(data or {}))  # deep copy, plain types
    for o in overrides:
        apply_override(data, o)
    model = data.get("model") or {}
    if model.get("card"):
        data["model"] = {**load_card(model["card"]), **model}
    cfg = from_dict(RunConfig, data)
    validate(cfg)
    return cfg


def load_config(path: Optional[str | Path | list[str | Path]] = None, overrides: list[str] = ()) -> RunConfig:
    """`build_config` from a YAML file, or several laid over each other in order (a recipe, then a site's
    changes to it: mappings merge key by key, any other value replaces), or the defaults when path is None."""
    data: dict[str, Any] = {}
    for p in [] if path is None else [path] if isinstance(path, (str, Path)) else path:
        layer = yaml.safe_load(Path(p).read_text()) or {}
        if not isinstance(layer, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of sections; fix: start it with a "
                              "section such as `model: {card: tiny}`")
        data = _merged(data, layer)
    return build_config(data, overrides)


def _merged(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """base with top laid over it: nested mappings merged, other values of top replacing base's."""
    out = dict(base)
    for key, value in top.items():
        both = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = _merged(out[key], value) if both else value
    return out


def divisors(n: int) -> list[int]:
    """The positive divisors of n, ascending (the sizes a parallel dimension over n things may take)."""
    return [d for d in range(1, n + 1) if n % d == 0]


def next_multiple(value: int, multiple: int) -> int:
    """The smallest multiple of `multiple` that is >= value (and >= multiple)."""
    return max(-(-value // multiple), 1) * multiple


def padded_vocab_size(vocab_size: int, divisible_by: int, tp: int) -> int:
    """vocab_size rounded up to a multiple of divisible_by * TP (each TP rank holds an equal vocab slice)."""
    return next_multiple(vocab_size, divisible_by * tp)


def data_parallel_size(p: ParallelConfig, world_size: int) -> int:
    """world_size / (TP * PP * CP), or a ConfigError when it does not divide."""
    model_parallel = p.tensor_model_parallel_size * p.pipeline_model_parallel_size * p.context_parallel_size
    if world_size % model_parallel:
        raise ConfigError(
            f"parallel: world size {world_size} is not divisible by TP*PP*CP = "
            f"{p.tensor_model_parallel_size}*{p.pipeline_model_parallel_size}*{p.context_parallel_size}; fix: "
            f"launch a multiple of {model_parallel} processes, or choose TP*PP*CP among {divisors(world_size)}"
        )
    return world_size // model_parallel


def validate(cfg: RunConfig, world_size: Optional[int] = None) -> None:
    """Cross-field rules; with `world_size`, also the data-parallel batch split. Each error says a fix."""
    m, p, s = cfg.model, cfg.parallel, cfg.schedule

    def need(cond: bool, where: str, why: str, fix: str = "") -> None:
        if not cond:
            raise ConfigError(f"{where}: {why}" + (f"; fix: {fix}" if fix else ""))

    for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size", "context_parallel_size",
                 "expert_model_parallel_size"):
        need(getattr(p, name) >= 1, f"parallel.{name}", f"must be >= 1, got {getattr(p, name)}",
             f"parallel.{name}: 1 (no split along this dimension)")
    need(p.distributed_timeout_minutes >= 1, "parallel.distributed_timeout_minutes",
         f"must be >= 1, got {p.distributed_timeout_minutes}", "parallel.distributed_timeout_minutes: 10")
    tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
    tp_choices = divisors(math.gcd(m.num_attention_heads, m.num_query_groups))
    need(m.num_attention_heads % tp == 0, "parallel.tensor_model_parallel_size",
         f"TP={tp} must divide model.num_attention_heads={m.num_attention_heads}",
         f"parallel.tensor_model_parallel_size: one of {tp_choices}")
    need(m.num_query_groups % tp == 0, "parallel.tensor_model_parallel_size",
         f"TP={tp} must divide model.num_query_groups (KV heads)={m.num_query_groups}",
         f"parallel.tensor_model_parallel_size: one of {tp_choices}")
    need(m.num_attention_heads % m.num_query_groups == 0, "model.num_query_groups",
         f"{m.num_query_groups} must divide model.num_attention_heads={m.num_attention_heads}",
         f"model.num_query_groups: one of {divisors(m.num_attention_heads)}")
    need(m.num_layers % pp == 0, "parallel.pipeline_model_parallel_size",
         f"PP={pp} must divide model.num_layers={m.num_layers}",
         f"parallel.pipeline_model_parallel_size: one of {divisors(m.num_layers)}")
    need(not p.sequence_parallel or tp > 1, "parallel.sequence_parallel", f"true needs TP > 1, got TP={tp}",
         "parallel.sequence_parallel: false, or parallel.tensor_model_parallel_size: 2 or more")
    validate_moe(m, p)
    validate_routing_replay(cfg)
    need(p.context_parallel_size == 1, "parallel.context_parallel_size",
         f"{p.context_parallel_size} is not supported: Megatron-Core's context parallelism needs Transformer "
         "Engine's attention, and the RNTP batch (tokens, masks, log-probs) is not split into CP chunks here",
         "parallel.context_parallel_size: 1")
    need(not p.sequence_parallel or s.seq_length % tp == 0, "schedule.seq_length",
         f"{s.seq_length} must be a multiple of TP={tp} under parallel.sequence_parallel (rows split over TP)",
         f"schedule.seq_length: {next_multiple(s.seq_length, tp)}")
    need(m.fp8 is None or m.transformer_impl != "local", "model.fp8",
         f"FP8 recipe {m.fp8!r} needs model.transformer_impl 'transformer_engine' or 'auto', not 'local'",
         "model.transformer_impl: auto, or model.fp8: null")
    need(s.micro_batch_size >= 1, "schedule.micro_batch_size", f"must be >= 1, got {s.micro_batch_size}",
         "schedule.micro_batch_size: 1")
    need(s.global_batch_size % s.micro_batch_size == 0, "schedule.global_batch_size",
         f"{s.global_batch_size} is not divisible by micro_batch_size={s.micro_batch_size}",
         f"schedule.global_batch_size: {next_multiple(s.global_batch_size, s.micro_batch_size)}, or "
         f"schedule.micro_batch_size: one of {divisors(max(s.global_batch_size, 1))}")
    need(s.lr >= 0, "schedule.lr", f"must be >= 0, got {s.lr}", f"schedule.lr: {abs(s.lr)}")
    need(s.flops_budget is None or s.flops_budget > 0, "schedule.flops_budget", f"must be > 0, got {s.flops_budget}",
         "schedule.flops_budget: null (no budget) or a positive number of FLOPs")
    need(cfg.rl.group_size >= 1, "rl.group_size", f"must be >= 1, got {cfg.rl.group_size}", "rl.group_size: 8")
    need(cfg.rl.advantage != "rloo" or cfg.rl.group_size >= 2, "rl.group_size",
         f"rloo needs at least 2 samples per group, got {cfg.rl.group_size}",
         "rl.group_size: 2 or more, or rl.advantage: grpo")
    need(cfg.data.answer_horizon >= 1, "data.answer_horizon", f"must be >= 1, got {cfg.data.answer_horizon}",
         "data.answer_horizon: 1 (the next token)")
    need(cfg.data.min_context >= 1, "data.min_context", f"must be >= 1, got {cfg.data.min_context}",
         "data.min_context: 16")
    need(cfg.data.context_len > cfg.data.min_context + cfg.data.answer_horizon, "data.context_len",
         f"{cfg.data.context_len} leaves no site after min_context={cfg.data.min_context} and "
         f"answer_horizon={cfg.data.answer_horizon}",
         f"data.context_len: {cfg.data.min_context + cfg.data.answer_horizon + 1} or more, or a smaller "
         "data.min_context")
    need(cfg.data.entropy_max is None or cfg.data.site_selection in ("entropy", "entropy_weighted"),
         "data.entropy_max", f"bounds entropy site selection, but data.site_selection is "
         f"{cfg.data.site_selection!r}", "data.entropy_max: null, or data.site_selection: entropy")
    need(cfg.data.entropy_max is None or cfg.data.site_selection != "entropy"
         or cfg.data.entropy_max > cfg.data.entropy_threshold, "data.entropy_max",
         f"{cfg.data.entropy_max} leaves no entropy above data.entropy_threshold={cfg.data.entropy_threshold}",
         f"data.entropy_max: a value above {cfg.data.entropy_threshold}")
    lo, hi = cfg.data.logprob_window
    need(lo < hi, "data.logprob_window", f"low {lo} must be below high {hi}",
         f"data.logprob_window: [{min(lo, hi)}, {max(lo, hi)}]" if lo != hi else "data.logprob_window: [-4.5, -1.0]")
    need(cfg.data.prompt_template.count("{context}") == 1, "data.prompt_template",
         f"must contain {{context}} exactly once, got {cfg.data.prompt_template!r}",
         "data.prompt_template: '{context}<think>'")
    need(cfg.data.sites_per_chunk >= 1, "data.sites_per_chunk", f"must be >= 1, got {cfg.data.sites_per_chunk}",
         "data.sites_per_chunk: 1")
    need(cfg.data.max_document_bytes >= 1, "data.max_document_bytes",
         f"must be >= 1, got {cfg.data.max_document_bytes}", f"data.max_document_bytes: {4 << 20} (4 MiB)")
    need(cfg.data.shard_bytes >= 1, "data.shard_bytes", f"must be >= 1, got {cfg.data.shard_bytes}",
         f"data.shard_bytes: {16 << 20} (16 MiB)")
    need(cfg.data.prefetch_documents >= 0, "data.prefetch_documents",
         f"must be >= 0, got {cfg.data.prefetch_documents}", "data.prefetch_documents: 8 (0 builds inline)")
    need(bool(cfg.data.sources), "data.sources", "needs at least one source",
         "data.sources: [{kind: jsonl, path: DATA.jsonl}] (or [{kind: pydoc}] to try it out)")
    for i, src in enumerate(cfg.data.sources):
        need(src.weight > 0, f"data.sources[{i}].weight", f"must be > 0, got {src.weight}",
             f"data.sources[{i}].weight: 1.0 (or drop the source)")
    if cfg.data.episode_format == "interleaved":
        need(cfg.rl.objective != "ntp", "data.episode_format",
             "'interleaved' shapes RL episodes; rl.objective='ntp' trains on plain chunks",
             "data.episode_format: single")
        need(not cfg.rl.dynamic_sampling, "rl.dynamic_sampling",
             "drops whole rows, but an interleaved row holds one group member of each of its sites' groups",
             "rl.dynamic_sampling: false")
    need(cfg.checkpoint.save_interval >= 0, "checkpoint.save_interval",
         f"must be >= 0 (0: no saves by step count), got {cfg.checkpoint.save_interval}",
         "checkpoint.save_interval: 500")
    need(cfg.checkpoint.save_interval_minutes >= 0, "checkpoint.save_interval_minutes",
         f"must be >= 0 (0: no saves by wall time), got {cfg.checkpoint.save_interval_minutes}",
         "checkpoint.save_interval_minutes: 30")
    validate_rollout(cfg)
    validate_lengths(cfg)
    validate_side_models(cfg)
    if world_size is not None:
        dp = data_parallel_size(p, world_size)
        need(dp % p.expert_model_parallel_size == 0, "parallel.expert_model_parallel_size",
             f"EP={p.expert_model_parallel_size} must divide the data-parallel size {dp} (experts are spread over "
             "the data-parallel ranks of each tensor-parallel group)",
             f"parallel.expert_model_parallel_size: one of {divisors(dp)}")
        need(s.global_batch_size % (s.micro_batch_size * dp) == 0, "schedule.global_batch_size",
             f"{s.global_batch_size} is not divisible by micro_batch_size * data-parallel size = "
             f"{s.micro_batch_size} * {dp}",
             f"schedule.global_batch_size: {next_multiple(s.global_batch_size, s.micro_batch_size * dp)}")


def validate_moe(m: ModelConfig, p: ParallelConfig) -> None:
    """The mixture-of-experts fields against the family and the expert-parallel size."""
    ep = p.expert_model_parallel_size
    if m.num_moe_experts is None:
        if m.family == "qwen3_moe":
            raise ConfigError("model.num_moe_experts: family 'qwen3_moe' needs the number of experts")
        if ep > 1:
            raise ConfigError(f"parallel.expert_model_parallel_size: EP={ep} needs a mixture-of-experts model "
                              "(model.num_moe_experts)")
        return
    if m.family != "qwen3_moe":
        raise ConfigError(f"model.num_moe_experts: experts are mapped for family 'qwen3_moe' only, not {m.family!r}")
    if not 1 <= m.moe_router_topk <= m.num_moe_experts:
        raise ConfigError(f"model.moe_router_topk: {m.moe_router_topk} must be in 1..num_moe_experts="
                          f"{m.num_moe_experts}")
    if m.num_moe_experts % ep:
        raise ConfigError(f"parallel.expert_model_parallel_size: EP={ep} must divide model.num_moe_experts="
                          f"{m.num_moe_experts}")
    if p.tensor_model_parallel_size > 1 and not p.sequence_parallel:
        raise ConfigError("parallel.sequence_parallel: Megatron-Core's MoE layer trains at TP > 1 only with sequence "
                          f"parallelism (TP={p.tensor_model_parallel_size}); set it to true")
    if m.moe_aux_loss_coeff < 0:
        raise ConfigError(f"model.moe_aux_loss_coeff: must be >= 0, got {m.moe_aux_loss_coeff}")


def validate_routing_replay(cfg: RunConfig) -> None:
    """rl.routing_replay needs MoE routers to record and an RL step to replay them in."""
    if not cfg.rl.routing_replay:
        return
    if cfg.model.num_moe_experts is None:
        raise ConfigError("rl.routing_replay: needs a mixture-of-experts model (model.num_moe_experts); a dense "
                          "model has no router whose experts could be recorded; fix: rl.routing_replay: false")
    if cfg.rl.objective == "ntp":
        raise ConfigError("rl.routing_replay: replays the old-log-prob pass's experts in an RL step's training "
                          "forward; rl.objective='ntp' has neither; fix: rl.routing_replay: false")


def validate_rollout(cfg: RunConfig) -> None:
    """The rollout placement, channel and off-policy rules (rollout/placement.py, rollout/prefetch.py)."""
    r = cfg.rollout
    if r.off_policy_steps not in (0, 1):
        raise ConfigError(f"rollout.off_policy_steps: must be 0 or 1, got {r.off_policy_steps}; fix: "
                          "rollout.off_policy_steps: 0 (on-policy) or 1 (one step ahead)")
    if r.engine == "megatron" and cfg.parallel.sequence_parallel and cfg.rl.objective != "ntp":
        raise ConfigError("rollout.engine: the in-process 'megatron' engine decodes one token a step, which "
                          "parallel.sequence_parallel cannot split over TP; fix: rollout.engine: sglang, or "
                          "parallel.sequence_parallel: false")
    if r.engine == "megatron" and r.placement != "colocated":
        raise ConfigError(f"rollout.placement: {r.placement!r} needs rollout.engine='sglang'; the in-process "
                          "megatron engine samples from the trainer's own module, so it is colocated by nature; "
                          "fix: rollout.placement: colocated, or rollout.engine: sglang")
    if r.off_policy_steps and r.placement != "separate":
        raise ConfigError(f"rollout.off_policy_steps: 1 needs rollout.placement='separate', got {r.placement!r} "
                          f"(rollout.engine={r.engine!r}): a colocated engine cannot generate while the trainer "
                          "trains, so rollouts one step ahead would only be staler, never overlapped; fix: "
                          "rollout.off_policy_steps: 0, or rollout.engine: sglang with rollout.placement: separate")
    if r.off_policy_steps and cfg.rl.tis_cap is None and cfg.rl.icepop is None:
        raise ConfigError("rollout.off_policy_steps: 1 trains on rollouts of weights one version older; fix: set "
                          "rl.tis_cap (truncated importance sampling, e.g. 2.0) or rl.icepop to correct for them")
    if r.engine != "sglang":
        if r.sglang.delta_sync:
            raise ConfigError(f"rollout.sglang.delta_sync: sends weight deltas to SGLang servers; rollout.engine="
                              f"{r.engine!r} samples from the trainer's own module (nothing is sent); fix: "
                              "rollout.sglang.delta_sync: false")
        return
    sg = r.sglang
    validate_delta_sync(sg)
    if sg.replicas < 1:
        raise ConfigError(f"rollout.sglang.replicas: must be >= 1, got {sg.replicas}; fix: rollout.sglang.replicas: 1")
    if sg.replicas > 1 and (sg.url or sg.urls):
        raise ConfigError(f"rollout.sglang.replicas: {sg.replicas} servers to start, but rollout.sglang.url/urls "
                          "attach running ones; fix: rollout.sglang.replicas: 1 (or drop url/urls)")
    if sg.request_timeout_s <= 0 or sg.retry_backoff_s < 0:
        raise ConfigError(f"rollout.sglang.request_timeout_s: must be > 0 (got {sg.request_timeout_s}) and "
                          f"retry_backoff_s >= 0 (got {sg.retry_backoff_s}); fix: rollout.sglang.request_timeout_s: "
                          "600, rollout.sglang.retry_backoff_s: 5")
    channels = {"colocated": ("tensor", "disk"), "separate": ("distributed", "disk")}[r.placement]
    if r.sglang.weight_sync not in channels:
        raise ConfigError(f"rollout.sglang.weight_sync: {r.sglang.weight_sync!r} does not fit rollout.placement="
                          f"{r.placement!r}, which takes one of {list(channels)} (tensor: shared memory with a "
                          "colocated server; distributed: a gloo/NCCL group with a server on devices of its own); "
                          f"fix: rollout.sglang.weight_sync: {channels[0]}")
    validate_group_host(sg)


def validate_group_host(sg: SGLangConfig) -> None:
    """The distributed channel's trainer address must be one the attached servers can reach: a loopback group_host
    reaches a server on another host's own loopback."""
    from urllib.parse import urlsplit

    from rntp_megatron.runtime.netif import is_loopback

    remote = [u for u in [sg.url, *sg.urls] if u and not is_loopback(urlsplit(u).hostname or "")]
    if sg.weight_sync == "distributed" and remote and sg.group_host and is_loopback(sg.group_host):
        raise ConfigError(f"rollout.sglang.group_host: {sg.group_host!r} is a loopback address, but the servers at "
                          f"{remote} are on other hosts, where it names their own loopback; fix: the trainer's "
                          "address on the network they share, or leave it unset (MASTER_ADDR / the first Slurm node)")


def validate_delta_sync(sg: SGLangConfig) -> None:
    """rollout.sglang.delta_sync only where a delta can be sent and applied."""
    if not 0.0 <= sg.delta_max_density <= 1.0:
        raise ConfigError(f"rollout.sglang.delta_max_density: a fraction of a tensor's elements in [0, 1], got "
                          f"{sg.delta_max_density}; fix: rollout.sglang.delta_max_density: 0.5")
    if not sg.delta_sync:
        return
    if sg.weight_sync == "tensor":
        raise ConfigError("rollout.sglang.delta_sync: the tensor channel hands the server the trainer's own tensors "
                          "through shared memory or CUDA IPC (no bytes cross a wire or a disk to save); fix: "
                          "rollout.sglang.delta_sync: false, or rollout.sglang.weight_sync: distributed or disk")
    if sg.quantization is not None:
        raise ConfigError(f"rollout.sglang.delta_sync: not built for quantization {sg.quantization!r}: an FP8 push "
                          "re-quantizes every block, and the served classes' FP8 load path (weights and their "
                          "scales, re-processed after loading) is untested without a GPU server; fix: "
                          "rollout.sglang.delta_sync: false, or rollout.sglang.quantization: null")


def template_token_bound(data: DataConfig) -> int:
    """At most how many tokens the prompt template adds around the context, for any tokenizer of this project:
    each of data's tags is one token, any other character at most one token per UTF-8 byte (byte-level BPE and
    byte-fallback vocabularies; the trainer checks the exact count once its tokenizer exists)."""
    text = data.prompt_template.replace("{context}", "")
    tags = sorted((data.think_open, data.think_close, data.answer_open, data.answer_close), key=len, reverse=True)
    count = 0
    for tag in tags:
        count += text.count(tag)
        text = text.replace(tag, "")
    return count + len(text.encode("utf-8"))


def check_prompt_fits(cfg: RunConfig, template_tokens: int, exact: bool) -> None:
    """An RL row is [prompt, generated]: the longest prompt (a site leaves answer_horizon tokens of a
    context_len chunk after it, plus the template) with rollout.max_new_tokens must fit schedule.seq_length + 1."""
    if cfg.rl.objective == "ntp":
        return
    d, s = cfg.data, cfg.schedule
    longest = d.context_len - d.answer_horizon + template_tokens + cfg.rollout.max_new_tokens
    if longest > s.seq_length + 1:
        count = "" if exact else "at most "
        raise ConfigError(
            f"schedule.seq_length: a rollout row of data.context_len={d.context_len} - data.answer_horizon="
            f"{d.answer_horizon} context tokens + {count}{template_tokens} tokens of data.prompt_template + "
            f"rollout.max_new_tokens={cfg.rollout.max_new_tokens} = {longest} does not fit schedule.seq_length + 1 "
            f"= {s.seq_length + 1}: raise schedule.seq_length or lower data.context_len or rollout.max_new_tokens")


def validate_lengths(cfg: RunConfig) -> None:
    """check_prompt_fits with the template counted by its bound (the exact count needs the tokenizer)."""
    check_prompt_fits(cfg, template_token_bound(cfg.data), exact=False)
def reference_path(cfg: RunConfig) -> Optional[str]:
    """The checkpoint of the frozen reference model: rl.reference, else checkpoint.load (None: none)."""
    return cfg.rl.reference or cfg.checkpoint.load


GROUP_CENTRED_ADVANTAGES = ("grpo", "dr_grpo", "rloo")  # A_i depends on r_i - mean of its group only


def baseline_role(cfg: RunConfig) -> str:
    """What the no-thought baseline p_bar is scored for: "gradient" (the reward reads it and a group-centred
    advantage does not cancel it: vrcli's thresholds, reward.shuffle moving rewards across groups, interleaved
    episodes whose baseline prefix holds each member's own earlier thoughts, an advantage that is not
    group-centred), "metric" (it cancels or no reward reads it: only the logged info_gain, every
    reward.info_gain_interval steps) or "none" (no likelihood reward, or an interval of 0)."""
    from rntp_megatron.rewards.registry import get_reward

    if cfg.rl.objective == "ntp":
        return "none"
    try:
        spec = get_reward(cfg.reward.name)
    except ValueError:  # an unknown reward name is reported where the reward is looked up
        return "none"
    if spec.kind != "likelihood":
        return "none"
    cancels = (spec.baseline_shift and not cfg.reward.shuffle and cfg.data.episode_format == "single"
               and cfg.rl.advantage in GROUP_CENTRED_ADVANTAGES)
    if spec.needs_baseline and not cancels:
        return "gradient"
    return "metric" if cfg.reward.info_gain_interval > 0 else "none"


def side_model_needs(cfg: RunConfig) -> dict[str, bool]:
    """Which models beside the policy the run uses (side_models.py builds them): reference (KL, the frozen
    baseline, or the scorer when there is no proxy), proxy, ema (the EMA baseline); frozen_baseline: the reward's
    baseline is the reference; scores: something scores text (site selection, or the `run` reward's surprisal
    weights); surprisal: the latter."""
    from rntp_megatron.rewards.registry import get_reward

    rl, r, d = cfg.rl, cfg.reward, cfg.data
    try:  # a baseline scored for nothing (interval 0 where it cancels) is not built
        baseline = get_reward(r.name).needs_baseline and baseline_role(cfg) != "none"
    except ValueError:  # an unknown reward name is reported where the reward is looked up
        baseline = False
    surprisal = rl.objective != "ntp" and r.name == "run" and r.params.get("weighting") == "surprisal"
    scores = (rl.objective != "ntp" and d.site_selection != "uniform") or surprisal  # ntp trains on whole chunks
    frozen_baseline = baseline and r.baseline == "frozen"
    reference_judge = rl.objective != "ntp" and r.name == "self_judge" and r.params.get("judge_model") == "reference"
    return {"reference": (rl.objective != "ntp" and (rl.kl_coef > 0 or rl.reference is not None))
            or frozen_baseline or (scores and d.proxy.card is None) or reference_judge,
            "proxy": scores and d.proxy.card is not None, "ema": baseline and r.baseline == "ema",
            "frozen_baseline": frozen_baseline, "scores": scores, "surprisal": surprisal}


def validate_side_models(cfg: RunConfig) -> None:
    """The reference, proxy and baseline models: each one the run needs can be built, none is set for nothing."""
    rl, r, proxy, p = cfg.rl, cfg.reward, cfg.data.proxy, cfg.parallel
    if r.info_gain_interval < 0:
        raise ConfigError(f"reward.info_gain_interval: must be >= 0 (0: the baseline is never scored where it "
                          f"cancels), got {r.info_gain_interval}; fix: reward.info_gain_interval: 10")
    if not 0.0 <= r.ema_decay < 1.0:
        raise ConfigError(f"reward.ema_decay: must be in [0, 1) (RLP uses 0.999), got {r.ema_decay}; "
                          "reward.baseline: frozen keeps the baseline fixed")
    if rl.kl_coef < 0:
        raise ConfigError(f"rl.kl_coef: must be >= 0, got {rl.kl_coef}")
    needs = side_model_needs(cfg)
    if needs["reference"] and reference_path(cfg) is None:
        users = [name for name, used in (
            (f"rl.kl_coef={rl.kl_coef}", rl.kl_coef > 0), ("reward.baseline=frozen", needs["frozen_baseline"]),
            (f"data.site_selection={cfg.data.site_selection!r} without data.proxy", needs["scores"]),
            ("reward.params.judge_model=reference", r.name == "self_judge"
             and r.params.get("judge_model") == "reference"))
            if used]
        # A copy of the initial weights would be random for a run from scratch (a meaningless anchor, proxy
        # and baseline) and would have to be checkpointed to keep resumes exact: refuse instead.
        raise ConfigError(f"rl.reference: {', '.join(users)} needs a frozen reference model, and this run has "
                          "none: set checkpoint.load (the run starts from those weights and they are the "
                          "reference) or rl.reference (a complete checkpoint folder, iter_*)")
    if (proxy.card is None) != (proxy.load is None):
        raise ConfigError(f"data.proxy: needs both card and load (a proxy with random weights selects sites at "
                          f"random: use data.site_selection=uniform), got card={proxy.card!r} load={proxy.load!r}")
    if proxy.card is not None and not needs["scores"]:
        raise ConfigError("data.proxy: set, but nothing uses it (data.site_selection is 'uniform' and the reward "
                          "is not `run` with params.weighting=surprisal)")
    if proxy.card is not None:
        card = from_dict(ModelConfig, load_card(proxy.card), "data.proxy.card")
        tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
        if card.num_attention_heads % tp or card.num_query_groups % tp or card.num_layers % pp:
            raise ConfigError(f"data.proxy.card: {proxy.card!r} ({card.num_layers} layers, "
                              f"{card.num_attention_heads} heads, {card.num_query_groups} KV heads) does not split "
                              f"at the trainer's layout TP={tp}, PP={pp}")
