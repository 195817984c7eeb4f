"""A faster lm-eval backend for causal LMs: each distinct context runs once, the head runs only where scored.

Why: lm-eval's ``HFLM`` scores every (context, continuation) pair as a separate full sequence. A 4-choice question
therefore sends its (often long, few-shot) context through the transformer blocks 4 times, and the LM head — a
49k to 262k wide matmul plus log-softmax for the model families we prune — is computed at *every* position although
only the continuation positions are read. Both dominate evaluation time on small and pruned models.

``SharedContextHFLM`` (registered in lm-eval as ``replaceme``) is an ``HFLM`` that returns the same numbers faster:

* requests are grouped by their context tokens, and each distinct context ``c`` goes through the blocks once. Where
  the family takes a custom 4D attention mask (``PACKED_MODEL_TYPES``, sdpa or eager attention, no binding sliding
  window), a group is one *packed* row ``c + x1[:-1] + x2[:-1] + ...``: every continuation's segment attends to the
  context and to itself, at the positions it would have right after ``c``, and the first token of every
  continuation is read from ``c``'s last position, so one forward pass scores the whole group, rows sorted by length
  as HFLM sorts them. Otherwise (and for alibi models) ``c[:-1]`` is prefilled (left-padded, explicit positions,
  ``use_cache=True``) and its KV cache repeated across the continuations, run as ``[c[-1]] + continuation[:-1]``;
* the base model (``model.base_model``) returns hidden states, and the head (``get_output_embeddings()``, then the
  family's final logit soft-capping) is applied only to the gathered scored positions;
* tokenisation is ``HFLM``'s own (``loglikelihood`` and ``_encode_pair`` are inherited, including the empty-context
  prefix token and the move of trailing context whitespace into the continuation), and so is the left truncation of
  over-long requests, which is reproduced by left-truncating the context;
* ``loglikelihood_rolling`` uses lm-eval's own rolling windows and scores them with the same machinery;
  ``generate_until`` is ``HFLM``'s.

One known difference: HFLM's one-token logits cache (``logits_cache=True``, its default) mis-scores a request whose
``context + continuation[:-1]`` equals another's while its continuation is shorter (e.g. ``("", "the cat")`` next to
``("the", " cat")``, or rolling windows of repetitive texts): it reads the shorter one's log-probs from the front of
the longer one's logits. Here such a request gets what HFLM gives it alone (or with ``logits_cache=False``).

Device, dtype, batch size, ``softmax_dtype`` and ``mixed_precision_dtype`` come from the usual ``HFLM`` arguments.
Nothing is cached across calls. Families whose logits are not exactly ``head(base(x))`` (anything outside
``HEAD_ONLY_MODEL_TYPES``, PEFT wrappers, ...) fall back to the model's full forward, still sharing contexts.

Command line: lm-eval 0.4.13 has no plugin mechanism (no entry-point scan; ``get_model`` only knows what was
imported), so ``lm_eval --model replaceme`` cannot find a class in another package. This module is the wrapper:
``python -m replaceme_core.evaluation.shared_context --model replaceme --model_args pretrained=DIR --tasks ...``
takes exactly lm-eval's command-line arguments. From Python, importing this module registers the name.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
import transformers
from lm_eval import utils as lm_utils
from lm_eval.api.registry import register_model
from lm_eval.models.huggingface import HFLM
from tqdm import tqdm

from .prefix import kept_outputs, prefix_output, replayed

log = logging.getLogger(__name__)

MODEL_NAME = "replaceme"

# Families whose causal-LM forward is exactly `head(base_model(x))` (+ `final_logit_softcapping` where configured).
HEAD_ONLY_MODEL_TYPES = frozenset(
    {"llama", "mistral", "qwen2", "qwen3", "phi3", "gpt2", "gpt_neox", "opt", "falcon", "gemma3_text"}
)

# Families that also take a custom 4D attention mask with explicit positions as-is (checked for every one of them in
# tests/test_shared_context.py; falcon only without alibi): today all the head-only ones.
PACKED_MODEL_TYPES = HEAD_ONLY_MODEL_TYPES

# Padded tokens per packed forward on a CPU (bench/eval_backend.py, SmolLM2-135M, 2 cores: 4 rows of SciQ's ~300 tokens
# ran 2x slower than 1-2, 16 rows of ARC's ~45 tokens 1.4x slower than 4).
CPU_PACKED_TOKENS = 512

# Any valid embedding index: padded positions are masked out and never scored.
PAD_ID = 0
# Scored positions per head call: bounds the positions x vocabulary logits (262k wide for Gemma 3).
HEAD_CHUNK = 1024

# (request key, context tokens, continuation tokens), as lm-eval's TemplateLM hands them over.
TokenRequest = tuple[tuple[str, str] | None, list[int], list[int]]


@dataclass
class ContextGroup:
    """One distinct (already left-truncated) context; its distinct continuations -> the requests asking for them."""

    tokens: tuple[int, ...]
    continuations: dict[tuple[int, ...], list[int]] = field(default_factory=dict)

    def add(self, continuation: tuple[int, ...], request_index: int) -> None:
        self.continuations.setdefault(continuation, []).append(request_index)

    @property
    def packed_length(self) -> int:
        """Length of the group as one packed sequence: the context, then every continuation but its last token."""
        return len(self.tokens) + sum(len(c) - 1 for c in self.continuations)

    @property
    def sort_key(self):
        """Longest contexts first (the prefill pads to them), then longest continuations; one-token contexts last."""
        return -len(self.tokens), -max(map(len, self.continuations)), self.tokens


def truncated_context(context: list[int], continuation: list[int], max_length: int) -> tuple[int, ...]:
    """HFLM's left truncation, seen from the context: it scores `(context + continuation)[-(max_length + 1):]`, so
    the continuation is kept whole and the context keeps its last `max_length + 1 - len(continuation)` tokens."""
    assert len(context) > 0, "context must hold at least one token"
    assert 0 < len(continuation) <= max_length, "continuation must hold 1..max_length tokens"
    return tuple(context[-(max_length + 1 - len(continuation)):])


def group_by_context(requests: list[TokenRequest], max_length: int) -> list[ContextGroup]:
    """Distinct contexts with their distinct continuations, longest first (as HFLM orders its requests)."""
    groups: dict[tuple[int, ...], ContextGroup] = {}
    n_truncated = 0
    for i, (_, context, continuation) in enumerate(requests):
        tokens = truncated_context(context, continuation, max_length)
        n_truncated += len(tokens) < len(context)
        groups.setdefault(tokens, ContextGroup(tokens)).add(tuple(continuation), i)
    if n_truncated:
        log.warning("%d request(s) exceed the maximum length %d; their contexts were truncated from the left.",
                    n_truncated, max_length)
    return sorted(groups.values(), key=lambda g: g.sort_key)


def pack(groups: list[ContextGroup], rows: int) -> list[list[ContextGroup]]:
    """Consecutive groups whose continuations total at most `rows` (a bigger group goes alone). One-token contexts
    (nothing to prefill) are never mixed with longer ones, so no prefill row is all padding."""
    chunks: list[list[ContextGroup]] = []
    size = 0
    for group in groups:
        n = len(group.continuations)
        full = size + n > rows
        if not chunks or full or (len(group.tokens) == 1) != (len(chunks[-1][0].tokens) == 1):
            chunks.append([])
            size = 0
        chunks[-1].append(group)
        size += n
    return chunks


def pad(seqs: list[tuple[int, ...]], side: str, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask) of the sequences padded on `side` to the longest one."""
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), PAD_ID, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        cols = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, cols] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, cols] = 1
    return ids.to(device), mask.to(device)


