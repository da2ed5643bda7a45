"""The weight update ΔW of each adapter type, and how one is merged into a layer's weight.

Every type stores a low-rank or structured factorisation of ΔW for one Linear or Conv2d layer; merging computes
ΔW once and adds it, so a merged model runs at the speed of the plain one. With a user's strength s:

  LoRA (Hu et al. 2021, eq. 3)           ΔW = (α / r) · B A, B (out, r) = lora_up, A (r, in·kh·kw) = lora_down;
                                         r = A's rows, α the file's `alpha` (absent: α = r, scale 1). A conv A
                                         (r, in, kh, kw) with B (out, r, 1, 1) is LoCon; with `lora_mid` (r, r, kh,
                                         kw) between them, the CP / Tucker form of LyCORIS:
                                         ΔW[o, i, k, l] = Σ_nm B[o, n] mid[n, m, k, l] A[m, i].
  LoHa (LyCORIS; Yeh et al. 2024,        ΔW = (α / r) · (W1a W1b) ⊙ (W2a W2b), the Hadamard product of two
        "Navigating Text-To-Image         rank-r products (r = W1b's rows); with hada_t1 / hada_t2 each factor is
        Customization: From LyCORIS       rebuilt in CP form from its core t (r, r, kh, kw).
        Fine-Tuning to Model Evaluation")
  LoKr (LyCORIS, ibid.)                  ΔW = scale · W1 ⊗ W2 (Kronecker product), W1 and W2 each stored whole
                                         (lokr_w1) or as a product (lokr_w1_a @ lokr_w1_b; W2 also in CP form with
                                         lokr_t2); scale = α / r with r the rank of the decomposed factor, 1 when
                                         both are whole or α is absent (A1111's network_lokr, ComfyUI).
  full (LyCORIS "full" / "diff")         ΔW = diff, Δb = diff_b, stored as is.
  DoRA (Liu et al. 2024, eq. 5)          with a magnitude m (`dora_scale`, PEFT's `lora_magnitude_vector`) the
                                         merged weight is W' = m · (W + ΔW) / ‖W + ΔW‖, the norm's axis told by
                                         m's shape, as LyCORIS writes it and ComfyUI reads it: per output row for
                                         (out, 1[, 1, 1]) (LyCORIS wd_on_out) and 1-D (out,) (PEFT's; lora_file
                                         flattens its (1, out, 1, 1) of convolutions); per input column for
                                         (1, in[, 1, 1]) (LyCORIS' default; A1111 always norms so), a square
                                         layer's (1, C, 1, 1) included; per output row where only that fits (a
                                         (1, out, 1, 1), out ≠ in, copied from PEFT by diffusers'
                                         convert_state_dict_to_kohya). ComfyUI's per-output branch divides by ‖W‖
                                         instead of ‖W + ΔW‖; kedavra follows the paper, PEFT and LyCORIS.

A strength s scales what the adapter changes: W + s ΔW, and for DoRA W + s (W' - W) (A1111 and ComfyUI both scale
the decomposed update). Arithmetic is in float32 whatever the model's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

# What each adapter type stores for one layer (kohya / LyCORIS suffixes; PEFT's names are renamed to these on reading).
TENSOR_NAMES = {
    "lora": ("lora_down.weight", "lora_up.weight", "lora_mid.weight"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2"),
    "full": ("diff", "diff_b"),
}
SHARED_NAMES = ("alpha", "dora_scale")  # any type may carry these
KINDS = tuple(TENSOR_NAMES)


@dataclass(frozen=True, eq=False)
class LayerUpdate:
    """One layer's stored update: its type (`KINDS`), its tensors by kohya / LyCORIS name, and α (None: absent)."""

    kind: str
    tensors: dict[str, Tensor]
    alpha: float | None = None

    @property
    def dora_scale(self) -> Tensor | None:
        return self.tensors.get("dora_scale")

    @property
    def rank(self) -> int | None:
        """r of the α / r scale (None where the type has no rank, or none was decomposed)."""
        t = self.tensors
        if self.kind == "lora":
            return t["lora_down.weight"].shape[0]
        if self.kind == "loha":
            return t["hada_w1_b"].shape[0]
        if self.kind == "lokr":
            if "lokr_w1_b" in t:
                return t["lokr_w1_b"].shape[0]
            if "lokr_w2_b" in t:
                return t["lokr_w2_b"].shape[0]
        return None

    @property
    def scale(self) -> float:
        """α / r, or 1 where either is absent (kohya's and LyCORIS' convention)."""
        rank = self.rank
        return 1.0 if self.alpha is None or rank is None else self.alpha / rank

    def delta(self, shape: torch.Size, device: torch.device | str = "cpu") -> Tensor:
        """ΔW (α / r included) as a float32 tensor of the layer's weight `shape` on `device`; a ValueError if the
        stored factors do not make that shape (an adapter for another architecture)."""
        t = {name: tensor.to(device=device, dtype=torch.float32) for name, tensor in self.tensors.items()}
        if self.kind == "lora":
            up, down = t["lora_up.weight"].flatten(1), t["lora_down.weight"].flatten(1)  # (out, r), (r, in·kh·kw)
            if "lora_mid.weight" in t:
                # LyCORIS CP form: Σ_nm up[o, n] mid[n, m, k, l] down[m, i] -> (out, in, kh, kw)
                delta = torch.einsum("nmkl,on,mi->oikl", t["lora_mid.weight"], up, down)
            else:
                delta = up @ down  # Hu et al. 2021, eq. 3: B A
        elif self.kind == "loha":
            delta = _loha_factor(t, "1", shape) * _loha_factor(t, "2", shape)  # Hadamard product
        elif self.kind == "lokr":
            delta = _lokr_delta(t, shape)
        else:
            delta = t["diff"] if "diff" in t else torch.zeros(shape, device=device)
        if delta.numel() != shape.numel():
            raise ValueError(f"the update has shape {tuple(delta.shape)}, the layer's weight {tuple(shape)}")
        return delta.reshape(shape) * self.scale  # (C, C) <-> (C, C, 1, 1) for 1x1 convs stored as linears

    def bias_delta(self, device: torch.device | str = "cpu") -> Tensor | None:
        """Δb of a full update (`diff_b`), else None."""
        bias = self.tensors.get("diff_b")
        return None if bias is None else bias.to(device=device, dtype=torch.float32)


