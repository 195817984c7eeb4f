"""Token-weighted perplexity of a model on a list of texts, cached by content."""
from __future__ import annotations

import contextlib
import json
import math
from typing import Sequence

from ..io.cache import atomic_write_text, cache_dir, hash_bytes, stable_json
from .model_ref import _ModelRef
from .runner import CACHE_VERSION


def perplexity(
    model,
    tokenizer=None,
    texts: Sequence[str] = (),
    max_length: int = 512,
    batch_size: int = 8,
    device: str | None = None,
    use_cache: bool = True,
    progress: bool = True,
) -> dict[str, float]:
    """Token-weighted perplexity over `texts`: exp(sum of next-token NLL / number of predicted tokens).

    Each text is tokenized on its own (tokenizer's special tokens, truncated to max_length); token t
    predicts t+1, so a text of L tokens contributes L-1 predictions. Batches are right-padded and
    pad positions are masked out of both attention and loss, so batching does not change the result.
    Returns {"ppl", "nll" (mean NLL per predicted token), "tokens" (predicted tokens), "texts", "doc_nll" and
    "doc_tokens" (per text, in the order given: summed NLL and predicted tokens; 0 and 0 for a text under two
    tokens)}: the per-text sums let two models be compared paired over the same texts (report.heldout_log_ratio).
    Cached by content (weights + tokenizer hash, texts hash, max_length).
    """
    import torch
    import torch.nn.functional as F
    from tqdm.auto import tqdm

    texts = list(texts)
    ref = _ModelRef(model, tokenizer, device)
    tok = ref.tokenizer
    key = hash_bytes(stable_json({"v": CACHE_VERSION, "kind": "ppl-docs", "model": ref.identity(), "max_length": max_length,
                                  "texts": hash_bytes(stable_json(texts))}))
    path = cache_dir("eval") / f"ppl-{key}.json"
    if use_cache and path.is_file():
        with contextlib.suppress(OSError, json.JSONDecodeError):
            return json.loads(path.read_text())
    encoded = [tok(t, truncation=True, max_length=max_length)["input_ids"] for t in texts]
    order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    m = ref.model
    dev = next(m.parameters()).device
    doc_nll = [0.0] * len(encoded)
    doc_tok = [0] * len(encoded)
    batches = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    was_training = m.training
    m.eval()
    with torch.inference_mode():
        for idx in tqdm(batches, desc="perplexity", disable=not progress):
            idx = [i for i in idx if len(encoded[i]) >= 2]
            seqs = [encoded[i] for i in idx]
            if not seqs:
                continue
            L = max(len(s) for s in seqs)
            ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
            mask = torch.zeros((len(seqs), L), dtype=torch.long)
            for r, s in enumerate(seqs):
                ids[r, : len(s)] = torch.tensor(s)
                mask[r, : len(s)] = 1
            ids, mask = ids.to(dev), mask.to(dev)
            logits = m(input_ids=ids, attention_mask=mask).logits.float()
            labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
            nll = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=-100,
                                  reduction="none").view(labels.shape)  # (N, C) rows: 2× faster on CPU than (N, C, L)
            for r, i in enumerate(idx):
                doc_nll[i] = float(nll[r].double().sum())
                doc_tok[i] = int((labels[r] != -100).sum())
    if was_training:
        m.train()
    total_nll, total_tok = math.fsum(doc_nll), sum(doc_tok)
    if total_tok == 0:
        raise ValueError("perplexity: no text has two or more tokens")
    mean = total_nll / total_tok
    out = {"ppl": math.exp(mean), "nll": mean, "tokens": total_tok, "texts": len(texts), "doc_nll": doc_nll, "doc_tokens": doc_tok}
    atomic_write_text(path, json.dumps(out))
    return out