@dataclass
class PackedBatch:
    """Groups as packed rows: `context + c1[:-1] + c2[:-1] + ...`, each continuation's segment seeing the context
    and itself only, at the positions it would have right after the context. The first token of every continuation
    is predicted at the context's last position, so that position goes through the head once for all of them."""

    ids: torch.Tensor          # (rows, width), right-padded
    positions: torch.Tensor    # (rows, width); padding repeats the row's last position
    segments: torch.Tensor     # (rows, width): 0 context, k > 0 the k-th continuation's segment, -1 padding
    head_at: torch.Tensor      # (positions, 2): (row, column) of every position whose logits are needed
    token_head: torch.Tensor   # per scored token: its row in `head_at`
    token_target: torch.Tensor  # per scored token: the token id it must predict
    token_owner: torch.Tensor  # per scored token: the index of its continuation in `owners`
    owners: list[list[int]]    # per continuation: the request indices asking for it

    def attention(self) -> torch.Tensor:
        """(rows, 1, width, width) bool, True where a query may attend to a key: causal, and within the context or
        its own segment. Padding queries see the context (no all-masked row, so no NaN anywhere)."""
        cols = torch.arange(self.ids.shape[1], device=self.ids.device)
        seg_q, seg_k = self.segments[:, :, None], self.segments[:, None, :]
        allowed = (cols[:, None] >= cols[None, :]) & (seg_k >= 0) & ((seg_k == 0) | (seg_k == seg_q))
        return allowed[:, None]


