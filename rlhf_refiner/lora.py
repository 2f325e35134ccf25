"""LoRA on the learner's policy (peft): only the adapter trains, and π0 is the same base with the adapter off.

What leaves the learner each step (`model.lora.sync`) is the adapter alone, under peft's saved names, which the
generator's vLLM engine serves on its base (`adapter_sources`); or every adapted linear layer's weight merged with
its adapter (W + (alpha / r)·B·A) under the base model's own names, as any checkpoint of the base architecture
(`sync_sources`). `final/` is always merged, and `final/adapter/` holds the adapter in peft's format.
Nothing here knows DeepSpeed: the learner gathers (ZeRO-3) the parameters a `SyncSource` names before reading it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from rlhf_refiner.config import ConfigError, LoraConfig

ADAPTER = "default"  # peft's name of the one adapter we train
PEFT_PREFIX = "base_model.model."  # what peft puts before the wrapped model's parameter names


def linear_layer_names(model: torch.nn.Module) -> set[str]:
    """The last name component of every linear layer: what `target_modules` may name."""
    return {name.rsplit(".", 1)[-1] for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)}


def check_targets(model: torch.nn.Module, lora: LoraConfig, model_path: str) -> None:
    """Every target module must be a linear layer of the model (peft's own error names no field), and not a head
    tied to the input embeddings: their one tensor cannot hold the head's adapter merged (peft only warns)."""
    layers = linear_layer_names(model)
    missing = sorted(set(lora.target_modules) - layers)
    if missing:
        raise ConfigError(
            f"model.lora.target_modules: {missing} are not linear layers of {model_path} (it has: {sorted(layers)})"
        )
    head, embeddings = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight is embeddings.weight:
        name = next(name for name, module in model.named_modules() if module is head).rsplit(".", 1)[-1]
        if name in lora.target_modules:
            raise ConfigError(
                f"model.lora.target_modules: '{name}' is tied to the input embeddings in {model_path}; a tied "
                "checkpoint has no tensor of its own for the head's merged adapter: leave it out"
            )


def check_model(model_path: str, lora: LoraConfig) -> None:
    """`check_targets` before any actor starts: the architecture built on the meta device, without its weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_path))
    check_targets(model, lora, model_path)


def peft_config(lora: LoraConfig) -> Any:
    """`model.lora` as peft's `LoraConfig` (also what TRL's trainers take as `peft_config`)."""
    import peft

    return peft.LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=list(lora.target_modules),
        task_type="CAUSAL_LM",
    )


def with_lora(model: torch.nn.Module, lora: LoraConfig, model_path: str) -> torch.nn.Module:
    """`model` wrapped by peft with a fresh adapter (B = 0: the policy starts as π0); only the adapter trains."""
    import peft

    check_targets(model, lora, model_path)
    return peft.get_peft_model(model, peft_config(lora))


@dataclass(frozen=True)
class SyncSource:
    """One HF parameter as the learner holds it: `base` (the learner's parameter name), and for an adapted
    linear layer's weight the peft layer whose adapter merges into it. `parts`: what to gather to read it."""

    base: str
    layer: Any = None  # a peft LoRA layer, or None for a parameter without an adapter
    parts: tuple[str, ...] = ()

    def tensor(self, params: dict[str, torch.nn.Parameter]) -> torch.Tensor:
        weight = params[self.base].data
        if self.layer is None:
            return weight
        return weight + self.layer.get_delta_weight(ADAPTER).to(weight.dtype)  # (alpha / r)·B·A, W's layout


def sync_sources(model: torch.nn.Module) -> dict[str, SyncSource]:
    """HF name -> `SyncSource` of every parameter the policy is made of, in the model's parameter order. Without
    LoRA each is itself; with it, the adapters' own parameters are folded into their layers' weights."""
    params = dict(model.named_parameters())
    if not any(".lora_" in name for name in params):
        return {name: SyncSource(name, parts=(name,)) for name in params}
    modules = dict(model.named_modules())
    sources = {}
    for name in params:
        if ".lora_" in name:
            continue
        hf_name = name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")
        owner, _, leaf = name.rpartition(".")
        layer = modules[owner.removesuffix(".base_layer")] if owner.endswith(".base_layer") else None
        if layer is None or leaf != "weight":  # an adapted layer's bias stays as it is
            sources[hf_name] = SyncSource(name, parts=(name,))
            continue
        adapter = [f"{owner.removesuffix('.base_layer')}.lora_{ab}.{ADAPTER}.weight" for ab in "AB"]
        sources[hf_name] = SyncSource(name, layer, (name, *adapter))
    return sources


def adapter_sources(model: torch.nn.Module) -> dict[str, SyncSource]:
    """The adapter's parameters under the names peft saves them with (`...q_proj.lora_A.weight`: the adapter's
    own name dropped), which vLLM's LoRA loader reads, in the model's parameter order."""

    def saved(name: str) -> str:  # peft's `get_peft_model_state_dict`: only the adapter's own segment goes
        return name.replace(f".lora_A.{ADAPTER}.", ".lora_A.").replace(f".lora_B.{ADAPTER}.", ".lora_B.")

    return {saved(name): SyncSource(name, parts=(name,)) for name in adapter_names(model)}


def vllm_adapter_config(lora: LoraConfig) -> dict[str, Any]:
    """The adapter's peft config as vLLM's `PEFTHelper` reads it (`adapter_config.json`'s fields it needs)."""
    return {"r": lora.rank, "lora_alpha": lora.alpha, "target_modules": list(lora.target_modules)}


def adapter_names(model: torch.nn.Module) -> list[str]:
    """The adapter's parameters (peft names): what trains, what `final/adapter/` holds."""
    return [name for name, _ in model.named_parameters() if ".lora_" in name]


class AdapterOff:
    """π0 as the policy's own base with the adapter off, for the KL and its metric: no second copy of the model
    on any rank. Called like the model; the base's dropout (if any) follows the policy's train mode."""

    def __init__(self, engine: Any) -> None:
        self.engine = engine

    @property
    def config(self) -> Any:
        return self.engine.module.config

    def __call__(self, **inputs: Any) -> Any:
        with self.engine.module.disable_adapter():
            return self.engine(**inputs)
