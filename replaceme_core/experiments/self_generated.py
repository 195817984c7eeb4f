"""Self-generated calibration data (the paper's "orca_generated", Table 4).

The unpruned model answers the instruction prompts itself (greedy decoding), and each prompt plus
the model's own answer is rendered as one chat-templated calibration text, exactly like an
instruction/response pair of the packaged corpus (:func:`replaceme_core.io.data.render_pair`).

Generation is the expensive part, so answers are cached on disk by content: the model's weights
hash, the tokenizer, the exact prompts and every decoding setting. A re-run with the same inputs
reads the cache and performs no forward pass.
"""
from __future__ import annotations

import json
import time
from typing import Sequence

import torch
from tqdm.auto import tqdm

from ..io.cache import atomic_write_text, cache_dir, hash_bytes, stable_json

CACHE_VERSION = 1


def instruction_prompts(source: str, num_samples: int, seed: int = 0) -> list[str]:
    """The user prompts of the first `num_samples` records of an instruction corpus, in calibration order.

    Uses the same shuffling as :func:`replaceme_core.io.data.load_texts` (``random.Random(seed)`` over the
    train split), so prompt k here is the prompt of calibration text k there.
    """
    import random

    from .. import assets
    from ..io.data import PACKAGED_SOURCES, DataSourceError

    if source not in PACKAGED_SOURCES or len(PACKAGED_SOURCES[source]) != 1:
        raise DataSourceError(f"self-generation needs a packaged instruction corpus (e.g. 'olmo-instructions'), got {source!r}")
    records = assets.corpus(PACKAGED_SOURCES[source][0], "train")
    if not records or "prompt" not in records[0]:
        raise DataSourceError(f"corpus {source!r} has no instruction prompts (its records are plain text)")
    if num_samples > len(records):
        raise DataSourceError(f"corpus {source!r} has only {len(records)} records, {num_samples} prompts requested")
    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    return [records[i]["prompt"] for i in order[:num_samples]]


def prompt_ids(tokenizer, prompt: str) -> list[int]:
    """Token ids of the chat-formatted prompt with the assistant header appended (generation starts there),
    tokenised the way :func:`replaceme_core.io.data.token_batches` tokenises calibration texts (one BOS)."""
    from ..io.data import _strip_double_bos, strip_default_system

    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": prompt}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        text = strip_default_system(tokenizer, messages, text, add_generation_prompt=True)  # as data.render_messages
    else:
        text = "### Instruction:\n" + prompt + "\n\n### Response:\n"
    return tokenizer(_strip_double_bos([text], tokenizer)[0])["input_ids"]


