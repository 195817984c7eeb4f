"""One adapter per model family: where the blocks are, what their MLP adds to the residual, how to fold T.

ReplaceMe needs four facts about a decoder: the list of blocks, the module whose output is the MLP's
additive contribution M_i, the linear layer that produces M_i (to fold T into), and how to delete
blocks so that `from_pretrained` rebuilds the same network. Each family states them once here; the
rest of the library never looks at a model's name. Families are recognised by `config.model_type`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn


class UnsupportedModelError(ValueError):
    """The model's architecture is not one we know how to prune (or fold into)."""


class FoldError(ValueError):
    """This T cannot be folded into this architecture without changing the network."""


def _linear_out_in(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, bool]:
    """Weight, bias and whether the weight is stored [in, out] (GPT-2's Conv1D) instead of [out, in]."""
    transposed = type(module).__name__ == "Conv1D"
    if not transposed and not isinstance(module, nn.Linear):
        raise FoldError(f"cannot fold into {type(module).__name__}: expected nn.Linear or Conv1D")
    return module.weight, getattr(module, "bias", None), transposed


@torch.no_grad()
def fold_into_linear(module: nn.Module, T: torch.Tensor) -> None:
    """Make `module(x)` return `module(x) @ T` by rewriting its weight and bias (float64, then cast).

    nn.Linear computes x Wᵀ + b, so (x Wᵀ + b) T = x (Tᵀ W)ᵀ + b T. Conv1D computes x W + b, so W ← W T.
    """
    weight, bias, transposed = _linear_out_in(module)
    d_out = weight.shape[1] if transposed else weight.shape[0]
    if T.shape != (d_out, d_out):
        raise FoldError(f"T has shape {tuple(T.shape)} but the projection outputs {d_out} features")
    T64 = T.detach().to(device=weight.device, dtype=torch.float64)
    w64 = weight.detach().to(torch.float64)
    new_w = w64 @ T64 if transposed else T64.T @ w64
    weight.copy_(new_w.to(weight.dtype))
    if bias is not None:
        bias.copy_((bias.detach().to(torch.float64) @ T64).to(bias.dtype))