def packed_batch(groups: list[ContextGroup], device) -> PackedBatch:
    width = max(g.packed_length for g in groups)
    ids = torch.full((len(groups), width), PAD_ID, dtype=torch.long)
    positions = torch.zeros((len(groups), width), dtype=torch.long)
    segments = torch.full((len(groups), width), -1, dtype=torch.long)
    head_at, token_head, token_target, token_owner, owners = [], [], [], [], []
    for row, group in enumerate(groups):
        n_ctx = len(group.tokens)
        ids[row, :n_ctx] = torch.as_tensor(group.tokens)
        positions[row, :n_ctx] = torch.arange(n_ctx)
        segments[row, :n_ctx] = 0
        context_head = len(head_at)
        head_at.append((row, n_ctx - 1))
        col = n_ctx
        for seg, (cont, requests) in enumerate(group.continuations.items(), start=1):
            n = len(cont) - 1
            ids[row, col:col + n] = torch.as_tensor(cont[:-1], dtype=torch.long)
            positions[row, col:col + n] = torch.arange(n_ctx, n_ctx + n)
            segments[row, col:col + n] = seg
            owner = len(owners)
            owners.append(requests)
            token_head.append(context_head)
            token_target.append(cont[0])
            token_owner.append(owner)
            for j in range(n):  # position col + j predicts cont[j + 1]
                token_head.append(len(head_at))
                head_at.append((row, col + j))
                token_target.append(cont[j + 1])
                token_owner.append(owner)
            col += n
        positions[row, col:] = positions[row, col - 1]
    as_long = functools.partial(torch.tensor, dtype=torch.long, device=device)
    return PackedBatch(ids.to(device), positions.to(device), segments.to(device), as_long(head_at),
                       as_long(token_head), as_long(token_target), as_long(token_owner), owners)


def per_row(picked: torch.Tensor, greedy: torch.Tensor, scored: torch.Tensor) -> list[tuple[float, bool]]:
    """(sum of a row's target log-probs, all of them greedy) per row; summed in the log-prob dtype, as HFLM does."""
    logprob = torch.zeros(scored.shape, dtype=picked.dtype, device=picked.device)
    logprob[scored.to(picked.device)] = picked
    all_greedy = torch.ones(scored.shape, dtype=torch.bool, device=picked.device)
    all_greedy[scored.to(picked.device)] = greedy
    return list(zip(logprob.sum(-1).tolist(), all_greedy.all(-1).tolist()))


def cache_argument(module: torch.nn.Module) -> str:
    """The keyword a forward takes its KV cache under (`cache` in transformers 5, `past_key_values` before)."""
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def cache_of(output):
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)


