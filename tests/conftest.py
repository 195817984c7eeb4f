"""Shared fixtures: tiny randomly initialised causal LMs of every supported family, padded batches,
and an independent (adapter-free) way to reach blocks and MLP outputs through our own hooks."""
from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch
import transformers
from transformers import AutoModelForCausalLM

# Tiny matrices: thread start-up costs far more than the work (and other jobs may share the cores).
torch.set_num_threads(1)

VOCAB = 128
HIDDEN = 32
LAYERS = 5


def cache_with_assets(root: Path, fresh: set[str]) -> Path:
    """A cache root whose folders link to the real cache's, except those in `fresh` (they start empty): what a test
    derives stays under `root`, and packaged downloads are not fetched or converted again."""
    real = Path(os.environ.get("REPLACEME_CACHE", Path.home() / ".cache" / "replaceme")).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    if real.is_dir():
        for entry in real.iterdir():
            if entry.name not in fresh and not (root / entry.name).exists():
                (root / entry.name).symlink_to(entry)
    return root


def _llama_like(cls, **extra):
    kw = dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
    )
    kw.update(extra)
    return cls(**kw)


# name -> (config builder, attribute path to the blocks, MLP-output module inside a block)
# The two paths are written here independently of replaceme_core.arch, so tests do not trust the adapters.
FAMILIES = {
    "llama": (lambda: _llama_like(transformers.LlamaConfig), "model.layers", "mlp"),
    "mistral": (lambda: _llama_like(transformers.MistralConfig, sliding_window=6), "model.layers", "mlp"),
    "qwen2": (
        lambda: _llama_like(transformers.Qwen2Config, use_sliding_window=True, sliding_window=6, max_window_layers=2),
        "model.layers", "mlp",
    ),
    "qwen3": (lambda: _llama_like(transformers.Qwen3Config, head_dim=8), "model.layers", "mlp"),
    "phi3": (lambda: _llama_like(transformers.Phi3Config), "model.layers", "mlp"),
    "gpt2": (
        lambda: transformers.GPT2Config(
            vocab_size=VOCAB, n_embd=HIDDEN, n_layer=LAYERS, n_head=4, n_positions=64, pad_token_id=0,
            bos_token_id=1, eos_token_id=2,
        ),
        "transformer.h", "mlp",
    ),
    "gpt_neox_parallel": (
        lambda: transformers.GPTNeoXConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
            intermediate_size=64, rotary_pct=0.5, use_parallel_residual=True, max_position_embeddings=64,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        ),
        "gpt_neox.layers", "mlp",
    ),
    "gpt_neox_sequential": (
        lambda: transformers.GPTNeoXConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
            intermediate_size=64, rotary_pct=0.5, use_parallel_residual=False, max_position_embeddings=64,
            pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        ),
        "gpt_neox.layers", "mlp",
    ),
    "opt": (
        lambda: transformers.OPTConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, ffn_dim=64, num_attention_heads=4,
            word_embed_proj_dim=HIDDEN, max_position_embeddings=64, do_layer_norm_before=True,
            pad_token_id=0, bos_token_id=1, eos_token_id=2,
        ),
        "model.decoder.layers", "fc2",
    ),
    "falcon_parallel": (
        lambda: transformers.FalconConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
            parallel_attn=True, new_decoder_architecture=False, alibi=False, bias=True,
            pad_token_id=0, bos_token_id=1, eos_token_id=2,
        ),
        "transformer.h", "mlp",
    ),
    "falcon_sequential": (
        lambda: transformers.FalconConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
            parallel_attn=False, new_decoder_architecture=False, alibi=False, bias=False,
            pad_token_id=0, bos_token_id=1, eos_token_id=2,
        ),
        "transformer.h", "mlp",
    ),
    "falcon_new_arch": (
        lambda: transformers.FalconConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4, num_kv_heads=2,
            new_decoder_architecture=True, num_ln_in_parallel_attn=2, alibi=False, bias=False,
            pad_token_id=0, bos_token_id=1, eos_token_id=2,
        ),
        "transformer.h", "mlp",
    ),
    "falcon_alibi": (
        lambda: transformers.FalconConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=4,
            parallel_attn=True, alibi=True, bias=True, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        ),
        "transformer.h", "mlp",
    ),
    "gemma3_text": (
        lambda: transformers.Gemma3TextConfig(
            vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=48, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, head_dim=8, sliding_window=6, max_position_embeddings=64,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"] * 2,
            pad_token_id=0, bos_token_id=1, eos_token_id=2,
        ),
        "model.layers", "post_feedforward_layernorm",
    ),
}
ALL_FAMILIES = list(FAMILIES)
GENERAL_FOLD_FAMILIES = [f for f in ALL_FAMILIES if f != "gemma3_text"]


def get_path(root, path):
    for part in path.split("."):
        root = getattr(root, part)
    return root


def blocks_of(model, family):
    return get_path(model, FAMILIES[family][1])


def mlp_of(model, family, i):
    return get_path(blocks_of(model, family)[i], FAMILIES[family][2])