@dataclass
class Adapter:
    """Family-independent view of a causal decoder. Subclasses fill in the class attributes."""

    model: nn.Module

    model_types: ClassVar[tuple[str, ...]] = ()
    layers_path: ClassVar[str] = ""  # attribute path from the *ForCausalLM to the ModuleList of blocks
    mlp_output_path: ClassVar[str] = ""  # inside a block: module whose output is exactly M_i
    fold_path: ClassVar[str | None] = ""  # inside a block: linear layer that produces M_i (None: not foldable)
    diagonal_fold_path: ClassVar[str | None] = None  # inside a block: a norm whose weight can absorb a diagonal T
    why_not_foldable: ClassVar[str] = ""

    def __post_init__(self) -> None:
        self.check_supported()

    # --- structure -------------------------------------------------------------------------
    def check_supported(self) -> None:
        """Raise for configurations of a known family that ReplaceMe cannot handle exactly."""

    @property
    def config(self):
        return self.model.config

    def _get(self, root: nn.Module, path: str) -> nn.Module:
        for part in path.split("."):
            root = getattr(root, part)
        return root

    @property
    def layers(self) -> nn.ModuleList:
        return self._get(self.model, self.layers_path)

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def hidden_size(self) -> int:
        return int(self.config.hidden_size)

    def mlp_output_module(self, i: int) -> nn.Module:
        return self._get(self.layers[i], self.mlp_output_path)

    # --- folding ---------------------------------------------------------------------------
    @property
    def can_fold_general(self) -> bool:
        return self.fold_path is not None

    def fold(self, i: int, T: torch.Tensor) -> None:
        """Fold a d×d map into block i so that its MLP contribution becomes M_i·T."""
        if self.fold_path is None:
            raise FoldError(self.why_not_foldable)
        fold_into_linear(self._get(self.layers[i], self.fold_path), T)

    def fold_diagonal(self, i: int, t: torch.Tensor) -> None:
        """Fold a diagonal map diag(t); works wherever a general fold works, and also into an output norm."""
        if self.fold_path is not None:
            self.fold(i, torch.diag(t.to(torch.float64)))
            return
        if self.diagonal_fold_path is None:
            raise FoldError(self.why_not_foldable)
        self._fold_diagonal_into_norm(self._get(self.layers[i], self.diagonal_fold_path), t)

    def _fold_diagonal_into_norm(self, norm: nn.Module, t: torch.Tensor) -> None:
        with torch.no_grad():
            norm.weight.copy_((norm.weight.to(torch.float64) * t.to(norm.weight.device, torch.float64)).to(norm.weight.dtype))

    # --- deletion --------------------------------------------------------------------------
    num_layers_attr: ClassVar[str] = "num_hidden_layers"
    per_layer_config_keys: ClassVar[tuple[str, ...]] = ("layer_types", "no_rope_layers")

    def delete_blocks(self, removed: set[int] | list[int]) -> None:
        """Drop blocks (original 0-based indices) and keep config, attention `layer_idx` and KV cache consistent."""
        removed = set(int(r) for r in removed)
        n = self.num_layers
        bad = [r for r in removed if not 0 <= r < n]
        if bad:
            raise ValueError(f"cannot remove blocks {bad}: the model has blocks 0..{n - 1}")
        if len(removed) >= n:
            raise ValueError("cannot remove every block")
        kept = [i for i in range(n) if i not in removed]
        parent_path, _, name = self.layers_path.rpartition(".")
        parent = self._get(self.model, parent_path) if parent_path else self.model
        setattr(parent, name, nn.ModuleList([self.layers[i] for i in kept]))
        for new_idx, block in enumerate(self.layers):
            for module in block.modules():
                if isinstance(getattr(module, "layer_idx", None), int):
                    module.layer_idx = new_idx
        for key in self.per_layer_config_keys:
            values = getattr(self.config, key, None)
            if isinstance(values, (list, tuple)) and len(values) == n:
                setattr(self.config, key, [values[i] for i in kept])
        setattr(self.config, self.num_layers_attr, len(kept))


class LlamaLikeAdapter(Adapter):
    """Pre-norm blocks, gated MLP whose `down_proj` output is added to the residual."""

    model_types = ("llama", "mistral", "qwen2", "qwen3", "phi3")
    layers_path = "model.layers"
    mlp_output_path = "mlp"
    fold_path = "mlp.down_proj"


class Gemma3Adapter(Adapter):
    """Gemma 3 passes the MLP output through `post_feedforward_layernorm` before the residual add.

    norm(x)·diag(1+w) cannot absorb a general T (RMSNorm is not linear), but it can absorb a
    diagonal one: (1+w)·t = 1+w'  ⇒  w' = (1+w)·t − 1.
    """

    model_types = ("gemma3_text",)
    layers_path = "model.layers"
    mlp_output_path = "post_feedforward_layernorm"
    fold_path = None
    diagonal_fold_path = "post_feedforward_layernorm"
    why_not_foldable = (
        "Gemma 3 normalises the MLP output (post_feedforward_layernorm) before the residual add, so a "
        "general T cannot be folded into the checkpoint. What works: a diagonal T (structure='diagonal', "
        "folded into that norm's weight), T kept as a separate linear layer in memory, or UIDL (method='uidl')."
    )

    def _fold_diagonal_into_norm(self, norm: nn.Module, t: torch.Tensor) -> None:
        with torch.no_grad():
            w = norm.weight.to(torch.float64)
            norm.weight.copy_(((1.0 + w) * t.to(w.device, torch.float64) - 1.0).to(norm.weight.dtype))


