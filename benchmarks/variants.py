"""Variants of the model repository: the committed config.pbtxt files with a few fields edited.

Every variant starts from the committed configuration, read from the files themselves, so a
change to model_repository/ is what the next benchmark measures. The edits are the knobs that
matter on a CPU: dynamic batching removed or present (with a queue delay), the largest batch
Triton may merge, instance count, threads per instance, runtime, precision and ONNX Runtime's
memory arena. Each variant is one folder under build/bench/ served by its own Triton.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from pathlib import Path

from benchmarks.assets import EXPORT_DIR
from common import contract
from testkit.repository import SOURCE_REPOSITORY, copy_layout

MODELS = (contract.ENCODER_MODEL, contract.DECODER_MODEL)


class ConfigEditError(ValueError):
    """config.pbtxt does not have the field a variant edits: the committed layout changed."""


@dataclass(frozen=True)
class ModelConfig:
    """The measured knobs of one model's config.pbtxt."""

    batching: bool
    queue_delay_us: int | None
    instances: int
    threads: int
    runtime: str
    precision: str
    max_work: int | None = None  # max_work_per_run: batch items (or prompts) per runtime call
    max_batch_size: int | None = None  # requests' batch items Triton may merge into one
    memory_arena: str | None = None  # "true": ONNX Runtime keeps its buffers until idle

    def describe(self) -> str:
        batching = f"batching {self.queue_delay_us} us" if self.batching else "no batching"
        if self.batching and self.max_batch_size == 1:
            batching += ", max batch 1"
        return (
            f"{self.runtime} {self.precision}, {self.instances}x{self.threads} threads, {batching}"
        )


_PARAMETER = r'(\{{\s*key:\s*"{key}",\s*value:\s*\{{\s*string_value:\s*)"([^"]*)"'
_INSTANCE_COUNT = r"(instance_group\s*\[\s*\{\s*count:\s*)(\d+)"
_MAX_BATCH_SIZE = r"(?m)(^max_batch_size:\s*)(\d+)"
_QUEUE_DELAY = r"(max_queue_delay_microseconds:\s*)(\d+)"


def _search(pattern: str, text: str, what: str) -> re.Match:
    match = re.search(pattern, text)
    if match is None:
        raise ConfigEditError(f"config.pbtxt has no {what}")
    return match


def _replace(pattern: str, text: str, value: str, what: str) -> str:
    _search(pattern, text, what)
    return re.sub(pattern, lambda m: f"{m.group(1)}{value}", text, count=1)


def block_span(text: str, name: str) -> tuple[int, int] | None:
    """Start and end of a top-level `name { ... }` block, braces matched (comments skipped)."""
    match = re.search(rf"^{name}\s*\{{", text, flags=re.MULTILINE)
    if match is None:
        return None
    depth = 0
    index = match.end() - 1
    while index < len(text):
        char = text[index]
        if char == "#":
            index = text.find("\n", index)
            if index < 0:
                break
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return match.start(), index + 1
        index += 1
    raise ConfigEditError(f"unbalanced braces in the {name} block")


def read_config(text: str) -> ModelConfig:
    """The knobs as the file sets them."""
    span = block_span(text, "dynamic_batching")
    delay = None
    if span is not None:
        found = re.search(_QUEUE_DELAY, text[span[0] : span[1]])
        delay = int(found.group(2)) if found else 0
    return ModelConfig(
        batching=span is not None,
        queue_delay_us=delay,
        instances=int(_search(_INSTANCE_COUNT, text, "instance_group count").group(2)),
        threads=int(_search(_PARAMETER.format(key="intra_op_threads"), text, "threads").group(2)),
        runtime=_search(_PARAMETER.format(key="runtime"), text, "runtime").group(2),
        precision=_search(_PARAMETER.format(key="precision"), text, "precision").group(2),
        max_work=int(work) if (work := _optional_parameter(text, "max_work_per_run")) else None,
        max_batch_size=int(_search(_MAX_BATCH_SIZE, text, "max_batch_size").group(2)),
        memory_arena=_optional_parameter(text, "memory_arena"),
    )


