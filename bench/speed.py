"""Section 5: prefill / decode tokens/s and peak RSS of the pruned model vs the original, against the ideal L/(L−n)."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from common import MODEL, child_main, maxrss_mib, rss_mib, run_child, yes

KEY = "speed"


@torch.no_grad()
def generate_speed(model, ids: torch.Tensor, new_tokens: int, reps: int = 3) -> tuple[float, float]:
    """(prefill seconds, decode seconds for `new_tokens` greedy steps), best of `reps`."""
    pre, dec = [], []
    for _ in range(reps):
        t = time.perf_counter()
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1)
        pre.append(time.perf_counter() - t)
        cache, nxt = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
        t = time.perf_counter()
        for _ in range(new_tokens):
            out = model(input_ids=nxt, cache=cache, use_cache=True)
            cache, nxt = out.cache, out.logits[:, -1].argmax(-1, keepdim=True)
        dec.append(time.perf_counter() - t)
    return min(pre), min(dec)


def child(spec: dict) -> dict:
    """Generation of one checkpoint in this (fresh) process: its peak RSS."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(spec["path"], dtype=torch.float32).eval()
    base = rss_mib()
    ids = torch.tensor(spec["ids"])
    prefill, decode = generate_speed(model, ids, spec["new_tokens"], reps=1)
    return {"prefill_s": prefill, "decode_s": decode, "rss_after_load_mib": base, "peak_rss_mib": maxrss_mib()}


def measure(model, pruned, tokenizer, workdir: Path, quick: bool) -> dict:
    from replaceme_core.assets import resolve_model
    from replaceme_core.io.data import load_texts
    from replaceme_core.merge import save_checkpoint

    L, Lp = model.config.num_hidden_layers, pruned.config.num_hidden_layers
    text = " ".join(load_texts("wiki", tokenizer, 64, seed=1))
    flat = tokenizer(text)["input_ids"]
    B, P, D = (2, 64, 8) if quick else (4, 256, 32)
    ids = torch.tensor(flat[: B * P]).reshape(B, P)
    times = {"orig": [], "pruned": []}
    for _ in range(1 if quick else 3):
        for name, m in (("orig", model), ("pruned", pruned)):
            times[name].append(generate_speed(m, ids, D, reps=1))
    pre = {k: min(t[0] for t in v) for k, v in times.items()}
    dec = {k: min(t[1] for t in v) for k, v in times.items()}
    ideal = L / Lp
    save_checkpoint(pruned, tokenizer, workdir / "pruned", {"bench": True}, overwrite=True)
    mem = {}
    for name, path in (("orig", resolve_model(MODEL)), ("pruned", str(workdir / "pruned"))):
        mem[name] = run_child("speed.py", {"path": str(path), "ids": ids.tolist(), "new_tokens": D})
    params = {k: sum(p.numel() for p in m.parameters()) for k, m in (("orig", model), ("pruned", pruned))}
    return {
        "batch": B, "prompt": P, "new_tokens": D, "layers": [L, Lp], "ideal": ideal,
        "prefill_tok_s": {k: B * P / v for k, v in pre.items()}, "decode_tok_s": {k: B * D / v for k, v in dec.items()},
        "prefill_speedup": pre["orig"] / pre["pruned"], "decode_speedup": dec["orig"] / dec["pruned"],
        "prefill_frac_ideal": pre["orig"] / pre["pruned"] / ideal, "decode_frac_ideal": dec["orig"] / dec["pruned"] / ideal,
        "peak_rss_mib": {k: v["peak_rss_mib"] for k, v in mem.items()}, "params": params,
    }


def summary_rows(R: dict) -> list[str]:
    sp = R[KEY]
    return [
        f"| 5 | pruned prefill speedup ÷ ideal {sp['layers'][0]}/{sp['layers'][1]} = {sp['ideal']:.3f} | {sp['prefill_frac_ideal']:.1%} | ≥ 95% | {yes(sp['prefill_frac_ideal'] >= 0.95)} |",
        f"| 5b | pruned decode speedup ÷ ideal | {sp['decode_frac_ideal']:.1%} | report | — |",
    ]


def section(R: dict) -> list[str]:
    sp = R[KEY]
    return [
        "## 5. Pruned model speed", "",
        f"Batch {sp['batch']}, prompt {sp['prompt']} tokens (prefill = one forward building the KV cache, logits for the last "
        f"position only), then {sp['new_tokens']} greedy decode steps. Ideal block speedup L/(L−n) = {sp['layers'][0]}/{sp['layers'][1]} "
        f"= {sp['ideal']:.3f}; the embedding, final norm and LM head are not pruned (parameters {sp['params']['orig'] / 1e6:.1f} M → "
        f"{sp['params']['pruned'] / 1e6:.1f} M), so decode, where the 49k-vocabulary LM head is a large share, stays below it.",
        "",
        "| model | prefill tok/s | decode tok/s | peak RSS (fresh process, VmHWM) |", "|---|---|---|---|",
        f"| original ({sp['layers'][0]} blocks) | {sp['prefill_tok_s']['orig']:.0f} | {sp['decode_tok_s']['orig']:.1f} | {sp['peak_rss_mib']['orig']:.0f} MiB |",
        f"| pruned ({sp['layers'][1]} blocks) | {sp['prefill_tok_s']['pruned']:.0f} | {sp['decode_tok_s']['pruned']:.1f} | {sp['peak_rss_mib']['pruned']:.0f} MiB |",
        "",
        f"Prefill speedup {sp['prefill_speedup']:.3f} = {sp['prefill_frac_ideal']:.1%} of ideal; decode {sp['decode_speedup']:.3f} = "
        f"{sp['decode_frac_ideal']:.1%} of ideal; peak RSS pruned ÷ original {sp['peak_rss_mib']['pruned'] / sp['peak_rss_mib']['orig']:.3f}.",
        "",
    ]


if __name__ == "__main__":
    sys.exit(child_main(child))