class GPT2Adapter(Adapter):
    model_types = ("gpt2",)
    layers_path = "transformer.h"
    mlp_output_path = "mlp"
    fold_path = "mlp.c_proj"

    def check_supported(self) -> None:
        if getattr(self.config, "scale_attn_by_inverse_layer_idx", False):
            raise UnsupportedModelError(
                "GPT-2 with scale_attn_by_inverse_layer_idx=True scales attention by the block's position, "
                "which changes when blocks are deleted; such a checkpoint cannot be pruned exactly."
            )
        if getattr(self.config, "add_cross_attention", False):
            raise UnsupportedModelError("GPT-2 with cross-attention is not a plain causal decoder")


class GPTNeoXAdapter(Adapter):
    """Pythia / GPT-NeoX; parallel residual (x + attn(ln1 x) + mlp(ln2 x)) keeps M additive."""

    model_types = ("gpt_neox",)
    layers_path = "gpt_neox.layers"
    mlp_output_path = "mlp"
    fold_path = "mlp.dense_4h_to_h"


class OPTAdapter(Adapter):
    model_types = ("opt",)
    layers_path = "model.decoder.layers"
    mlp_output_path = "fc2"
    fold_path = "fc2"

    def check_supported(self) -> None:
        if not getattr(self.config, "do_layer_norm_before", True):
            raise UnsupportedModelError(
                "this OPT model is post-LN (do_layer_norm_before=False): the block output is norm(Y + M), so "
                "M·T cannot replace later blocks by a fold. UIDL (method='uidl') still works."
            )


class FalconAdapter(Adapter):
    """Falcon: parallel attention/MLP in most checkpoints; the MLP output is still added to the residual."""

    model_types = ("falcon",)
    layers_path = "transformer.h"
    mlp_output_path = "mlp"
    fold_path = "mlp.dense_4h_to_h"


class _VisionAdapter(Adapter):
    """Vision encoders (bidirectional, pre-LN). The blocks sit at one of several paths depending on the
    wrapper class (bare encoder, *WithProjection, *ForImageClassification); the first that exists is used."""

    layers_paths: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        for path in self.layers_paths:
            try:
                self._get(self.model, path)
            except AttributeError:
                continue
            self.layers_path = path
            break
        super().__post_init__()

    def delete_blocks(self, removed) -> None:
        super().delete_blocks(removed)
        # wrappers (e.g. *WithProjection) may hold their own copy of the config: keep every copy consistent
        for module in self.model.modules():
            cfg = getattr(module, "config", None)
            if cfg is not None and cfg is not self.config and hasattr(cfg, self.num_layers_attr):
                setattr(cfg, self.num_layers_attr, self.num_layers)


class Dinov2Adapter(_VisionAdapter):
    """DINOv2: M = λ₂ ⊙ MLP(LN₂ Y) (LayerScale), so the MLP-output module is `layer_scale2`.

    Folding T: λ₂ ⊙ (h W₂ᵀ + b₂) T = h (Tᵀ diag(λ₂) W₂)ᵀ + (λ₂ ⊙ b₂) T, so W₂ ← Tᵀ diag(λ₂) W₂,
    b₂ ← (λ₂ ⊙ b₂) T and λ₂ ← 1. A diagonal T can also go into λ₂ alone (λ₂ ← λ₂ ⊙ t).
    """

    model_types = ("dinov2",)
    layers_paths = ("encoder.layer", "dinov2.encoder.layer")
    layers_path = "encoder.layer"
    mlp_output_path = "layer_scale2"
    fold_path = "mlp.fc2"
    diagonal_fold_path = "layer_scale2"

    def _projection(self, block: nn.Module) -> nn.Module:
        return block.mlp.down_proj if getattr(self.config, "use_swiglu_ffn", False) else block.mlp.fc2

    @torch.no_grad()
    def fold(self, i: int, T: torch.Tensor) -> None:
        block = self.layers[i]
        proj, scale = self._projection(block), block.layer_scale2.lambda1
        lam = scale.detach().to(torch.float64)
        d = lam.shape[0]
        if T.shape != (d, d):
            raise FoldError(f"T has shape {tuple(T.shape)} but the block outputs {d} features")
        fold_into_linear(proj, torch.diag(lam) @ T.to(torch.float64))
        scale.copy_(torch.ones_like(scale))

    def delete_blocks(self, removed) -> None:
        """Also renumber the backbone stages (`stage_names`, `out_indices`), which from_pretrained validates."""
        n_before = self.num_layers
        kept = [i for i in range(n_before) if i not in set(int(r) for r in removed)]
        old = [k % (n_before + 1) for k in (getattr(self.config, "out_indices", None) or [])]
        super().delete_blocks(removed)
        if getattr(self.config, "stage_names", None) is None:
            return
        self.config.stage_names = ["stem"] + [f"stage{i}" for i in range(1, len(kept) + 1)]
        # stage k ≥ 1 is the output of block k−1: keep the stages whose block survives, renumbered;
        # the default (only the last stage) stays the last stage
        new = [0 if k == 0 else kept.index(k - 1) + 1 for k in old if k == 0 or (k - 1) in kept]
        if old == [n_before] or not new:
            new = [len(kept)]
        self.config.out_indices = new

    def fold_diagonal(self, i: int, t: torch.Tensor) -> None:
        scale = self.layers[i].layer_scale2.lambda1
        with torch.no_grad():
            scale.copy_((scale.to(torch.float64) * t.to(scale.device, torch.float64)).to(scale.dtype))


