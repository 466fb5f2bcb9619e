"""Configuration: one frozen dataclass per stage and a RunConfig that holds them. Everything is
validated here, before any model is loaded. Reading a recipe (YAML, task defaults, dotted overrides,
type coercion) is :mod:`infalign.run.recipe`; every key's help text is :mod:`infalign.run.schema`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "SAMPLING_BACKENDS",
    "EvaluateConfig",
    "MethodConfig",
    "ModelConfig",
    "PromptSetConfig",
    "PromptsConfig",
    "RLConfig",
    "ReferenceConfig",
    "ReportConfig",
    "RewardConfig",
    "RunConfig",
    "SamplingConfig",
    "to_dict",
]


def _fail(path: str, value: Any, why: str) -> None:
    raise ValueError(f"config {path}={value!r}: {why}")


@dataclass(frozen=True)
class ModelConfig:
    """A causal LM (policy or reference) by hub name or local directory (safetensors)."""

    name: str = ""
    tokenizer: str | None = None  # defaults to name
    gguf_file: str | None = None  # load from a GGUF file inside `name` (transformers + gguf)
    dtype: str = "float32"  # float32 | bfloat16 | float16 | auto
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    trust_remote_code: bool = False
    lora_r: int = 0  # 0: full fine-tuning; > 0: LoRA through peft
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_target_modules: tuple[str, ...] = ()  # empty: peft's default for the architecture

    def validate(self, path: str = "model") -> None:
        if not self.name:
            _fail(f"{path}.name", self.name, "a hub name or a local path is required")
        if self.dtype not in ("float32", "bfloat16", "float16", "auto"):
            _fail(f"{path}.dtype", self.dtype, "expected float32, bfloat16, float16 or auto")
        if self.lora_r < 0:
            _fail(f"{path}.lora_r", self.lora_r, "must be >= 0")


@dataclass(frozen=True)
class PromptSetConfig:
    """One prompt set: a .jsonl file, ``hf:NAME`` (Hugging Face datasets) or a local dataset dir."""

    source: str = ""
    split: str = "train"
    column: str = "prompt"
    format: str = "plain"  # plain | hh (Anthropic HH: dialogue up to the final "Assistant:")
    limit: int | None = None
    chat_template: bool = False  # wrap each prompt with the tokenizer's chat template
    max_prompt_tokens: int | None = None
    truncate: bool = False  # truncate (from the left) instead of failing on a too-long prompt

    def validate(self, path: str) -> None:
        if not self.source:
            _fail(f"{path}.source", self.source, "a .jsonl path or hf:NAME is required")
        if self.format not in ("plain", "hh"):
            _fail(f"{path}.format", self.format, "expected plain or hh")
        if self.limit is not None and self.limit < 1:
            _fail(f"{path}.limit", self.limit, "must be >= 1 or null")


@dataclass(frozen=True)
class PromptsConfig:
    train: PromptSetConfig = field(default_factory=PromptSetConfig)
    test: PromptSetConfig = field(default_factory=PromptSetConfig)

    def validate(self, path: str = "prompts") -> None:
        self.train.validate(f"{path}.train")
        self.test.validate(f"{path}.test")


SAMPLING_BACKENDS = ("hf", "native", "vllm")


@dataclass(frozen=True)
class SamplingConfig:
    """Shared by reference sampling, policy rollouts and evaluation, so all three see one policy."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k truncation
    max_new_tokens: int = 32
    batch_size: int = 64  # sequences per generate call
    backend: str = "hf"  # hf | native | vllm: the Sampler (infalign.lm.sampling)

    def validate(self, path: str = "sampling") -> None:
        if self.backend not in SAMPLING_BACKENDS:
            _fail(
                f"{path}.backend", self.backend, f"expected one of {' | '.join(SAMPLING_BACKENDS)}"
            )
        if not self.temperature > 0:
            _fail(f"{path}.temperature", self.temperature, "must be > 0")
        if not 0 < self.top_p <= 1:
            _fail(f"{path}.top_p", self.top_p, "must be in (0, 1]")
        if self.top_k < 0:
            _fail(f"{path}.top_k", self.top_k, "must be >= 0 (0: no top-k)")
        if self.max_new_tokens < 1:
            _fail(f"{path}.max_new_tokens", self.max_new_tokens, "must be >= 1")
        if self.batch_size < 1:
            _fail(f"{path}.batch_size", self.batch_size, "must be >= 1")


@dataclass(frozen=True)
class RewardConfig:
    """``kind: hf`` (a sequence-classification reward model) or ``kind: callable`` (module:function)."""

    kind: str = "callable"
    name: str = ""
    batch_size: int = 64
    max_length: int = 512
    device: str = "auto"
    label_index: int = 0  # which logit is the reward for an hf model with several labels
    dtype: str = "float32"  # hf reward model weights: float32 | bfloat16 | float16 | auto
    pair: bool = False  # hf: tokenize (prompt, completion) as a text pair instead of concatenating

    def validate(self, path: str = "reward") -> None:
        if self.kind not in ("hf", "callable"):
            _fail(f"{path}.kind", self.kind, "expected hf or callable")
        if not self.name:
            _fail(f"{path}.name", self.name, "a reward model path or module:function is required")
        if self.kind == "callable" and ":" not in self.name:
            _fail(f"{path}.name", self.name, "a callable reward is given as module:function")
        if self.dtype not in ("float32", "bfloat16", "float16", "auto"):
            _fail(f"{path}.dtype", self.dtype, "expected float32, bfloat16, float16 or auto")
        if self.batch_size < 1:
            _fail(f"{path}.batch_size", self.batch_size, "must be >= 1")


