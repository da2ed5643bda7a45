"""A1111's extra-network tags in prompts: `<lora:NAME:WEIGHT>`, parsed out before the prompt is encoded.

The syntax of A1111's extra_networks.parse_prompt (regex `<(\\w+):([^>]+)>`), its arguments split at ":", an argument
with "=" named, the others positional, as its Lora extension reads them:
    <lora:NAME>                 text encoder and U-Net at 1
    <lora:NAME:W>               both at W
    <lora:NAME:TE:UNET>         the text encoder's layers at TE, the U-Net's at UNET
    <lora:NAME:te=TE:unet=UNET> the same, named (either may be left out: unet defaults to te, te to 1)
`<lyco:...>` (the LyCORIS extension's tag) is read as `<lora:...>`. A1111 removes every tag from the prompt it encodes,
and keeps the prompt as written in the infotext; so does kedavra. A1111 reads the tags of the first prompt of a batch
only (the weights are merged, so one set serves the batch); kedavra refuses a batch whose prompts name different ones.
Negative prompts are encoded as written, as in A1111.

Where this differs from A1111, on purpose: a tag of another network type (`<hypernet:...>`), a dynamic rank
(`dyn=`, 4th positional), or a weight that is not a number is a ValueError naming it; A1111 logs it and goes on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from kedavra.validation import finite_float

TAG = re.compile(r"<(\w+):([^>]+)>")  # A1111 extra_networks.re_extra_net
NETWORK_TYPES = ("lora", "lyco")


@dataclass(frozen=True)
class LoraTag:
    """One `<lora:NAME:...>` tag: the LoRA's name and its text-encoder and U-Net strengths."""

    name: str
    text_encoder_weight: float = 1.0
    unet_weight: float = 1.0

    def __str__(self) -> str:
        weights = (f"{self.text_encoder_weight:g}" if self.text_encoder_weight == self.unet_weight
                   else f"{self.text_encoder_weight:g}:{self.unet_weight:g}")
        return f"<lora:{self.name}:{weights}>"


def _weight(text: str, tag: str) -> float:
    value = finite_float(text)
    if value is None:
        raise ValueError(f"{tag}: the weight {text!r} is not a number (write <lora:NAME:0.8>)")
    return value


def _parse_tag(kind: str, arguments: str, tag: str) -> LoraTag:
    if kind not in NETWORK_TYPES:
        raise ValueError(f"{tag}: kedavra applies the extra networks {', '.join(f'<{k}:...>' for k in NETWORK_TYPES)}"
                         f", not {kind!r}")
    positional, named = [], {}
    for item in arguments.split(":"):
        key, sep, value = item.partition("=")
        if sep:
            named[key.strip()] = value.strip()
        else:
            positional.append(item.strip())
    unknown = sorted(set(named) - {"te", "unet"})
    if unknown or len(positional) > 3:
        what = f"named argument {unknown[0]!r}" if unknown else "a 4th argument (A1111's dynamic rank)"
        raise ValueError(f"{tag}: {what} is not supported; the forms are <lora:NAME>, <lora:NAME:W>, "
                         "<lora:NAME:TE:UNET>, <lora:NAME:te=TE:unet=UNET>")
    if not positional or not positional[0]:
        raise ValueError(f"{tag}: the tag names no LoRA (write <lora:NAME:WEIGHT>)")
    te = _weight(named["te"], tag) if "te" in named else (_weight(positional[1], tag) if len(positional) > 1 else 1.0)
    unet = _weight(named["unet"], tag) if "unet" in named else (
        _weight(positional[2], tag) if len(positional) > 2 else te)
    return LoraTag(positional[0], te, unet)


def split_lora_tags(prompt: str) -> tuple[str, tuple[LoraTag, ...]]:
    """(the prompt with its tags removed, the tags in order). A prompt without tags comes back unchanged."""
    tags = tuple(_parse_tag(m.group(1), m.group(2), m.group(0)) for m in TAG.finditer(prompt))
    return (TAG.sub("", prompt) if tags else prompt), tags


def batch_lora_tags(prompts: tuple[str, ...]) -> tuple[tuple[str, ...], tuple[LoraTag, ...]]:
    """The prompts of one batch without their tags, and the one set of tags they share (module docstring)."""
    split = [split_lora_tags(prompt) for prompt in prompts]
    tags = split[0][1]
    for i, (_, other) in enumerate(split[1:], start=1):
        if other != tags:
            raise ValueError(f"prompt {i} of the batch names the LoRAs {', '.join(map(str, other)) or 'none'} and "
                             f"prompt 0 {', '.join(map(str, tags)) or 'none'}; LoRAs are merged into the weights, so "
                             "one batch uses one set: generate them separately")
    return tuple(text for text, _ in split), tags
