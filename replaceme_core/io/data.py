"""Calibration sources -> texts -> token batches.

A SOURCE is one of

* a **packaged corpus** (offline, see :mod:`replaceme_core.assets`): ``wiki`` (Wikipedia lead
  sections, our FineWeb stand-in), ``olmo-instructions`` (instruction/response pairs, our
  SlimOrca stand-in), ``squad`` (SQuAD dev paragraphs), or the mix ``wiki+olmo-instructions``
  (half/half, like the paper's ``fineweb_and_orca``). Records are shuffled with
  ``random.Random(seed)`` and the first N taken; ``split="train"`` is for calibration and
  ``split="heldout"`` for perplexity (disjoint, fixed by a hash of the record id).
* a **local file**: ``.txt`` — samples are paragraphs separated by blank lines; a file with no
  blank line at all is read as one sample per non-empty line. ``.jsonl`` — one JSON object per
  line with ``text``, or ``prompt``/``response``, or ``messages`` (a chat list). The first N
  samples in file order are used (the file *is* the split; ``split`` and ``seed`` are ignored).
* a **hub dataset** (needs the Hugging Face hub): ``Open-Orca/SlimOrca`` (formatted like the
  paper's code: first human turn + the following gpt turn, system prompt dropped, rendered with
  the chat template as [user, assistant], FIRST N rows, no shuffling), ``HuggingFaceFW/fineweb``
  (sample-10BT, ``text``), ``allenai/c4`` (en), ``wikitext`` (wikitext-2-raw-v1; heldout = its test
  split), ``fineweb_and_orca`` (N/2 SlimOrca then N/2 FineWeb); any other ``org/name`` is read as a
  hub dataset with a ``text`` column. When the hub is unreachable a one-line
  :class:`DataSourceError` names the offline alternatives.

Instruction records are rendered with ``tokenizer.apply_chat_template([user, assistant],
tokenize=False)``. ``chat="auto"`` falls back to a plain ``### Instruction / ### Response`` layout
with a warning when the tokenizer has no chat template (the paper's Llama-2 base-model case);
``chat="never"`` always uses the plain layout; ``chat="always"`` raises instead of falling back.

A template that inserts a default system turn when the conversation has none (SmolLM2's "You are a helpful AI
assistant named SmolLM ...", Qwen2.5's, Llama-3.1's date header) has that turn removed (`strip_default_system`):
the paper renders [user, assistant] with Llama-3-Instruct's template, which inserts none, and drops SlimOrca's own
system prompt. Kept, the same ~20 template tokens open every calibration sample; on SmolLM2-135M they move the
selection from blocks 2–9 to 11–18 (notebook 04 shows it). ``chat="keep-system"`` keeps them (for that comparison).
"""
from __future__ import annotations

import functools
import json
import random
import warnings
from pathlib import Path
from typing import Any, Iterable, Iterator

from .. import assets

__all__ = [
    "DataSourceError",
    "PACKAGED_SOURCES",
    "HUB_SOURCES",
    "load_texts",
    "heldout_texts",
    "render_pair",
    "render_messages",
    "token_batches",
    "count_tokens",
    "hub_reachable",
]


class DataSourceError(RuntimeError):
    """A calibration source cannot be read; the message is one line that says what to do."""


PACKAGED_SOURCES = {
    "wiki": ["wiki"],
    "olmo-instructions": ["olmo-instructions"],
    "squad": ["squad"],
    "wiki+olmo-instructions": ["olmo-instructions", "wiki"],
}

# canonical name -> (loader kind, dataset path, config name)
HUB_SOURCES: dict[str, tuple[str, str, str | None]] = {
    "Open-Orca/SlimOrca": ("orca", "Open-Orca/SlimOrca", None),
    "HuggingFaceFW/fineweb": ("text", "HuggingFaceFW/fineweb", "sample-10BT"),
    "allenai/c4": ("text", "allenai/c4", "en"),
    "wikitext": ("wikitext", "wikitext", "wikitext-2-raw-v1"),
    "fineweb_and_orca": ("mix", "", None),
}
_HUB_ALIASES = {
    "slimorca": "Open-Orca/SlimOrca", "slim_orca": "Open-Orca/SlimOrca", "orca": "Open-Orca/SlimOrca",
    "open-orca/slimorca": "Open-Orca/SlimOrca",
    "fineweb": "HuggingFaceFW/fineweb", "huggingfacefw/fineweb": "HuggingFaceFW/fineweb",
    "c4": "allenai/c4", "allenai/c4": "allenai/c4",
    "wikitext": "wikitext", "wikitext-2-raw-v1": "wikitext", "wikitext2": "wikitext",
    "salesforce/wikitext": "wikitext",
    "fineweb_and_orca": "fineweb_and_orca",
}