def _cp(core: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """LyCORIS' CP rebuild (its make_weight_cp): core (r, r, kh, kw), a (r, out), b (r, in) -> (out, in, kh, kw)."""
    return torch.einsum("ijkl,jr,ip->prkl", core, b, a)


def _loha_factor(t: dict[str, Tensor], which: str, shape: torch.Size) -> Tensor:
    a, b, core = t[f"hada_w{which}_a"], t[f"hada_w{which}_b"], t.get(f"hada_t{which}")
    if core is not None:
        return _cp(core, a, b)  # (out, in, kh, kw)
    w = a @ b.flatten(1)  # (out, in·kh·kw)
    return w.reshape(shape) if w.numel() == shape.numel() else w  # a wrong size is reported by `delta`


def _lokr_delta(t: dict[str, Tensor], shape: torch.Size) -> Tensor:
    """W1 ⊗ W2 with each factor whole or rebuilt (A1111 network_lokr / LyCORIS make_kron)."""
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]  # (a, b)
    if "lokr_w2" in t:
        w2 = t["lokr_w2"]
    elif "lokr_t2" in t:
        w2 = _cp(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])  # (c, d, kh, kw)
    else:
        w2 = t["lokr_w2_a"] @ t["lokr_w2_b"].flatten(1)  # (c, d·kh·kw)
    if len(shape) == 4:
        w1 = w1.reshape(*w1.shape[:2], 1, 1)  # (a, b, 1, 1)
        if w2.ndim == 2:  # a conv factor stored flat: (c, d·kh·kw) -> (c, d, kh, kw)
            w2 = w2.reshape(w2.shape[0], -1, *shape[2:])
    return torch.kron(w1.contiguous(), w2.contiguous())  # (a·c, b·d[, kh, kw]); kron needs dense factors


def merged_weight(weight: Tensor, update: LayerUpdate, strength: float) -> Tensor:
    """The float32 weight after merging `update` at `strength` into float32 `weight` (module docstring)."""
    delta = update.delta(weight.shape, weight.device)
    magnitude = update.dora_scale
    if magnitude is None:
        return weight + strength * delta
    # DoRA (Liu et al. 2024, eq. 5): W' = m (W + ΔW) / ‖W + ΔW‖, the norm along the axis m does not index
    combined = weight + delta
    flat_out = combined.reshape(combined.shape[0], -1)  # (out, in·kh·kw)
    m = magnitude.to(device=weight.device, dtype=torch.float32)
    outputs, inputs = combined.shape[:2]
    # m's shape tells the axis (module docstring): (out, 1..) and (out,) per output row, (1, in..) per input column
    if m.numel() == outputs and (m.shape[0] == outputs or m.numel() != inputs):
        norm = flat_out.norm(dim=1).reshape(-1, *[1] * (combined.ndim - 1))  # per output row
        m = m.reshape(norm.shape)
    elif m.numel() == inputs:
        norm = combined.transpose(0, 1).reshape(combined.shape[1], -1).norm(dim=1)  # per input column
        norm = norm.reshape(1, -1, *[1] * (combined.ndim - 2))
        m = m.reshape(norm.shape)
    else:
        raise ValueError(f"dora_scale has shape {tuple(magnitude.shape)}: one value per output or input channel of "
                         f"a weight of shape {tuple(weight.shape)} expected")
    return weight + strength * (m * combined / norm - weight)