@dataclass(frozen=True)
class ReferenceConfig:
    """K reference samples per prompt, scored once and cached."""

    num_samples: int = 64  # K
    smoothed: bool = False  # mid-rank calibration (never exactly 0 or 1)

    def validate(self, path: str = "reference") -> None:
        if self.num_samples < 2:
            _fail(f"{path}.num_samples", self.num_samples, "calibration needs K >= 2")


@dataclass(frozen=True)
class RLConfig:
    """CTRL trainer: ``algorithm: rloo`` (spec section 6: on-policy RLOO with the sequence KL inside
    the reward, fixed beta) or ``algorithm: regression`` (spec section 6b: the sequence log-ratio
    regressed on the exact optimum's over the cached reference samples; no generation)."""

    algorithm: str = "rloo"  # rloo | regression
    # a transform spec, exp:auto / negexp:auto / optimal (optionally @KL: exp:auto@0.3), or "raw"
    transform: str = "identity"
    beta: float = 0.1
    steps: int = 100
    prompts_per_step: int = 8
    samples_per_prompt: int = 4  # M
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    max_grad_norm: float = 1.0
    # regression only: per prompt and step, this many samples of the current policy are added to
    # the reference samples (scored, calibrated against the K reference rewards, log pi_ref from the
    # reference model): the target is then also imposed where the policy puts its mass. 0: offline.
    onpolicy_samples: int = 0
    ppo_epochs: int = 1
    clip_eps: float = 0.2
    normalize_std: bool = False  # divide advantages by the per-prompt std (changes the objective)
    grad_accum: int = 1
    bf16: bool = False
    save_every: int = 50
    seed: int = 0
    # adapt beta toward this mean sequence KL (nats) per step: beta *= 1 + clip(KL/target - 1,
    # -0.2, 0.2) / kl_horizon. None (default): fixed beta, the exact objective of spec section 6.
    kl_target: float | None = None
    kl_horizon: int = 20
    # KL budget (nats) at which exp:auto / negexp:auto / optimal are resolved into a fixed transform
    # (infalign.theory.resolve_transform, for the deployed procedure ``report.procedure``)
    target_kl: float = 0.5

    def validate(self, path: str = "rl") -> None:
        from infalign.rl.algorithms import names as algorithms

        if self.algorithm not in algorithms():
            _fail(f"{path}.algorithm", self.algorithm, f"expected one of {', '.join(algorithms())}")
        if not self.beta > 0:
            _fail(f"{path}.beta", self.beta, "must be > 0")
        if not 0 < self.target_kl <= 12:
            _fail(f"{path}.target_kl", self.target_kl, "must be in (0, 12] nats")
        if self.steps < 1:
            _fail(
                f"{path}.steps", self.steps, "must be >= 1 (a policy trained for 0 steps is pi_ref)"
            )
        if self.samples_per_prompt < (2 if self.algorithm == "rloo" else 1):
            _fail(f"{path}.samples_per_prompt", self.samples_per_prompt, "RLOO needs M >= 2")
        for name in ("prompts_per_step", "ppo_epochs", "grad_accum", "save_every"):
            if getattr(self, name) < 1:
                _fail(f"{path}.{name}", getattr(self, name), "must be >= 1")
        if not self.lr > 0:
            _fail(f"{path}.lr", self.lr, "must be > 0")
        if not self.weight_decay >= 0:
            _fail(f"{path}.weight_decay", self.weight_decay, "must be >= 0")
        if not self.max_grad_norm > 0:
            _fail(f"{path}.max_grad_norm", self.max_grad_norm, "must be > 0")
        if self.kl_target is not None:
            if not self.kl_target > 0:
                _fail(f"{path}.kl_target", self.kl_target, "must be > 0 nats or null")
            if self.algorithm != "rloo":
                _fail(
                    f"{path}.kl_target",
                    self.kl_target,
                    "the KL controller is for rl.algorithm=rloo (regression's target is the optimum "
                    "at a fixed beta)",
                )
        if self.onpolicy_samples < 0:
            _fail(f"{path}.onpolicy_samples", self.onpolicy_samples, "must be >= 0")
        if self.onpolicy_samples > 0 and self.algorithm != "regression":
            _fail(
                f"{path}.onpolicy_samples",
                self.onpolicy_samples,
                "on-policy refresh is a rl.algorithm=regression option (rloo is on-policy already)",
            )
        if self.kl_horizon < 1:
            _fail(f"{path}.kl_horizon", self.kl_horizon, "must be >= 1")
        if not 0 < self.clip_eps < 1:
            _fail(f"{path}.clip_eps", self.clip_eps, "must be in (0, 1)")