def generate_answers(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    batch_size: int = 8,
    max_prompt_tokens: int = 512,
    weights_hash: str | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> list[str]:
    """Greedy answers of `model` to `prompts` (batched, left-padded), cached on disk by content.

    Each answer is decoded without special tokens and stripped; generation stops at the tokenizer's
    eos token or after `max_new_tokens`. `weights_hash` (e.g. ``Workbench.weights_hash``) saves
    re-hashing the model for the cache key.
    """
    from ..evaluation.model_ref import hash_state_dict, hash_tokenizer

    prompts = list(prompts)
    if not prompts:
        raise ValueError("generate_answers: no prompts given")
    if max_new_tokens <= 0 or batch_size <= 0 or max_prompt_tokens <= 0:
        raise ValueError("max_new_tokens, batch_size and max_prompt_tokens must be positive")
    key = hash_bytes(stable_json({
        "v": CACHE_VERSION, "weights": weights_hash or hash_state_dict(model), "tokenizer": hash_tokenizer(tokenizer),
        "prompts": hash_bytes(stable_json(prompts)), "max_new_tokens": max_new_tokens, "max_prompt_tokens": max_prompt_tokens,
        "batch_size": batch_size, "decoding": "greedy",
    }))
    path = cache_dir("generated") / f"{key[:32]}.json"
    if use_cache and path.is_file():
        try:
            data = json.loads(path.read_text())
            if len(data["answers"]) == len(prompts):
                return list(data["answers"])
        except (OSError, json.JSONDecodeError, KeyError):
            pass

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has neither a pad nor an eos token; cannot batch prompts")
    encoded = [prompt_ids(tokenizer, p) for p in prompts]
    encoded = [e[-max_prompt_tokens:] for e in encoded]  # long prompts keep their end (the input, the assistant header)
    # longest prompts first: batches of similar length waste less padding
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    answers: list[str | None] = [None] * len(prompts)
    # answers of finished batches survive an interruption: a re-run resumes after the last finished batch
    partial = path.with_name(path.stem + ".partial.json")
    if use_cache and partial.is_file():
        try:
            for i, a in json.loads(partial.read_text()).items():
                answers[int(i)] = a
        except (OSError, json.JSONDecodeError, ValueError, IndexError):
            answers = [None] * len(prompts)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    new_tokens = 0
    try:
        with torch.inference_mode():
            for s in tqdm(range(0, len(order), batch_size), desc=f"self-generation ({len(prompts)} prompts)", disable=not progress):
                idx = order[s: s + batch_size]
                if all(answers[i] is not None for i in idx):
                    continue
                width = max(len(encoded[i]) for i in idx)
                ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for r, i in enumerate(idx):  # left padding: every prompt ends where generation starts
                    ids[r, width - len(encoded[i]):] = torch.tensor(encoded[i])
                    mask[r, width - len(encoded[i]):] = 1
                out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                     max_new_tokens=max_new_tokens, pad_token_id=pad_id,
                                     eos_token_id=tokenizer.eos_token_id)
                gen = out[:, width:].cpu()
                for r, i in enumerate(idx):
                    row = gen[r].tolist()
                    if tokenizer.eos_token_id in row:
                        row = row[: row.index(tokenizer.eos_token_id)]
                    new_tokens += len(row)
                    answers[i] = tokenizer.decode(row, skip_special_tokens=True).strip()
                atomic_write_text(partial, json.dumps({str(i): a for i, a in enumerate(answers) if a is not None}))
    finally:
        if was_training:
            model.train()
    atomic_write_text(path, json.dumps({"answers": answers, "prompts": len(prompts), "max_new_tokens": max_new_tokens,
                                        "new_tokens": new_tokens, "seconds": time.perf_counter() - t0}))
    partial.unlink(missing_ok=True)
    return list(answers)


def self_generated_texts(
    model,
    tokenizer,
    source: str,
    num_samples: int,
    seed: int = 0,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    max_length: int | None = None,
    chat: str = "auto",
    weights_hash: str | None = None,
    progress: bool = True,
) -> tuple[list[str], dict]:
    """Calibration texts: prompt k of `source` + the model's own greedy answer, rendered like the corpus pairs.

    `max_length` (the calibration truncation length): a prompt whose formatted length already reaches it
    would have any answer truncated away, so it is not generated for (its text is the prompt with an empty
    answer, which gives the same calibration tokens). Returns (texts, info) with info = {"prompts",
    "generated" (prompts answered), "answer_tokens" (mean tokens per generated answer), "empty"}.
    The number of texts is always `num_samples`, in the same order as ``load_texts(source, ...)``.
    """
    from ..io.data import render_pair

    prompts = instruction_prompts(source, num_samples, seed)
    lengths = [len(prompt_ids(tokenizer, p)) for p in prompts]
    todo = [i for i, n in enumerate(lengths) if max_length is None or n < max_length]
    answers = [""] * len(prompts)
    if todo:
        got = generate_answers(model, tokenizer, [prompts[i] for i in todo], max_new_tokens=max_new_tokens,
                               batch_size=batch_size, max_prompt_tokens=max_length or 4096, weights_hash=weights_hash,
                               progress=progress)
        for i, a in zip(todo, got):
            answers[i] = a
    texts = [render_pair(p, a, tokenizer, chat) for p, a in zip(prompts, answers)]
    tok = [len(tokenizer(answers[i], add_special_tokens=False)["input_ids"]) for i in todo]
    info = {"prompts": len(prompts), "generated": len(todo), "answer_tokens": (sum(tok) / len(tok)) if tok else 0.0,
            "empty": sum(1 for i in todo if not answers[i])}
    return texts, info
