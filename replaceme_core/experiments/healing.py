"""Healing a pruned model by training (paper App. A.8, Tables 13 and 15): the LT only, the whole model, or LoRA.

Three modes, one training loop (causal-LM loss, Adam, constant learning rate, packed sequences):

* ``"lt"`` — LT-only healing. The pruned model already has its least-squares T folded into the down-projection
  of the kept block. We add a *second* trainable d×d matrix T₂, initialised to the identity, at the same place
  (applied to the kept block's MLP output M before the residual add, by a forward hook on
  ``adapter.mlp_output_module(block)``), freeze every other parameter and train T₂ alone. Afterwards T₂ is folded
  with the adapter's fold, so the result is again a stock checkpoint whose MLP output is M·T_LS·T₂: training
  T₂ from I is the same as training T = T_LS·T₂ from T_LS (the paper keeps T un-fused while training; the
  function computed and the gradients' span are the same, only the parametrisation differs).
* ``"full"`` — every parameter is trained (the paper's "full model" row of Table 13).
* ``"lora"`` — LoRA adapters through ``peft`` on the linear layers of every block's MLP (the UIDL authors'
  healing, used for the UIDL baseline of Fig. 4), merged afterwards with ``merge_and_unload``.

Data: texts are tokenized, joined with EOS between documents, cut into chunks of ``seq_len`` tokens (no
padding), shuffled with the seed and served ``batch_size`` chunks per step; if a run needs more chunks than the
texts give, the chunks are reshuffled and reused (the number of passes is reported).

`heal_cached` wraps `heal` with an on-disk cache keyed by content (input weights, texts, config, blocks) that
stores what is needed to re-apply the result (the T₂ matrices, the LoRA weights, or the full state dict) and
the cost measured by `cost.measure` when it was trained, so two notebooks that need the same healed model pay
for it once.
"""
from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from ..arch import FoldError, get_adapter
from ..io.cache import cache_dir, hash_bytes, stable_json

__all__ = ["HEAL_MODES", "HealConfig", "HealResult", "packed_batches", "heal", "heal_cached", "blocks_receiving_T",
           "mlp_linear_names", "merge_lora"]

HEAL_MODES = ("lt", "full", "lora")