_METHOD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]*")


@dataclass(frozen=True)
class MethodConfig:
    """One method of a sweep: a name, the reward (transform spec or "raw") and the betas to train."""

    name: str = ""
    transform: str = "identity"
    betas: tuple[float, ...] = (0.1,)

    def validate(self, path: str) -> None:
        if not self.name:
            _fail(f"{path}.name", self.name, "every method needs a name")
        if not _METHOD_NAME.fullmatch(self.name) or self.name == "reference":
            _fail(
                f"{path}.name",
                self.name,
                "a method name is a directory name: letters, digits, '.', '_', '+', '-' "
                "(not starting with '.' or '-'), and not 'reference' (the baseline's name)",
            )
        if not self.betas or any(not b > 0 for b in self.betas):
            _fail(f"{path}.betas", self.betas, "a non-empty list of betas > 0")


@dataclass(frozen=True)
class EvaluateConfig:
    procedures: tuple[str, ...] = ("sample", "bon:4")
    samples_per_prompt: int = 16  # M policy samples per test prompt (all-subsets estimator)
    reference_samples: int = 16  # M' reference samples per test prompt
    bootstrap: int = 1000
    confidence: float = 0.95
    seed: int = 0
    per_prompt: bool = False  # also write the per-prompt win-rate estimates into eval.json

    def validate(self, path: str = "evaluate") -> None:
        if not 0 < self.confidence < 1:
            _fail(f"{path}.confidence", self.confidence, "must be in (0, 1)")
        if self.bootstrap < 1:
            _fail(f"{path}.bootstrap", self.bootstrap, "must be >= 1")


@dataclass(frozen=True)
class ReportConfig:
    procedure: str = "bon:4"  # the procedure the report's headline plot is drawn for
    title: str = "infalign report"


@dataclass(frozen=True)
class RunConfig:
    """A whole experiment: reference -> train (each method x beta) -> evaluate -> report."""

    out: str = "runs/default"
    seed: int = 0
    task: str | None = (
        None  # a shipped task (infalign.lm.tasks.TASKS): fills reward, prompts, procedure
    )
    tracking: tuple[str, ...] = ()  # experiment trackers (infalign.run.tracking.TRACKERS)
    model: ModelConfig = field(default_factory=ModelConfig)
    reference_model: ModelConfig | None = None  # defaults to `model`
    reward: RewardConfig = field(default_factory=RewardConfig)
    prompts: PromptsConfig = field(default_factory=PromptsConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    rl: RLConfig = field(default_factory=RLConfig)
    methods: tuple[MethodConfig, ...] = ()
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def validate(self) -> RunConfig:
        """Check every section (and the transform / procedure strings); returns self."""
        from infalign.core.procedures import parse_procedure
        from infalign.run.tracking import check_trackers

        if not str(self.out).strip():
            _fail("out", self.out, "the run directory must be a non-empty path")
        check_trackers(self.tracking, "tracking")
        self.model.validate("model")
        if self.reference_model is not None:
            self.reference_model.validate("reference_model")
        self.reward.validate("reward")
        self.prompts.validate("prompts")
        self.sampling.validate("sampling")
        self.reference.validate("reference")
        self.rl.validate("rl")
        self.evaluate.validate("evaluate")
        for i, m in enumerate(self.methods):
            m.validate(f"methods[{i}]")
            _check_transform_spec(f"methods[{i}].transform", m.transform)
        names = [m.name for m in self.methods]
        if len(set(names)) != len(names):
            _fail("methods", names, "method names must be unique")
        _check_transform_spec("rl.transform", self.rl.transform)
        for i, p in enumerate(self.evaluate.procedures):
            try:
                proc = parse_procedure(p)
            except ValueError as err:
                _fail(f"evaluate.procedures[{i}]", p, str(err))
            if (
                self.evaluate.samples_per_prompt < proc.n
                or self.evaluate.reference_samples < proc.n
            ):
                _fail(
                    "evaluate.samples_per_prompt",
                    self.evaluate.samples_per_prompt,
                    f"the all-subsets estimator for {p} needs M >= N={proc.n} on both sides",
                )
        try:
            parse_procedure(self.report.procedure)
        except ValueError as err:
            _fail("report.procedure", self.report.procedure, str(err))
        return self

    @property
    def reference_model_or_policy(self) -> ModelConfig:
        return self.reference_model if self.reference_model is not None else self.model


def _check_transform_spec(path: str, spec: str) -> None:
    from infalign.core.transforms import is_raw, parse_transform
    from infalign.theory import needs_theory, split_target

    try:
        split_target(spec)  # a malformed @KL pin is an error
        if is_raw(spec) or needs_theory(spec):
            return
        parse_transform(spec)
    except ValueError as err:
        _fail(path, spec, str(err))


# --- dict <-> dataclass (reading recipes: infalign.run.recipe) ------------------------------------


def to_dict(cfg: Any) -> Any:
    """A dataclass tree as plain dicts/lists (tuples become lists) for YAML/JSON."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(x) for x in cfg]
    return cfg