def _optional_parameter(text: str, key: str) -> str | None:
    found = re.search(_PARAMETER.format(key=key), text)
    return found.group(2) if found else None


def apply_config(text: str, config: ModelConfig) -> str:
    """`text` with the knobs set to `config`; everything else (comments too) kept."""
    current = read_config(text)
    if current.batching and not config.batching:
        start, end = block_span(text, "dynamic_batching")
        text = text[:start].rstrip() + "\n" + text[end:]
    elif config.batching and not current.batching:
        raise ConfigEditError("cannot add dynamic batching to a config that has none")
    if config.batching and config.queue_delay_us is not None:
        start, end = block_span(text, "dynamic_batching")
        block = text[start:end]
        if re.search(_QUEUE_DELAY, block):
            block = _replace(_QUEUE_DELAY, block, str(config.queue_delay_us), "queue delay")
        else:
            head, _, tail = block.partition("{")
            delay = config.queue_delay_us
            block = f"{head}{{\n  max_queue_delay_microseconds: {delay}{tail}"
        text = text[:start] + block + text[end:]
    text = _replace(_INSTANCE_COUNT, text, str(config.instances), "instance_group count")
    if config.max_batch_size is not None:
        text = _replace(_MAX_BATCH_SIZE, text, str(config.max_batch_size), "max_batch_size")
    for key, value in (
        ("intra_op_threads", str(config.threads)),
        ("runtime", config.runtime),
        ("precision", config.precision),
    ):
        text = _replace(_PARAMETER.format(key=key), text, f'"{value}"', key)
    for key, value, committed in (
        ("max_work_per_run", config.max_work, current.max_work),
        ("memory_arena", config.memory_arena, current.memory_arena),
    ):
        if value is not None and value != committed:
            text = _replace(_PARAMETER.format(key=key), text, f'"{value}"', key)
    return text


@dataclass(frozen=True)
class Variant:
    """One repository: a name, a one-line description and each model's knobs."""

    name: str
    description: str
    configs: dict[str, ModelConfig]
    source: Path = SOURCE_REPOSITORY  # the layout whose config.pbtxt files are edited
    # Triton's environment on top of ours: PRECISION=bf16 is the fast profile, as deployed.
    environment: dict[str, str] = dataclasses.field(default_factory=dict)

    def with_changes(self, name: str, description: str, **changes) -> Variant:
        """The same variant with the same knob changes applied to every model."""
        configs = {m: dataclasses.replace(c, **changes) for m, c in self.configs.items()}
        return dataclasses.replace(self, name=name, description=description, configs=configs)

    def with_model(self, model: str, name: str, description: str, **changes) -> Variant:
        configs = dict(self.configs)
        configs[model] = dataclasses.replace(configs[model], **changes)
        return dataclasses.replace(self, name=name, description=description, configs=configs)

    def with_environment(self, name: str, description: str, **environment: str) -> Variant:
        return dataclasses.replace(
            self, name=name, description=description, environment=environment
        )

    @property
    def precision(self) -> str:
        """The profile the proxy in front of this variant must be told (its cache key)."""
        return self.environment.get("PRECISION", "fp32")

    def to_json(self) -> dict:
        return {
            "name": self.name,
            "description": self.description,
            "configs": {m: dataclasses.asdict(c) for m, c in self.configs.items()},
            "source": str(self.source),
            "environment": self.environment,
        }


def committed_variant(source: Path = SOURCE_REPOSITORY) -> Variant:
    """The configuration `make run` serves, read from the committed files."""
    configs = {m: read_config((source / m / "config.pbtxt").read_text()) for m in MODELS}
    description = "model_repository/ as committed"
    if source.resolve() != SOURCE_REPOSITORY.resolve():
        description = f"the configs in {source}"
    return Variant("committed", description, configs, source)


def materialize(variant: Variant, root: Path, exported: Path = EXPORT_DIR) -> Path:
    """Write the variant's repository under `root` and return its path."""
    target = copy_layout(root / variant.name, exported, source=variant.source)
    for model, config in variant.configs.items():
        path = target / model / "config.pbtxt"
        path.write_text(apply_config(path.read_text(), config))
    return target