@dataclass
class HealConfig:
    """One healing run. Defaults are small; the paper's settings (Table 15) are in profiles/paper.yaml."""

    mode: str = "lt"  # lt | full | lora
    steps: int = 100
    batch_size: int = 4
    seq_len: int = 128
    lr: float = 3e-4
    weight_decay: float = 0.0
    seed: int = 0
    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    lora_targets: str = "mlp"  # "mlp": every linear layer inside each block's MLP; "all-linear": peft's choice
    gradient_checkpointing: bool = False

    def validate(self) -> None:
        if self.mode not in HEAL_MODES:
            raise ValueError(f"unknown healing mode {self.mode!r}; choose one of {', '.join(HEAL_MODES)}")
        for name in ("steps", "batch_size", "seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"healing {name} must be a positive integer, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"healing lr must be positive, got {self.lr!r}")
        if self.mode == "lora":
            if self.lora_r <= 0:
                raise ValueError(f"lora_r must be positive, got {self.lora_r}")
            if self.lora_targets not in ("mlp", "all-linear"):
                raise ValueError(f"lora_targets must be 'mlp' or 'all-linear', got {self.lora_targets!r}")

    @classmethod
    def from_dict(cls, d: dict) -> "HealConfig":
        known = set(cls.__dataclass_fields__)
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown healing options {sorted(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**d)


@dataclass
class HealResult:
    model: nn.Module
    mode: str
    losses: list[float]
    seconds: float  # training loop only (tokenization excluded)
    steps: int
    tokens: int  # tokens seen = steps × batch_size × seq_len
    trainable_params: int
    passes: float  # how many times the packed data was used (> 1: chunks were reused)
    transforms: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # lt: (block, T₂) folded
    payload: Any = None  # what re-applies the result: T₂ list, LoRA state dict, or full state dict
    cost: dict | None = None  # from cost.measure when run through heal_cached (the run that trained it)
    cached: bool = False

    def summary(self) -> dict:
        return {"mode": self.mode, "steps": self.steps, "tokens": self.tokens, "trainable_params": self.trainable_params,
                "train_seconds": self.seconds, "passes": self.passes, "first_loss": self.losses[0] if self.losses else None,
                "last_loss": self.losses[-1] if self.losses else None, "cached": self.cached, **(self.cost or {})}


# --- data --------------------------------------------------------------------------------------

def packed_batches(texts: Sequence[str], tokenizer, seq_len: int, batch_size: int, steps: int, seed: int = 0
                   ) -> tuple[list[torch.Tensor], float]:
    """`steps` LongTensors [batch_size, seq_len] of packed text (EOS between documents), and the passes used."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token to separate packed documents")
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise ValueError("no healing texts: give a non-empty list of documents")
    stream: list[int] = []
    for ids in tokenizer(texts, add_special_tokens=True)["input_ids"]:
        stream += list(ids) + [tokenizer.eos_token_id]
    n_chunks = len(stream) // seq_len
    if n_chunks < batch_size:
        raise ValueError(f"the healing texts give {len(stream)} tokens, fewer than one batch of {batch_size}×{seq_len}: "
                         "give more texts or lower batch_size / seq_len")
    chunks = torch.tensor(stream[: n_chunks * seq_len], dtype=torch.long).view(n_chunks, seq_len)
    rng = random.Random(seed)
    need = steps * batch_size
    order: list[int] = []
    while len(order) < need:
        perm = list(range(n_chunks))
        rng.shuffle(perm)
        order += perm
    order = order[:need]
    batches = [chunks[order[i * batch_size:(i + 1) * batch_size]] for i in range(steps)]
    return batches, need / n_chunks


# --- where things are --------------------------------------------------------------------------

def blocks_receiving_T(record: dict) -> list[int]:
    """Indices, in the *pruned* model, of the blocks that received a T (from a prune record's original indices)."""
    removed = sorted(record.get("removed_blocks", []))
    return [k - sum(1 for r in removed if r < k) for k in record.get("blocks_receiving_T", [])]


def mlp_linear_names(model: nn.Module) -> list[str]:
    """Qualified names of every linear layer inside each block's MLP (the UIDL authors' LoRA targets)."""
    adapter = get_adapter(model)
    prefix = {id(m): n for n, m in model.named_modules()}
    names = []
    for block in adapter.layers:
        mlp = getattr(block, "mlp", None)
        if mlp is None:
            raise ValueError(f"{type(block).__name__} has no `mlp` submodule: use lora_targets='all-linear'")
        for sub, mod in mlp.named_modules():
            if isinstance(mod, nn.Linear) or type(mod).__name__ == "Conv1D":
                names.append(f"{prefix[id(mlp)]}.{sub}")
    if not names:
        raise ValueError("found no linear layer inside the MLPs")
    return names


def _lora_config(model: nn.Module, cfg: HealConfig):
    from peft import LoraConfig

    targets = mlp_linear_names(model) if cfg.lora_targets == "mlp" else "all-linear"
    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout, target_modules=targets,
                      bias="none", task_type="CAUSAL_LM")


def merge_lora(peft_model) -> nn.Module:
    """Fold the LoRA updates into the base weights and return the plain transformers model."""
    model = peft_model.merge_and_unload()
    model.eval()
    return model


class _LinearTransform(nn.Module):
    """x ↦ x·T with T initialised to the identity (float32, whatever the model's dtype)."""

    def __init__(self, d: int, device) -> None:
        super().__init__()
        self.T = nn.Parameter(torch.eye(d, dtype=torch.float32, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x.to(self.T.dtype) @ self.T).to(x.dtype)


def _hook(transform: _LinearTransform):
    def hook(module, args, output):
        if isinstance(output, tuple):
            return (transform(output[0]), *output[1:])
        return transform(output)
    return hook


# --- training ----------------------------------------------------------------------------------

def heal(model: nn.Module, tokenizer, texts: Sequence[str], config: HealConfig | dict, *, blocks: Sequence[int] | None = None,
         merge: bool = True, progress: bool = True) -> HealResult:
    """Train `model` (in place) on `texts` with the causal-LM loss and return the healed model with its loss curve.

    mode "lt" needs `blocks` — the indices, in this model, of the blocks whose MLP output T₂ multiplies (see
    `blocks_receiving_T`). mode "lora" with merge=False returns the un-merged peft model (merge it with `merge_lora`).
    """
    from tqdm.auto import tqdm

    cfg = HealConfig.from_dict(config) if isinstance(config, dict) else config
    cfg.validate()
    adapter = get_adapter(model)
    device = next(model.parameters()).device
    if cfg.mode == "lt":
        if not blocks:
            raise ValueError("LT-only healing needs `blocks`: the pruned model's blocks that received T "
                             "(heal.blocks_receiving_T(record))")
        bad = [b for b in blocks if not 0 <= int(b) < adapter.num_layers]
        if bad:
            raise ValueError(f"blocks {bad} are not in this {adapter.num_layers}-block model")
        if not adapter.can_fold_general:
            raise FoldError(adapter.why_not_foldable)
    batches, passes = packed_batches(texts, tokenizer, cfg.seq_len, cfg.batch_size, cfg.steps, cfg.seed)

    torch.manual_seed(cfg.seed)
    was_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    transforms: dict[int, _LinearTransform] = {}
    handles = []
    train_model = model
    if cfg.mode == "lt":
        for p in model.parameters():
            p.requires_grad_(False)
        for b in dict.fromkeys(int(b) for b in blocks):
            transforms[b] = _LinearTransform(adapter.hidden_size, device)
            handles.append(adapter.mlp_output_module(b).register_forward_hook(_hook(transforms[b])))
        params = [t.T for t in transforms.values()]
    elif cfg.mode == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        params = [p for p in model.parameters()]
    else:
        from peft import get_peft_model

        train_model = get_peft_model(model, _lora_config(model, cfg))
        params = [p for p in train_model.parameters() if p.requires_grad]
    params = list({id(p): p for p in params}.values())  # tied weights once
    trainable = sum(p.numel() for p in params)
    if cfg.gradient_checkpointing:
        train_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # Half-precision weights (bf16 on a GPU) cannot take Adam's steps themselves: a step of ~lr is below half a bf16
    # ulp of a typical weight at lr 1e-5 and rounds away, so the model would not move. Adam then updates float32
    # master copies and the weights follow them (mixed precision). float32 parameters (CPU profiles, T₂, peft's LoRA
    # adapters) are stepped directly, as before.
    master = [p.detach().to(torch.float32).clone().requires_grad_(True) for p in params] \
        if any(p.dtype in (torch.float16, torch.bfloat16) for p in params) else None
    optimizer = torch.optim.Adam(master if master is not None else params, lr=cfg.lr, weight_decay=cfg.weight_decay)

    losses: list[float] = []
    train_model.train()
    t0 = time.perf_counter()
    try:
        bar = tqdm(batches, desc=f"healing ({cfg.mode}, {trainable / 1e6:.2f}M trainable)", disable=not progress)
        for ids in bar:
            ids = ids.to(device)
            loss = train_model(input_ids=ids, labels=ids, use_cache=False).loss
            if not torch.isfinite(loss):
                raise FloatingPointError(f"healing loss became {loss.item()} at step {len(losses)}: lower the learning rate")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if master is not None:
                for m, p in zip(master, params):
                    m.grad, p.grad = (None if p.grad is None else p.grad.to(torch.float32)), None
            optimizer.step()
            if master is not None:
                with torch.no_grad():
                    for m, p in zip(master, params):
                        p.copy_(m)
            losses.append(float(loss.detach()))
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    finally:
        for h in handles:
            h.remove()
        if cfg.gradient_checkpointing:
            train_model.gradient_checkpointing_disable()
        train_model.eval()
    seconds = time.perf_counter() - t0

    folded: list[tuple[int, torch.Tensor]] = []
    payload: Any
    if cfg.mode == "lt":
        for b, t in transforms.items():
            T = t.T.detach().to(torch.float64).cpu()
            adapter.fold(b, T)
            folded.append((b, T))
        payload = folded
        out = model
    elif cfg.mode == "full":
        payload = None  # the state dict, taken by heal_cached when it saves
        out = model
    else:
        from peft import get_peft_model_state_dict

        payload = {k: v.detach().cpu().clone() for k, v in get_peft_model_state_dict(train_model).items()}
        out = merge_lora(train_model) if merge else train_model
    if cfg.mode != "lora" or merge:  # not the un-merged peft model: its base weights stay frozen
        for n, p in out.named_parameters():
            p.requires_grad_(was_grad.get(n, True))
    return HealResult(model=out, mode=cfg.mode, losses=losses, seconds=seconds, steps=cfg.steps,
                      tokens=cfg.steps * cfg.batch_size * cfg.seq_len, trainable_params=trainable, passes=passes,
                      transforms=folded, payload=payload)


# --- cache -------------------------------------------------------------------------------------

CACHE_VERSION = 1


def _apply_payload(model: nn.Module, cfg: HealConfig, payload: Any) -> nn.Module:
    if cfg.mode == "lt":
        adapter = get_adapter(model)
        for b, T in payload:
            adapter.fold(int(b), T)
        return model
    if cfg.mode == "full":
        missing, unexpected = model.load_state_dict(payload, strict=False)
        untied_missing = [n for n in missing if "lm_head" not in n]  # an lm_head tied to the embeddings may be absent
        if unexpected or untied_missing:
            raise RuntimeError(f"cached healed weights do not match the model (missing {untied_missing[:3]}, "
                               f"unexpected {unexpected[:3]}): clear {cache_dir('heal')} and re-run")
        return model
    from peft import get_peft_model, set_peft_model_state_dict

    peft_model = get_peft_model(model, _lora_config(model, cfg))
    set_peft_model_state_dict(peft_model, payload)
    return merge_lora(peft_model)


def heal_cached(model: nn.Module, tokenizer, texts: Sequence[str], config: HealConfig | dict, *,
                blocks: Sequence[int] | None = None, country_iso_code: str = "USA", progress: bool = True,
                use_cache: bool = True) -> HealResult:
    """`heal` under `cost.measure`, cached on disk by content; a cache hit re-applies the stored result and returns
    the cost measured when it was trained (result.cached is True). The model is changed in place either way."""
    from ..evaluation.model_ref import hash_state_dict, hash_tokenizer
    from ..io.cache import atomic_torch_save
    from .cost import measure

    cfg = HealConfig.from_dict(config) if isinstance(config, dict) else config
    cfg.validate()
    texts = list(texts)
    key = hash_bytes(stable_json({
        "v": CACHE_VERSION, "weights": hash_state_dict(model), "texts": hash_bytes(stable_json(texts)),
        "tokenizer": hash_tokenizer(tokenizer), "config": asdict(cfg),  # by content, never by path
        "blocks": [int(b) for b in blocks] if blocks else None,
    }))[:24]
    path = cache_dir("heal") / f"heal-{cfg.mode}-{key}.pt"
    if use_cache and path.is_file():
        state = torch.load(path, weights_only=False)
        out = _apply_payload(model, cfg, state["payload"])
        return HealResult(model=out, cached=True, transforms=state["payload"] if cfg.mode == "lt" else [],
                          payload=None, **state["info"])
    m = measure(lambda: heal(model, tokenizer, texts, cfg, blocks=blocks, merge=True, progress=progress),
                country_iso_code=country_iso_code)
    result: HealResult = m.result
    result.cost = {"measured_seconds": m.seconds, "energy_kwh": m.energy_kwh, "emissions_kg": m.emissions_kg,
                   "energy_mode": m.mode, "country_iso_code": country_iso_code}
    payload = result.payload if cfg.mode != "full" else {k: v.detach().cpu() for k, v in result.model.state_dict().items()}
    info = {k: getattr(result, k) for k in ("mode", "losses", "seconds", "steps", "tokens", "trainable_params", "passes", "cost")}
    if use_cache:
        atomic_torch_save({"payload": payload, "info": info, "config": asdict(cfg)}, path)
    return result