class CLIPVisionAdapter(_VisionAdapter):
    """CLIP's vision tower (CLIPVisionModel / CLIPVisionModelWithProjection): Y + mlp(LN₂ Y); fold into mlp.fc2."""

    model_types = ("clip_vision_model",)
    layers_paths = ("encoder.layers", "vision_model.encoder.layers")
    layers_path = "encoder.layers"
    mlp_output_path = "mlp"
    fold_path = "mlp.fc2"


class ViTAdapter(_VisionAdapter):
    """ViT (transformers ≥ 5: `ViTLayer` computes Y + dropout(mlp(layernorm_after(Y))) with mlp = fc1 → act → fc2).

    Dropout is the identity in eval mode, so M is the output of `mlp` and T folds into `mlp.fc2`. (Older
    transformers added the residual inside `ViTOutput`; this adapter targets the layout installed here and
    `check_supported` refuses the old one.)
    """

    model_types = ("vit",)
    layers_paths = ("layers", "vit.layers")
    layers_path = "layers"
    mlp_output_path = "mlp"
    fold_path = "mlp.fc2"

    def check_supported(self) -> None:
        try:
            block = self.layers[0]
        except (AttributeError, IndexError):
            return  # get_adapter reports a missing block list
        if not hasattr(block, "mlp") or not hasattr(block.mlp, "fc2"):
            raise UnsupportedModelError(
                "this ViT layer has no `mlp.fc2` (an older transformers layout where ViTOutput adds the residual): "
                "upgrade transformers to the pinned version"
            )


ADAPTERS: tuple[type[Adapter], ...] = (
    LlamaLikeAdapter, Gemma3Adapter, GPT2Adapter, GPTNeoXAdapter, OPTAdapter, FalconAdapter,
    Dinov2Adapter, CLIPVisionAdapter, ViTAdapter,
)
SUPPORTED_MODEL_TYPES = tuple(t for a in ADAPTERS for t in a.model_types)


def get_adapter(model: nn.Module) -> Adapter:
    """The adapter for a loaded causal LM, chosen from `model.config.model_type` (never from a name)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for adapter_cls in ADAPTERS:
        if model_type in adapter_cls.model_types:
            adapter = adapter_cls(model)
            try:
                adapter.layers
            except AttributeError:
                raise UnsupportedModelError(
                    f"{type(model).__name__} has model_type {model_type!r} but no `{adapter_cls.layers_path}`; "
                    "load it with AutoModelForCausalLM"
                ) from None
            return adapter
    raise UnsupportedModelError(
        f"unsupported architecture {model_type!r} ({type(model).__name__}). "
        f"Supported model types: {', '.join(SUPPORTED_MODEL_TYPES)}."
    )