_OFFLINE_HINT = ("offline alternatives: packaged corpora 'wiki', 'olmo-instructions', 'squad', "
                 "'wiki+olmo-instructions' (replaceme assets list) or a local .txt/.jsonl file")

_PLAIN_TEMPLATE = "### Instruction:\n{prompt}\n\n### Response:\n{response}"
_warned: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, stacklevel=3)


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------

def _has_chat_template(tokenizer) -> bool:
    return tokenizer is not None and bool(getattr(tokenizer, "chat_template", None))


def _plain_messages(messages: list[dict]) -> str:
    if len(messages) == 2 and messages[0]["role"] == "user" and messages[1]["role"] == "assistant":
        return _PLAIN_TEMPLATE.format(prompt=messages[0]["content"], response=messages[1]["content"])
    names = {"user": "Instruction", "assistant": "Response", "system": "System"}
    return "\n\n".join(f"### {names.get(m['role'], m['role'].title())}:\n{m['content']}" for m in messages)


CHAT_MODES = ("auto", "never", "always", "keep-system")
_MARK = "\x02system-marker\x03"


def strip_default_system(tokenizer, messages: list[dict], text: str, **template_kwargs) -> str:
    """`text` (the template's rendering of `messages`) without the system turn the template inserted on its own.

    Found by rendering once more with an explicit marker system message: where the two renderings differ is the
    inserted default content; the turn runs from the turn-opening text before the role name (e.g. `<|im_start|>`)
    to the next turn opening. A template that inserts nothing, or one this reading does not fit, is left as is.
    `template_kwargs` are the ones `text` was rendered with (e.g. add_generation_prompt=True)."""
    if any(m["role"] == "system" for m in messages):
        return text
    marked = tokenizer.apply_chat_template([{"role": "system", "content": _MARK}, *messages], tokenize=False,
                                           **template_kwargs)
    if _MARK not in marked:
        return text
    head = marked[:marked.index(_MARK)]
    tail = marked[marked.index(_MARK) + len(_MARK):]
    if not (text.startswith(head) and text.endswith(tail)) or len(text) <= len(head) + len(tail):
        return text  # no default content between the same head and tail: nothing was inserted
    if "system" not in head:
        return text
    opening = head[:head.rindex("system")]
    end_of_default = len(text) - len(tail)
    for cut in range(len(opening)):  # the longest end of `opening` that opens the next turn, e.g. "<|im_start|>"
        turn = opening[cut:]
        nxt = text.find(turn, end_of_default)
        if turn.strip() and nxt >= 0:
            return text[:cut] + text[nxt:]
    return text


def render_messages(messages: list[dict], tokenizer=None, chat: str = "auto") -> str:
    """Render a chat (list of {role, content}) to one training text; see the module doc for `chat`."""
    if chat not in CHAT_MODES:
        raise DataSourceError(f"chat must be one of {', '.join(CHAT_MODES)}, got {chat!r}")
    if chat == "never":
        return _plain_messages(messages)
    if not _has_chat_template(tokenizer):
        if chat == "always":
            raise DataSourceError("chat='always' but the tokenizer has no chat template")
        _warn_once("no-template", "tokenizer has no chat template: instruction data is rendered as plain "
                                  "'### Instruction / ### Response' text (the paper's code would fail here for a "
                                  "base model such as Llama-2-7b-hf)")
        return _plain_messages(messages)
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
        return text if chat == "keep-system" else strip_default_system(tokenizer, messages, text)
    except Exception as e:  # templates that reject a role order, etc.
        if chat == "always":
            raise DataSourceError(f"the tokenizer's chat template failed: {type(e).__name__}: {e}") from None
        _warn_once("template-failed", f"chat template failed ({type(e).__name__}: {e}); using plain rendering")
        return _plain_messages(messages)


def render_pair(prompt: str, response: str, tokenizer=None, chat: str = "auto") -> str:
    """One instruction/response pair as text: chat template [user, assistant], or the plain layout."""
    return render_messages([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}],
                           tokenizer, chat)