class SharedContextHFLM(HFLM):
    """``HFLM`` whose log-likelihoods run each distinct context once and the LM head only on scored positions."""

    head_only_model_types = HEAD_ONLY_MODEL_TYPES
    packed_model_types = PACKED_MODEL_TYPES
    #: a `request_store.RequestStore` of this model's answers: requests found there are not scored again
    request_store = None

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        if self.request_store is None:
            return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
        return self.request_store.answer("loglikelihood", requests,
                                         lambda todo: super(SharedContextHFLM, self).loglikelihood(todo, disable_tqdm))

    # ---- log-likelihood ------------------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests: list[TokenRequest], disable_tqdm: bool = False,
                              override_bs: int | None = None) -> list[tuple[float, bool]]:
        if self.backend != "causal":
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        if not requests:
            return []
        rows = self._rows_per_batch(requests, override_bs)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        pbar = tqdm(total=len(requests), disable=(disable_tqdm or self.rank != 0),
                    desc="Running loglikelihood requests (shared contexts)")
        packed, two_phase = [], []
        for group in group_by_context(requests, self.max_length):
            (packed if self._packable(group) else two_phase).append(group)
        packed.sort(key=lambda g: -g.packed_length)  # as HFLM sorts: rows of similar length, little padding
        batches = [(self._score_packed, chunk) for chunk in self._packed_batches(packed, rows)]
        batches += [(functools.partial(self._score_chunk, rows=rows), chunk) for chunk in pack(two_phase, rows)]
        with self._inference():
            for score, chunk in batches:
                for owners, answer in score(chunk):
                    for i in owners:
                        results[i] = answer
                        if requests[i][0] is not None:
                            self.cache_hook.add_partial("loglikelihood", requests[i][0], answer)
                    pbar.update(len(owners))
        pbar.close()
        return results

    def _rows_per_batch(self, requests: list[TokenRequest], override_bs: int | None) -> int:
        """`batch_size` continuation rows per forward; "auto" probes HFLM's detector on the longest request."""
        if self.batch_size != "auto":
            return int(self.batch_size)
        if override_bs:
            return int(override_bs)
        longest = max(requests, key=lambda r: len(r[1]) + len(r[2]))
        return self._detect_batch_size([longest], 0)

    @contextlib.contextmanager
    def _inference(self):
        with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                             enabled=self.mixed_precision_dtype is not None):
            yield

    def _packable(self, group: ContextGroup) -> bool:
        """One packed sequence gives HFLM's numbers when the model takes a custom 4D mask with explicit positions
        (`PACKED_MODEL_TYPES`, sdpa or eager attention), its head can be split off, the packed row fits the
        context window, and a sliding window (if any) never binds (one mask then serves full and sliding layers)."""
        config = self.model.config
        if getattr(config, "model_type", None) not in self.packed_model_types or getattr(config, "alibi", False):
            return False
        if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager") or self._split_head() is None:
            return False
        if group.packed_length > self.max_length:
            return False
        window = getattr(config, "sliding_window", None)
        last_position = len(group.tokens) + max(map(len, group.continuations)) - 2
        return window is None or last_position < window

    def _packed_batches(self, groups: list[ContextGroup], rows: int) -> list[list[ContextGroup]]:
        """At most `rows` packed rows per forward, and on a CPU at most CPU_PACKED_TOKENS padded tokens (a row
        alone may exceed it): the segment mask sends attention down the explicit-mask path, whose cost and memory
        grow with rows × width², and on a CPU small forwards are faster (measured with bench/eval_backend.py)."""
        budget = CPU_PACKED_TOKENS if self.device.type == "cpu" else None
        batches: list[list[ContextGroup]] = []
        for group in groups:  # longest first: the first row of a batch sets its width
            if batches and len(batches[-1]) < rows and (
                    budget is None or (len(batches[-1]) + 1) * batches[-1][0].packed_length <= budget):
                batches[-1].append(group)
            else:
                batches.append([group])
        return batches

    def _score_packed(self, groups: list[ContextGroup]):
        """Yield (request indices, (loglikelihood, is_greedy)) for every continuation of the packed groups."""
        batch = packed_batch(groups, self.device)
        yield from zip(batch.owners, self._packed_answers(self.model, batch))

    def _packed_states(self, model, batch: PackedBatch) -> torch.Tensor:
        """`model`'s last hidden states (before the head) on a packed batch."""
        base, _ = self._split_head(model)
        allowed = batch.attention()
        if model.config._attn_implementation == "eager":  # eager attention adds the mask to its scores
            dtype = next(base.parameters()).dtype
            allowed = torch.zeros(allowed.shape, dtype=dtype, device=self.device).masked_fill(
                ~allowed, torch.finfo(dtype).min)
        return base(input_ids=batch.ids, attention_mask=allowed, position_ids=batch.positions,
                    use_cache=False).last_hidden_state

    def _packed_answers(self, model, batch: PackedBatch, prefix=None, shared: int = 0) -> list[tuple[float, bool]]:
        """(loglikelihood, is_greedy) of every continuation of a packed batch under `model`; with `prefix` (what block
        `shared`-1 returned on this batch, from a model equal to `model` up to there) its first blocks are not rerun."""
        _, head = self._split_head(model)
        if prefix is None:
            states = self._packed_states(model, batch)
        else:
            with replayed(model, shared, prefix):
                states = self._packed_states(model, batch)
        hidden = states[batch.head_at[:, 0].to(states.device), batch.head_at[:, 1].to(states.device)]
        picked, greedy = self._token_scores(hidden, batch.token_head, batch.token_target,
                                            functools.partial(self._head, head, model=model))
        owner = batch.token_owner.to(picked.device)
        total = torch.zeros(len(batch.owners), dtype=picked.dtype, device=picked.device).index_add_(0, owner, picked)
        misses = torch.zeros(len(batch.owners), dtype=torch.long, device=picked.device).index_add_(
            0, owner, (~greedy).long())
        return list(zip(total.tolist(), (misses == 0).tolist()))

    def _token_scores(self, hidden: torch.Tensor, token_head: torch.Tensor, targets: torch.Tensor, head):
        """(target log-prob, target is the argmax) per scored token, where token i reads the head's output at
        `hidden[token_head[i]]` (`hidden` already logits when `head` is None); HEAD_CHUNK positions through the head
        at a time, so positions x vocabulary stays bounded; log-softmax in HFLM's `softmax_dtype`."""
        token_head, targets = token_head.to(hidden.device), targets.to(hidden.device)
        picked, greedy = [], []
        for s in range(0, hidden.shape[0], HEAD_CHUNK):
            chunk = hidden[s:s + HEAD_CHUNK]
            logprobs = F.log_softmax(chunk if head is None else head(chunk), dim=-1, dtype=self.softmax_dtype)
            here = (token_head >= s) & (token_head < s + HEAD_CHUNK)
            rows, t = (token_head[here] - s).to(logprobs.device), targets[here].to(logprobs.device)
            picked.append((here.nonzero().squeeze(-1), logprobs[rows, t]))
            greedy.append(logprobs[rows].argmax(-1) == t)
        order = torch.cat([i for i, _ in picked]).argsort()  # chunks cover the tokens in head order: restore theirs
        return torch.cat([v for _, v in picked])[order.to(picked[0][1].device)], torch.cat(greedy)[order.to(greedy[0].device)]

    def _score_chunk(self, chunk: list[ContextGroup], rows: int):
        """Yield (request indices, (loglikelihood, is_greedy)) for every continuation of the chunk's contexts."""
        cache, prefix_mask = self._prefill(chunk)
        work = [(g, cont, owners) for g, group in enumerate(chunk) for cont, owners in group.continuations.items()]
        for start in range(0, len(work), rows):
            batch = work[start:start + rows]
            last = start + rows >= len(work)
            # the continuation pass grows and re-indexes the cache: keep the prefill intact for later batches
            batch_cache = cache if (last or cache is None) else copy.deepcopy(cache)
            scores = self._score_continuations(chunk, batch, batch_cache, prefix_mask)
            yield from zip((owners for _, _, owners in batch), scores)

    def _prefill(self, chunk: list[ContextGroup], model=None):
        """Run every context but its last token through the blocks once; (KV cache, prefix mask) or (None, None).
        `model`: this backend's own model unless given (a grouped model sharing its prefix, see GroupedHFLM)."""
        model = self.model if model is None else model
        prefixes = [group.tokens[:-1] for group in chunk]
        if not any(prefixes):
            return None, None
        ids, mask = pad(prefixes, "left", self.device)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        split = self._split_head(model)
        if split is not None:
            out = self._forward(split[0], ids, mask, positions, None)
        else:
            extra = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
            out = self._forward(model, ids, mask, positions, None, **extra)
        return cache_of(out), mask

    def _score_continuations(self, chunk, batch, cache, prefix_mask, model=None) -> list[tuple[float, bool]]:
        """Feed `[context[-1]] + continuation[:-1]` for each row on top of its context's cache; score the head
        (of `model`, this backend's own model unless given)."""
        model = self.model if model is None else model
        ids, mask, positions = self._continuation_inputs(chunk, batch)
        if cache is not None:
            group_index = torch.tensor([g for g, _, _ in batch], dtype=torch.long, device=self.device)
            cache.reorder_cache(group_index)
            mask = torch.cat([prefix_mask[group_index], mask], dim=-1)
        targets, scored = pad([cont for _, cont, _ in batch], "right", self.device)
        scored = scored.bool()
        split, grow = self._split_head(model), cache is not None  # without a prefix there is no cache worth growing
        if split is not None:
            states = self._forward(split[0], ids, mask, positions, cache, use_cache=grow).last_hidden_state
            head = functools.partial(self._head, split[1], model=model)
        else:
            states = self._forward(model, ids, mask, positions, cache, use_cache=grow).logits
            head = None  # the full forward already applied it
        picked, greedy = self._position_scores(states[scored.to(states.device)], targets[scored], head)
        return per_row(picked, greedy, scored)

    def _continuation_inputs(self, chunk, batch):
        """Right-padded `[context[-1]] + continuation[:-1]` rows, positioned right after their context's prefix."""
        ids, mask = pad([(chunk[g].tokens[-1],) + cont[:-1] for g, cont, _ in batch], "right", self.device)
        start = torch.tensor([len(chunk[g].tokens) - 1 for g, _, _ in batch], device=self.device)
        last = start + mask.sum(-1) - 1  # padding repeats the last real position: absolute embeddings stay in range
        positions = torch.minimum(start[:, None] + torch.arange(ids.shape[1], device=self.device), last[:, None])
        return ids, mask, positions

    def _position_scores(self, states: torch.Tensor, targets: torch.Tensor, head=None):
        """(target log-prob, target is the argmax) at each scored position: `_token_scores` with one token per
        position (from logits when `head` is None)."""
        return self._token_scores(states, torch.arange(len(targets), device=states.device), targets, head)

    # ---- the model, split into trunk and head ---------------------------------------------------------------------

    def _split_head(self, model=None):
        """(base model, head) when the family's logits are exactly `head(base(x))` (+ soft-capping), else None."""
        model = self.model if model is None else model
        if not isinstance(model, transformers.PreTrainedModel):
            return None  # e.g. a PEFT wrapper
        if getattr(model.config, "model_type", None) not in self.head_only_model_types:
            return None
        if not type(model).__name__.endswith(("ForCausalLM", "LMHeadModel")):
            return None
        base, head = model.base_model, model.get_output_embeddings()
        if base is model or head is None:
            return None
        return base, head

    def _head(self, head: torch.nn.Module, hidden: torch.Tensor, model=None) -> torch.Tensor:
        """The LM head on gathered hidden states, with the final logit soft-capping of Gemma-style configs."""
        logits = head(hidden)
        cap = getattr((self.model if model is None else model).config, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    @staticmethod
    def _forward(module, ids, mask, positions, cache, use_cache: bool = True, **extra):
        kwargs = {cache_argument(module): cache} if cache is not None else {}
        return module(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=use_cache, **kwargs,
                      **extra)

    # ---- rolling log-likelihood -----------------------------------------------------------------------------------

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """HFLM's disjoint rolling windows (lm-eval's utils), all scored in one shared-context pass."""
        if self.request_store is not None:
            return self.request_store.answer("loglikelihood_rolling", requests,
                                             lambda todo: self._rolling(todo, disable_tqdm))
        return self._rolling(requests, disable_tqdm)

    def _rolling(self, requests, disable_tqdm: bool) -> list[float]:
        windows: list[TokenRequest] = []
        owners: list[int] = []
        for i, (string,) in enumerate(tqdm([req.args for req in requests], desc="Splitting rolling windows",
                                           disable=(disable_tqdm or self.rank != 0))):
            for context, continuation in self._rolling_windows(string):
                windows.append((None, context, continuation))
                owners.append(i)
        n_real = len(windows)
        windows += self._rank_padding(windows)
        scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)[:n_real]
        totals = [0.0] * len(requests)
        for i, (ll, _) in zip(owners, scores):
            totals[i] += ll
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    def _rolling_windows(self, string: str) -> list[tuple[list[int], list[int]]]:
        windows = lm_utils.get_rolling_token_windows(token_list=self.tok_encode(string),
                                                     prefix_token=self.prefix_token_id,
                                                     max_seq_len=self.max_length, context_len=1)
        return [lm_utils.make_disjoint_window(w) for w in windows]

    def _rank_padding(self, windows: list[TokenRequest]) -> list[TokenRequest]:
        """Under data parallelism every rank runs as many windows as the busiest one (results discarded)."""
        if self.world_size <= 1:
            return []
        counts = self.all_gather(torch.tensor(len(windows), device=self.device)).cpu().tolist()
        return [windows[0]] * (max(counts) - len(windows))


