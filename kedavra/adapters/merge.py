"""Merging LoRAs into a model's weights, and restoring the weights exactly.

A `LoraMerger` keeps every adapted layer of one model equal to its original weight plus the current stack of LoRAs,
each at its own strengths (A1111's text-encoder and U-Net multipliers): W = W₀ + Σ s_i ΔW_i, computed in float32
from the original W₀ and rounded once to the model's dtype (DoRA updates are applied in the stack's order, since
their decomposition is not additive). The merged weights run at the plain model's speed: nothing is added to the
forward pass. The originals are kept aside (A1111 keeps the same backups), so changing or emptying the stack puts
back the very tensors that were there: bitwise, whatever rounding a merge did. Packed CPU weights
(kedavra.networks.acceleration) of every changed layer are dropped, so the next call repacks the merged ones.

Memory: the kept originals cost one copy of each layer a LoRA touches, in the model's dtype (for an attention-only
SD 1.5 LoRA about 100 MB in bf16; for a LoRA on every SDXL layer, the U-Net's size again).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kedavra.adapters.lora_file import LoraFile, LoraFileError
from kedavra.adapters.lora_math import LayerUpdate, merged_weight
from kedavra.adapters.lora_targets import adapted_layers, target_table
from kedavra.networks.model import StableDiffusion
from kedavra.validation import check_number, some

# The cross-attention input width of each family, read off a LoRA's attn2.to_k factor to name its architecture.
_CONTEXT_WIDTHS = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL", 1280: "the SDXL refiner"}


@dataclass(frozen=True, eq=False)
class LoraUse:
    """One LoRA at its strengths: `text_encoder_weight` for the text encoders' layers, `unet_weight` for the
    U-Net's (A1111's `<lora:NAME:TE:UNET>`)."""

    lora: LoraFile
    text_encoder_weight: float = 1.0
    unet_weight: float = 1.0

    def __post_init__(self):
        check_number("LoRA text encoder weight", self.text_encoder_weight)
        check_number("LoRA U-Net weight", self.unet_weight)

    def strength(self, path: str) -> float:
        return self.unet_weight if path.startswith("unet.") else self.text_encoder_weight


def lora_architecture(lora: LoraFile) -> str | None:
    """The family a LoRA was trained for, where its shapes or names tell: the cross-attention width its attn2.to_k
    factor takes (768 SD 1.x, 1024 SD 2.x, 2048 SDXL, 1280 the SDXL refiner), else a second text encoder's names
    (lora_te2_, text_encoder_2.: SDXL). lora_te1_ alone says nothing: diffusers writes it for SD 1.x too."""
    for name, update in lora.updates.items():
        if "attn2" in name and "to_k" in name:
            first = next(iter(update.tensors.values()))
            factor = update.tensors.get("lora_down.weight", update.tensors.get("hada_w1_b", first))
            if factor.shape[-1] in _CONTEXT_WIDTHS:
                return _CONTEXT_WIDTHS[factor.shape[-1]]
    if any(name.startswith(("lora_te2_", "text_encoder_2.")) for name in lora.updates):
        return "SDXL"
    return None


class LoraMerger:
    """The LoRA state of one model (module docstring). `resolve` matches a file's layers to the model's; `apply`
    makes the weights equal the original plus a stack of `LoraUse`s; `apply([])` restores them."""

    def __init__(self, model: StableDiffusion):
        self.model = model
        self._table = target_table(model)
        self._layers = adapted_layers(model)
        self._originals: dict[str, tuple[Tensor, Tensor | None]] = {}  # path -> (weight, bias) before any merge
        self._applied: tuple = ()
        # file -> (its updates by model path, its unmatched names); dropped with the file, so a server that reads
        # changed files again does not keep the old ones' tensors
        self._resolved: weakref.WeakKeyDictionary[LoraFile, tuple[dict[str, LayerUpdate], tuple[str, ...]]] = (
            weakref.WeakKeyDictionary())

    @property
    def merged_layers(self) -> int:
        return len(self._originals)

    def resolve(self, lora: LoraFile, strict: bool = True) -> tuple[dict[str, LayerUpdate], tuple[str, ...]]:
        """(model path -> update, the file's layer names that match no layer). Unmatched names are a LoraFileError
        listing them unless `strict` is False; a file matching no layer at all is always one, naming the
        architecture the file was made for where it can be told."""
        cached = self._resolved.get(lora)
        if cached is None:
            updates, unmatched = {}, []
            for name, update in lora.updates.items():
                path = self._table.get(name)
                if path is None:
                    unmatched.append(name)
                elif path in updates:
                    raise LoraFileError(f"{lora.path}: two layer names of the file both name {path}")
                else:
                    updates[path] = update
            cached = self._resolved[lora] = (updates, tuple(sorted(unmatched)))
        updates, unmatched = cached
        family = self.model.config.family
        made_for = lora_architecture(lora) if not updates or (unmatched and strict) else None
        for_what = f" (a LoRA for {made_for})" if made_for else ""
        if not updates:
            raise LoraFileError(f"LoRA {lora.name!r}{for_what} matches no layer of this {family} model; its layers "
                                f"are named like {some(list(lora.updates), 3)}")
        if unmatched and strict:
            if made_for == _CONTEXT_WIDTHS.get(self.model.config.unet.context_dim):
                for_what = ""  # made for this family: the names are the problem, not the architecture
            raise LoraFileError(f"LoRA {lora.name!r}{for_what}: {len(unmatched)} of its {len(lora.updates)} layers "
                                f"match no layer of this {family} model: {some(list(unmatched))}. Load it with "
                                "strict=False (--lora-nonstrict) to apply the rest and skip these")
        return updates, unmatched

    @torch.no_grad()
    def apply(self, uses: Sequence[LoraUse], strict: bool = True) -> None:
        """Set every adapted layer to its original weight plus `uses` (in order). Every new weight is computed before
        any is assigned, so an error (a LoRA of the wrong shapes) leaves the model as it was."""
        key = tuple((id(use.lora), use.text_encoder_weight, use.unet_weight) for use in uses)
        if key == self._applied:
            return
        stacks: dict[str, list[tuple[LayerUpdate, float, LoraFile]]] = {}
        for use in uses:
            updates, _ = self.resolve(use.lora, strict)
            for path, update in updates.items():
                stacks.setdefault(path, []).append((update, use.strength(path), use.lora))
        merged = {path: self._merge(path, stack) for path, stack in stacks.items()}
        for path in list(self._originals):
            if path not in merged:
                self._assign(path, *self._originals.pop(path))
        for path, (weight, bias) in merged.items():
            module = self._layers[path]
            if path not in self._originals:
                self._originals[path] = (module.weight.data, None if module.bias is None else module.bias.data)
            self._assign(path, weight, bias if bias is not None else self._originals[path][1])
        self._applied = key

    def _merge(self, path: str, stack: list[tuple[LayerUpdate, float, LoraFile]]) -> tuple[Tensor, Tensor | None]:
        """The new (weight, bias) of one layer, bias None where no update changes it."""
        module = self._layers[path]
        original, original_bias = self._originals.get(path, (module.weight.data, getattr(module.bias, "data", None)))
        weight, bias = original.float(), None
        for update, strength, lora in stack:
            try:
                weight = merged_weight(weight, update, strength)
            except ValueError as error:
                made_for = lora_architecture(lora)
                for_what = f" (made for {made_for})" if made_for else ""
                raise LoraFileError(f"LoRA {lora.name!r}{for_what} does not fit this {self.model.config.family} "
                                    f"model at {path}: {error}") from None
            bias_delta = update.bias_delta(weight.device)
            if bias_delta is not None:
                if original_bias is None or bias_delta.shape != original_bias.shape:
                    raise LoraFileError(f"LoRA {lora.name!r} changes the bias of {path} with shape "
                                        f"{tuple(bias_delta.shape)}; the layer's bias is "
                                        f"{None if original_bias is None else tuple(original_bias.shape)}")
                bias = (original_bias.float() if bias is None else bias) + strength * bias_delta
        new_weight = torch.empty_like(original).copy_(weight)  # the original's dtype and memory format
        return new_weight, None if bias is None else torch.empty_like(original_bias).copy_(bias)

    def _assign(self, path: str, weight: Tensor, bias: Tensor | None) -> None:
        module: nn.Module = self._layers[path]
        module.weight.data = weight
        if bias is not None:
            module.bias.data = bias
        release = getattr(module, "release", None)  # packed CPU weights (acceleration._PackedLayer)
        if release is not None:
            release()