def _render_record(rec: dict, tokenizer, chat: str, where: str) -> str:
    if "messages" in rec and isinstance(rec["messages"], list):
        msgs = [{"role": m.get("role", "user"), "content": m.get("content", "")} for m in rec["messages"]]
        return render_messages(msgs, tokenizer, chat)
    if "prompt" in rec and "response" in rec:
        return render_pair(str(rec["prompt"]), str(rec["response"]), tokenizer, chat)
    if "text" in rec:
        return str(rec["text"])
    raise DataSourceError(f"{where}: record has none of the fields 'text', 'prompt'/'response', 'messages' "
                          f"(it has {sorted(rec)[:6]})")


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------

def _check_n(num_samples: int) -> None:
    if not isinstance(num_samples, int) or isinstance(num_samples, bool) or num_samples <= 0:
        raise DataSourceError(f"empty calibration: num_samples must be a positive integer, got {num_samples!r}")


def _too_few(source: str, want: int, have: int, extra: str = "") -> DataSourceError:
    return DataSourceError(f"calibration source {source!r} has only {have} samples{extra}, "
                           f"but {want} were requested (lower --samples)")


def _packaged(source: str, tokenizer, n: int, seed: int, split: str, chat: str) -> list[str]:
    parts = PACKAGED_SOURCES[source]
    if len(parts) == 1:
        sizes = [n]
    else:  # the paper's fineweb_and_orca: N/2 of each (instructions first)
        sizes = [n // 2, n - n // 2]
    texts: list[str] = []
    for name, k in zip(parts, sizes):
        if k == 0:
            continue
        try:
            records = assets.corpus(name, split)
        except assets.AssetError as e:
            raise DataSourceError(str(e)) from None
        if k > len(records):
            raise _too_few(name, k, len(records), f" in split {split!r}")
        rng = random.Random(seed)
        order = list(range(len(records)))
        rng.shuffle(order)
        texts += [_render_record(records[i], tokenizer, chat, name) for i in order[:k]]
    return texts


def _read_local(path: Path, tokenizer, chat: str) -> list[str]:
    if path.suffix == ".txt":
        raw = path.read_text(encoding="utf-8")
        lines = raw.splitlines()
        if any(not l.strip() for l in lines) and len([l for l in lines if l.strip()]) > 0:
            # paragraphs separated by blank lines
            paras, cur = [], []
            for l in lines:
                if l.strip():
                    cur.append(l.rstrip())
                elif cur:
                    paras.append("\n".join(cur))
                    cur = []
            if cur:
                paras.append("\n".join(cur))
            return paras
        return [l.strip() for l in lines if l.strip()]
    if path.suffix == ".jsonl":
        out = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as e:
                    raise DataSourceError(f"{path}:{i}: not valid JSON ({e.msg})") from None
                if not isinstance(rec, dict):
                    raise DataSourceError(f"{path}:{i}: expected a JSON object per line")
                out.append(_render_record(rec, tokenizer, chat, f"{path}:{i}"))
        return out
    raise DataSourceError(f"unsupported calibration file type {path.suffix!r} ({path}); use .txt or .jsonl")


def _hub_error(what: str, e: BaseException) -> DataSourceError:
    msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return DataSourceError(f"cannot load hub dataset {what}: the Hugging Face hub is unreachable or the dataset is "
                           f"unavailable ({type(e).__name__}: {msg}); {_OFFLINE_HINT}")


def hub_offline_mode() -> bool:
    """HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set: the hub is not to be contacted (its local cache may still serve)."""
    import os

    on = {"1", "true", "yes", "on"}
    return any(os.environ.get(k, "").strip().lower() in on for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


@functools.lru_cache(maxsize=None)
def hub_reachable(timeout: float = 3.0) -> bool:
    """Fast probe of the hub endpoint (once per process), so that an offline machine fails in seconds rather
    than after datasets' retry back-off. False in HF offline mode."""
    import os
    import socket
    from urllib.parse import urlsplit

    if hub_offline_mode():
        return False
    url = urlsplit(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        with socket.create_connection((url.hostname or "huggingface.co", url.port or 443), timeout=timeout):
            return True
    except OSError:
        return False


def _check_hub(what: str) -> None:
    if hub_offline_mode():  # let datasets try its local cache
        return
    if not hub_reachable():
        raise DataSourceError(f"cannot load hub dataset {what}: the Hugging Face hub is unreachable from this "
                              f"machine; {_OFFLINE_HINT}")


def _hub_rows(path: str, name: str | None, split: str, n: int, what: str) -> list[dict]:
    """First `n` rows of a hub dataset (streamed), or a one-line DataSourceError."""
    _check_hub(what)
    try:
        import datasets

        ds = datasets.load_dataset(path, name, split=split, streaming=True)
        rows = []
        for row in ds:
            rows.append(row)
            if len(rows) >= n:
                break
        return rows
    except DataSourceError:
        raise
    except Exception as e:  # network, auth, missing dataset: all reported the same way
        raise _hub_error(what, e) from None


def _orca_texts(tokenizer, n: int, chat: str) -> list[str]:
    """The paper's `_load_orca_dataset`: first N rows; first human turn + next gpt turn; system dropped."""
    texts: list[str] = []
    # a few rows might lack a human/gpt pair: read a little more than N
    rows = _hub_rows("Open-Orca/SlimOrca", None, "train", n + max(8, n // 100), "Open-Orca/SlimOrca")
    for row in rows:
        conv = row.get("conversations") or []
        user = next((i for i, t in enumerate(conv) if t.get("from") == "human"), None)
        if user is None or user + 1 >= len(conv) or conv[user + 1].get("from") != "gpt":
            continue
        texts.append(render_pair(conv[user]["value"], conv[user + 1]["value"], tokenizer, chat))
        if len(texts) == n:
            break
    if len(texts) < n:
        raise _too_few("Open-Orca/SlimOrca", n, len(texts))
    return texts


def _text_rows(path: str, name: str | None, split: str, n: int, what: str) -> list[str]:
    rows = _hub_rows(path, name, split, n, what)
    texts = [str(r.get("text", "")) for r in rows if str(r.get("text", "")).strip()]
    if rows and "text" not in rows[0]:
        raise DataSourceError(f"hub dataset {what} has no 'text' column (columns: {sorted(rows[0])[:8]})")
    if len(texts) < n:
        raise _too_few(what, n, len(texts))
    return texts[:n]


def _wikitext_texts(n: int, split: str) -> list[str]:
    hub_split = "test" if split == "heldout" else "train"
    _check_hub("wikitext (wikitext-2-raw-v1)")
    try:
        import datasets

        ds = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split=hub_split)
        texts = [t for t in (r["text"] for r in ds) if t.strip()]
    except Exception as e:
        raise _hub_error("wikitext (wikitext-2-raw-v1)", e) from None
    if len(texts) < n:
        raise _too_few("wikitext", n, len(texts))
    return texts[:n]


def _hub(canon: str, tokenizer, n: int, split: str, chat: str) -> list[str]:
    kind, path, name = HUB_SOURCES[canon]
    if split != "train" and kind != "wikitext":
        raise DataSourceError(f"hub source {canon!r} has no held-out split here; use 'wiki' or a local file "
                              "for perplexity")
    if kind == "orca":
        return _orca_texts(tokenizer, n, chat)
    if kind == "text":
        return _text_rows(path, name, "train", n, f"{path} ({name})")
    if kind == "wikitext":
        return _wikitext_texts(n, split)
    # fineweb_and_orca: N/2 SlimOrca + N/2 FineWeb
    k = n // 2
    out = _orca_texts(tokenizer, k, chat) if k else []
    return out + _text_rows("HuggingFaceFW/fineweb", "sample-10BT", "train", n - k, "HuggingFaceFW/fineweb")


def load_texts(source: str, tokenizer, num_samples: int, seed: int = 0, split: str = "train",
               chat: str = "auto") -> list[str]:
    """`num_samples` calibration texts from SOURCE (see the module doc), deterministic given `seed`."""
    _check_n(num_samples)
    if split not in ("train", "heldout"):
        raise DataSourceError(f"split must be 'train' or 'heldout', got {split!r}")
    if chat not in CHAT_MODES:
        raise DataSourceError(f"chat must be one of {', '.join(CHAT_MODES)}, got {chat!r}")
    source = str(source)
    if source in PACKAGED_SOURCES:
        texts = _packaged(source, tokenizer, num_samples, seed, split, chat)
    elif source.endswith((".txt", ".jsonl")) or Path(source).expanduser().is_file():
        path = Path(source).expanduser()
        if not path.is_file():
            raise DataSourceError(f"calibration file not found: {path}")
        texts = [t for t in _read_local(path, tokenizer, chat) if t.strip()]
        if not texts:
            raise DataSourceError(f"empty calibration: {path} contains no samples")
        if num_samples > len(texts):
            raise _too_few(str(path), num_samples, len(texts))
        texts = texts[:num_samples]
    elif source.lower() in _HUB_ALIASES or source in HUB_SOURCES:
        texts = _hub(_HUB_ALIASES.get(source.lower(), source), tokenizer, num_samples, split, chat)
    elif "/" in source and not Path(source).expanduser().exists() and source.count("/") == 1:
        if split != "train":
            raise DataSourceError(f"hub source {source!r} has no held-out split here")
        texts = _text_rows(source, None, "train", num_samples, source)
    else:
        known = sorted(PACKAGED_SOURCES) + sorted(HUB_SOURCES)
        raise DataSourceError(f"unknown calibration source {source!r}: not a packaged corpus, an existing .txt/.jsonl "
                              f"file or a known hub dataset (known: {', '.join(known)})")
    texts = [t for t in texts if t and t.strip()]
    if not texts:
        raise DataSourceError(f"empty calibration: source {source!r} gave no non-empty samples")
    return texts


def check_available(source: str, num_samples: int, split: str = "train") -> None:
    """Refuse, before any model is loaded, a request for more samples than a local file or packaged corpus holds
    (hub sources are checked when they are read)."""
    _check_n(num_samples)
    source = str(source)
    if source in PACKAGED_SOURCES:
        parts = PACKAGED_SOURCES[source]
        sizes = [num_samples] if len(parts) == 1 else [num_samples // 2, num_samples - num_samples // 2]
        for name, k in zip(parts, sizes):
            try:
                have = len(assets.corpus(name, split))
            except assets.AssetError as e:
                raise DataSourceError(str(e)) from None
            if k > have:
                raise _too_few(name, k, have, f" in split {split!r}")
    elif source.endswith((".txt", ".jsonl")) or Path(source).expanduser().is_file():
        path = Path(source).expanduser()
        if not path.is_file():
            raise DataSourceError(f"calibration file not found: {path}")
        have = len([t for t in _read_local(path, None, "never") if t.strip()])
        if num_samples > have:
            raise _too_few(str(path), num_samples, have)


def heldout_texts(source: str, n: int, seed: int = 0, tokenizer=None, chat: str = "auto") -> list[str]:
    """`n` texts from the held-out split of SOURCE (for perplexity); never overlaps the calibration split."""
    return load_texts(source, tokenizer, n, seed=seed, split="heldout", chat=chat if tokenizer is not None else "never")


# --------------------------------------------------------------------------------------------
# Tokens
# --------------------------------------------------------------------------------------------

def _ensure_pad(tokenizer) -> None:
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise DataSourceError("tokenizer has neither a pad nor an eos token; cannot pad batches")
        tokenizer.pad_token = tokenizer.eos_token


def _strip_double_bos(texts: list[str], tokenizer) -> list[str]:
    """Chat templates often start with the BOS string while the tokenizer also adds BOS: keep only one."""
    bos = getattr(tokenizer, "bos_token", None)
    if not bos or not any(t.startswith(bos) for t in texts):
        return texts
    ids = tokenizer("a")["input_ids"]
    if not ids or ids[0] != tokenizer.bos_token_id:
        return texts
    return [t[len(bos):] if t.startswith(bos) else t for t in texts]


def token_batches(texts: Iterable[str], tokenizer, batch_size: int, max_length: int) -> Iterator[dict[str, Any]]:
    """Yield ``{"input_ids", "attention_mask"}`` LongTensors [B, T], padded to the longest text in the batch.

    Texts are truncated to `max_length` tokens; empty texts are dropped; the last batch may be
    smaller. A tokenizer without a pad token gets its eos token as pad; the padding side is left as
    the tokenizer has it.
    """
    import torch

    if batch_size <= 0 or max_length <= 0:
        raise DataSourceError(f"batch_size and max_length must be positive (got {batch_size}, {max_length})")
    _ensure_pad(tokenizer)
    texts = [t for t in texts if t and t.strip()]
    for i in range(0, len(texts), batch_size):
        chunk = _strip_double_bos(texts[i: i + batch_size], tokenizer)
        enc = tokenizer(chunk, padding="longest", truncation=True, max_length=max_length, return_tensors="pt")
        yield {"input_ids": enc["input_ids"].to(torch.long), "attention_mask": enc["attention_mask"].to(torch.long)}


def count_tokens(texts: Iterable[str], tokenizer, max_length: int | None = None) -> int:
    """Number of real (non-pad) tokens the texts give, after truncation to `max_length` if given."""
    texts = _strip_double_bos([t for t in texts if t and t.strip()], tokenizer)
    if not texts:
        return 0
    enc = tokenizer(texts, truncation=max_length is not None, max_length=max_length)
    return int(sum(len(ids) for ids in enc["input_ids"]))