class GroupedHFLM(SharedContextHFLM):
    """``SharedContextHFLM`` that, on every batch it scores for its own model, also scores the same batch for
    `others` — models equal to its own in their embedding and first `shared` blocks (checked by content hash before
    a group is formed: `prefix.block_hashes`) — computing those blocks once. Their answers go into their request
    stores (`request_store.RequestStore`), so when their own evaluation runs, lm-eval finds every such request cached.
    Packed batches stop its own forward after the shared blocks (`prefix.prefix_output`); two-phase (KV-cache) chunks
    run its own forwards whole and keep the shared blocks' output and KV for the others (`_score_chunk`). Where a
    model's head does not split off (full-forward families), its two-phase batches are scored in its own turn."""

    def set_group(self, others: list, shared: int) -> None:
        """`others`: [(model, RequestStore)] sharing `shared` >= 1 leading blocks with this model."""
        self.group_others, self.group_shared = list(others), int(shared)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs=None):
        self._group_requests = requests
        try:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        finally:
            for _, store in getattr(self, "group_others", []):
                store.commit()

    def _score_packed(self, groups: list[ContextGroup]):
        others = getattr(self, "group_others", [])
        if not others:
            yield from super()._score_packed(groups)
            return
        batch = packed_batch(groups, self.device)
        k = self.group_shared
        prefix = prefix_output(self.model, k, lambda m: self._packed_states(m, batch)) if k else None
        answers = self._packed_answers(self.model, batch, prefix, k)
        for model, store in others:
            for owners, answer in zip(batch.owners, self._packed_answers(model, batch, prefix, k)):
                for i in owners:
                    if self._group_requests[i][0] is not None:
                        store["loglikelihood", self._group_requests[i][0]] = answer
        yield from zip(batch.owners, answers)

    def _score_chunk(self, chunk: list[ContextGroup], rows: int):
        """The two-phase path, shared: this model's own prefill and continuation forwards run whole (its KV cache
        complete, its numbers unchanged) while block `shared`-1's output is kept from each; then every other member
        replays those outputs for its blocks 0..`shared`-1, runs its own blocks after them and takes this model's KV
        of the shared blocks (the same blocks on the same inputs: the same keys and values) for its cache. Memory:
        the kept outputs of one chunk (its prefill, then each continuation batch: rows x width x hidden), the shared
        blocks' prefill KV, and one other member's KV cache at a time. Members whose head does not split off (full
        forward families) score their two-phase batches in their own turn."""
        k = self.group_shared if self._split_head() is not None else 0
        others = [(m, s) for m, s in getattr(self, "group_others", []) if k and self._split_head(m) is not None]
        if not others:
            yield from super()._score_chunk(chunk, rows)
            return
        work = [(g, cont, owners) for g, group in enumerate(chunk) for cont, owners in group.continuations.items()]
        batches = [work[start:start + rows] for start in range(0, len(work), rows)]
        answers = []
        with kept_outputs(self.model, k) as kept:
            cache, prefix_mask = self._prefill(chunk)
            prefill_kept = kept.pop() if cache is not None else None
            # the continuation passes below re-index and grow the shared layers' KV: keep the prefill's for the others
            shared_kv = None if cache is None else [copy.deepcopy(layer) for layer in cache.layers[:k]]
            for n, batch in enumerate(batches):
                batch_cache = cache if (n == len(batches) - 1 or cache is None) else copy.deepcopy(cache)
                answers.append(self._score_continuations(chunk, batch, batch_cache, prefix_mask))
        assert len(kept) == len(batches), "block outputs kept and continuation batches disagree"
        for o, (model, store) in enumerate(others):
            cache = None
            if prefill_kept is not None:
                with replayed(model, k, prefill_kept):
                    cache, _ = self._prefill(chunk, model=model)
                # its stand-ins filled none of the shared layers' KV: take the leader's (equal), the last one as is
                cache.layers[:k] = shared_kv if o == len(others) - 1 else copy.deepcopy(shared_kv)
            for n, (batch, output) in enumerate(zip(batches, kept)):
                batch_cache = cache if (n == len(batches) - 1 or cache is None) else copy.deepcopy(cache)
                with replayed(model, k, output):
                    scores = self._score_continuations(chunk, batch, batch_cache, prefix_mask, model=model)
                for (_, _, owners), answer in zip(batch, scores):
                    for i in owners:
                        if self._group_requests[i][0] is not None:
                            store["loglikelihood", self._group_requests[i][0]] = answer
        for batch, scores in zip(batches, answers):
            yield from zip((owners for _, _, owners in batch), scores)


def hflm_token_pairs(lm: HFLM, requests) -> list[tuple[list[int], list[int]]]:
    """HFLM's own (context, continuation) tokens of lm-eval requests, captured where it hands them to its scorer
    (nothing is scored): what both backends see, for counting tokens and comparing requests."""
    captured: list[tuple[list[int], list[int]]] = []

    def capture(token_requests, **_):
        captured.extend((context, continuation) for _, context, continuation in token_requests)
        return [(0.0, False)] * len(token_requests)

    original = lm._loglikelihood_tokens
    lm._loglikelihood_tokens = capture
    try:
        lm.loglikelihood(requests, disable_tqdm=True)
    finally:
        lm._loglikelihood_tokens = original
    return captured


# `python -m` runs this file as `__main__`; registering there as well would put a second class under the name.
if __name__ == "__main__":
    import importlib

    from lm_eval.__main__ import cli_evaluate

    importlib.import_module("replaceme_core.evaluation.shared_context")  # registers `replaceme`
    cli_evaluate()
else:
    register_model(MODEL_NAME)(SharedContextHFLM)