def model_from_config(config, seed: int = 0, dtype=torch.float64):
    """A seeded, randomly initialised causal LM of `config` in eval mode, every parameter (norm weights, biases too)
    perturbed so that no map is trivially the identity."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        gen = torch.Generator().manual_seed(seed + 1)
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model.to(dtype).eval()


def build_model(family: str, seed: int = 0, dtype=torch.float64):
    """A tiny, seeded, randomly initialised causal LM in eval mode (dropout off)."""
    return model_from_config(FAMILIES[family][0](), seed, dtype)


@pytest.fixture
def make_model():
    return build_model


def make_batch(lengths, padding="right", seed=0, pad_id=0, vocab=VOCAB):
    """{input_ids, attention_mask} with sequences of the given lengths, padded on the given side."""
    gen = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for r, n in enumerate(lengths):
        seq = torch.randint(3, vocab, (n,), generator=gen)
        sl = slice(0, n) if padding == "right" else slice(width - n, width)
        ids[r, sl] = seq
        mask[r, sl] = 1
    return {"input_ids": ids, "attention_mask": mask}


def unpad(batch):
    """The same texts as single-sequence, unpadded batches."""
    out = []
    for ids, m in zip(batch["input_ids"], batch["attention_mask"]):
        real = ids[m.bool()]
        out.append({"input_ids": real[None], "attention_mask": torch.ones(1, real.numel(), dtype=torch.long)})
    return out


@pytest.fixture
def batch_factory():
    return make_batch


def calib_batches(seed=0, n_batches=3, padding="right"):
    """Enough real tokens (> hidden size) for least squares without ridge, with padding on the given side."""
    return [make_batch([12, 7, 10, 4], padding=padding, seed=seed + b) for b in range(n_batches)]


def _first(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _replace_first(output, new):
    if isinstance(output, tuple):
        return (new,) + tuple(output[1:])
    if isinstance(output, list):
        return [new] + list(output[1:])
    return new


class Recorder:
    """Own hooks (not replaceme_core's): raw block outputs and MLP outputs, cloned at hook time."""

    def __init__(self, model, family, blocks=None):
        layers = blocks_of(model, family)
        blocks = range(len(layers)) if blocks is None else blocks
        self.block_out, self.mlp_out, self.handles = {}, {}, []
        for i in blocks:
            self.handles.append(layers[i].register_forward_hook(self._save(self.block_out, i)))
            self.handles.append(mlp_of(model, family, i).register_forward_hook(self._save(self.mlp_out, i)))

    @staticmethod
    def _save(store, i):
        def hook(_m, _inp, out):
            store[i] = _first(out).detach().clone()

        return hook

    def remove(self):
        for h in self.handles:
            h.remove()


def record(model, family, batch, blocks=None):
    rec = Recorder(model, family, blocks)
    try:
        with torch.no_grad():
            model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  position_ids=positions(batch["attention_mask"]), use_cache=False)
    finally:
        rec.remove()
    mlp = {i: m.reshape(rec.block_out[i].shape) for i, m in rec.mlp_out.items()}  # OPT flattens rows
    return rec.block_out, mlp


def positions(mask):
    """Real-token positions (what generate() uses): a left-padded text sees the positions it has unpadded."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def logits(model, batch):
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     position_ids=positions(batch["attention_mask"]), use_cache=False).logits


def reference_logits(model, family, batch, runs_and_T):
    """Logits of the ORIGINAL model where, for each (kept, removed, T): block `kept` outputs Y + M·T
    (Y = L − M from our own hooks) and the removed blocks are skipped (their output := their input)."""
    model = copy.deepcopy(model)
    layers = blocks_of(model, family)
    handles = []
    mlp_cache = {}

    def save_mlp(i):
        def hook(_m, _inp, out):
            mlp_cache[i] = _first(out).detach().clone()

        return hook

    def fold_hook(i, T):
        def hook(_m, _inp, out):
            L = _first(out)
            M = mlp_cache[i].reshape(L.shape)  # OPT's fc2 works on flattened [batch*seq, d] rows
            return _replace_first(out, L - M + M @ T.to(M.dtype))

        return hook

    def identity_hook(_m, args, kwargs, out):
        x = args[0] if args else kwargs["hidden_states"]
        return _replace_first(out, x)

    for kept, removed, T in runs_and_T:
        handles.append(mlp_of(model, family, kept).register_forward_hook(save_mlp(kept)))
        handles.append(layers[kept].register_forward_hook(fold_hook(kept, T)))
        for r in removed:
            handles.append(layers[r].register_forward_hook(identity_hook, with_kwargs=True))
    try:
        return logits(model, batch)
    finally:
        for h in handles:
            h.remove()


def rel_err(a, b):
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def ls_problem(n=400, d=8, seed=0, noise=0.1, chunk=64):
    """A least-squares problem with a known map: (M, R = M·T_true + noise, streamed LSStats, T_true), float64."""
    from replaceme_core.stats import LSStats

    g = torch.Generator().manual_seed(seed)
    M = torch.randn(n, d, generator=g, dtype=torch.float64) * torch.linspace(0.5, 2, d, dtype=torch.float64)
    T_true = torch.eye(d, dtype=torch.float64) + 0.3 * torch.randn(d, d, generator=g, dtype=torch.float64)
    R = M @ T_true + noise * torch.randn(n, d, generator=g, dtype=torch.float64)
    stats = LSStats(d)
    for s in range(0, n, chunk):
        stats.update(M[s:s + chunk], R[s:s + chunk])
    return M, R, stats, T_true
