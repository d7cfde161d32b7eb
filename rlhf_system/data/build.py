"""From config to a tokenised dataset: load sources, detect formats, tokenise (cached), truncate, mix.

    ds, stats = build_dataset("sft", cfg.data, cfg.data.train, tokenizer, seed=cfg.seed)

Columns by kind (lists of ints unless said):
- sft:        input_ids, loss_mask [+ position_ids, seq_lens when data.packing]
- preference: chosen_input_ids, chosen_loss_mask, rejected_input_ids, rejected_loss_mask
- prompt:     prompt_ids, prompt (rendered text, str), messages (JSON str of the prompt turns), answer (str),
              meta (JSON str of the other keys)

Map-style datasets are tokenised with `Dataset.map`, whose Arrow cache is keyed on the source, the
tokenizer and every data setting that changes the result, so a second run reuses it. Every bad row
raises a DataError naming file:line before training starts, and a dataset left empty by filtering
is an error that says why.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass, field
from functools import partial

import datasets

from rlhf_system.config import DataConfig, DataSource
from rlhf_system.data import formats
from rlhf_system.data.collate import pack_samples
from rlhf_system.data.sources import DataError, LoadedSource, load_source, mix
from rlhf_system.data.tokenize import (
    check_template,
    encode_with_mask,
    render_prompt,
    tokenizer_fingerprint,
    truncate,
)

CACHE_VERSION = "3"  # bump when the processing below changes its output
IDENTICAL = "_identical"  # preference pairs whose chosen and rejected tokens are the same: no signal
ROW = "_row"  # a streamed row as one value (build_dataset)
MAP_BATCH = 256
logger = logging.getLogger(__name__)


@dataclass
class BuildStats:
    rows_in: dict[str, int] = field(default_factory=dict)      # per source path (map-style only)
    samples_out: dict[str, int] = field(default_factory=dict)  # after truncation/expansion
    formats: dict[str, str] = field(default_factory=dict)
    identical_pairs: dict[str, int] = field(default_factory=dict)  # dropped preference pairs per source


# ------------------------------------------------------------------------------- per-kind rows
def _sft_rows(batch: dict, idx: list[int], *, src: LoadedSource, fmt: str, cfg: DataConfig, tok) -> dict:
    out = {"input_ids": [], "loss_mask": []}
    for row, i in zip(_rows(batch), idx):
        where = src.where(i)
        rec = formats.to_sft(row, fmt, cfg.keys, where, cfg.system_prompt)
        ids, mask = encode_with_mask(tok, rec["messages"], cfg.template, train_from=0, where=where)
        fitted = truncate(ids, mask, cfg.max_len, cfg.truncation)
        if fitted is not None:
            out["input_ids"].append(fitted[0])
            out["loss_mask"].append(fitted[1])
    return out


def _preference_rows(batch: dict, idx: list[int], *, src: LoadedSource, fmt: str, cfg: DataConfig, tok) -> dict:
    out = {k: [] for k in ("chosen_input_ids", "chosen_loss_mask", "rejected_input_ids", "rejected_loss_mask",
                           IDENTICAL)}
    for row, i in zip(_rows(batch), idx):
        where = src.where(i)
        for pair in formats.to_preference(row, fmt, cfg.keys, where, cfg.system_prompt):
            sides = {}
            for side in ("chosen", "rejected"):
                msgs = pair["prompt"] + pair[side]
                ids, mask = encode_with_mask(tok, msgs, cfg.template, len(pair["prompt"]), f"{where} ({side})")
                sides[side] = truncate(ids, mask, cfg.max_len, cfg.truncation)
            if sides["chosen"] is None or sides["rejected"] is None:
                continue  # a pair needs both sides
            for side, (ids, mask) in sides.items():
                out[f"{side}_input_ids"].append(ids)
                out[f"{side}_loss_mask"].append(mask)
            # Marked, not dropped here, so build_dataset can count them (a map cannot report counts).
            out[IDENTICAL].append(sides["chosen"][0] == sides["rejected"][0])
    return out


def _prompt_rows(batch: dict, idx: list[int], *, src: LoadedSource, fmt: str, cfg: DataConfig, tok) -> dict:
    out = {"prompt_ids": [], "prompt": [], "messages": [], "answer": [], "meta": []}
    used = {cfg.keys.prompt, cfg.keys.answer}
    for row, i in zip(_rows(batch), idx):
        rec = formats.to_prompt(row, fmt, cfg.keys, src.where(i), cfg.system_prompt)
        text = render_prompt(tok, rec["prompt"], cfg.template)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) > cfg.max_prompt_len:
            if cfg.truncation == "drop":
                continue
            # Keep the end of the prompt: the generation prompt and the question live there.
            ids = ids[-cfg.max_prompt_len:]
            text = tok.decode(ids)
        out["prompt_ids"].append(ids)
        out["prompt"].append(text)
        out["messages"].append(json.dumps(rec["prompt"]))
        out["answer"].append(rec["answer"])
        out["meta"].append(json.dumps({k: v for k, v in row.items() if k not in used}, sort_keys=True, default=str))
    return out


ROW_FUNCS = {"sft": _sft_rows, "preference": _preference_rows, "prompt": _prompt_rows}


def _from_rows(fn, batch: dict, idx: list[int]) -> dict:
    """`fn` on a batch of whole rows (the ROW column): columns rebuilt from the keys any row has (None
    where a row lacks one)."""
    rows = batch[ROW]
    keys = list(dict.fromkeys(k for r in rows for k in r))
    return fn({k: [r.get(k) for r in rows] for k in keys}, idx)


def _rows(batch: dict) -> list[dict]:
    keys = list(batch)
    return [dict(zip(keys, vals)) for vals in zip(*(batch[k] for k in keys))]


def _pack_rows(batch: dict, *, max_len: int) -> dict:
    samples = [{"input_ids": a, "loss_mask": b} for a, b in zip(batch["input_ids"], batch["loss_mask"])]
    packed = pack_samples(samples, max_len)
    return {k: [p[k] for p in packed] for k in ("input_ids", "loss_mask", "position_ids", "seq_lens")}


# ---------------------------------------------------------------------------------------- build
def build_dataset(kind: str, cfg: DataConfig, sources: list[DataSource], tokenizer, seed: int = 0,
                  tokenizer_name: str = "tokenizer") -> tuple[datasets.Dataset | datasets.IterableDataset,
                                                             BuildStats]:
    """Tokenised, truncated and mixed dataset of `kind` (sft | preference | prompt)."""
    if kind not in ROW_FUNCS:
        raise ValueError(f"unknown data kind {kind!r}")
    if not sources:
        raise DataError(f"no data sources given for the {kind} dataset (data.train / data.eval)")
    check_template(tokenizer, cfg.template, tokenizer_name)
    stats = BuildStats()
    tok_fp = tokenizer_fingerprint(tokenizer, cfg.template)
    loaded = [load_source(s, cfg.streaming, cfg.cache_dir) for s in sources]
    # Detect every format first: a bad source fails before any tokenisation starts.
    fmts = []
    for src in loaded:
        first = next(iter(src.dataset), None)
        fmt = formats.detect_format(src.columns, kind, cfg.keys, cfg.format, src.source.path, first)
        fmts.append(fmt)
        stats.formats[src.source.path] = fmt

    parts = []
    for src, fmt in zip(loaded, fmts):
        fn = partial(ROW_FUNCS[kind], src=src, fmt=fmt, cfg=cfg, tok=tokenizer)
        kwargs = dict(batched=True, batch_size=MAP_BATCH, with_indices=True, remove_columns=src.columns)
        if cfg.streaming:
            # A streamed source's rows need not share their columns (a JSONL key only some rows have is
            # not among the first row's), and a batched map that changes the row count (truncation drops,
            # preference expansion, packing later) fails on any input column it was not told to remove.
            # So each row travels as one value and only the kind's own columns come out.
            whole = src.dataset.map(lambda row: {ROW: row}).select_columns([ROW])
            ds = whole.map(partial(_from_rows, fn), **(kwargs | {"remove_columns": [ROW]}))
            if kind == "preference":  # uncounted: counting would read the stream before training
                ds = ds.filter(lambda r: not r[IDENTICAL]).remove_columns([IDENTICAL])
        else:
            stats.rows_in[src.source.path] = len(src.dataset)
            settings = cfg.model_dump_json(include={"keys", "template", "system_prompt", "max_len",
                                                    "max_prompt_len", "truncation", "format"})
            fp = _fingerprint(src.dataset._fingerprint, kind, fmt, tok_fp, settings)
            ds = src.dataset.map(fn, new_fingerprint=fp, num_proc=cfg.num_proc if cfg.num_proc > 1 else None,
                                 desc=f"tokenising {src.source.path}", **kwargs)
            if kind == "preference":
                ds = _drop_identical(ds, src.source.path, stats)
            stats.samples_out[src.source.path] = len(ds)
            if len(ds) == 0:
                raise DataError(f"{src.source.path}: empty after filtering: all {len(src.dataset)} rows were "
                                f"dropped by truncation={cfg.truncation} at max_len={cfg.max_len}. Fix: raise "
                                "data.max_len or use data.truncation=left")
        parts.append(ds)

    ds = mix(parts, [s.weight for s in sources], seed, cfg.mix_stopping)
    if kind == "sft" and cfg.packing:
        ds = ds.map(partial(_pack_rows, max_len=cfg.max_len), batched=True, batch_size=1000,
                    remove_columns=["input_ids", "loss_mask"],
                    **({} if cfg.streaming else {"new_fingerprint": _fingerprint(ds._fingerprint, "pack",
                                                                                  str(cfg.max_len))}))
    if cfg.streaming and next(iter(ds), None) is None:
        raise DataError(f"{[s.path for s in sources]}: empty after filtering (truncation={cfg.truncation}, "
                        f"max_len={cfg.max_len})")
    return ds, stats


def _drop_identical(ds: datasets.Dataset, path: str, stats: BuildStats) -> datasets.Dataset:
    """Drop (and count) pairs whose chosen equals rejected: they train to a flat ln 2 and teach nothing.
    All of them identical is an error (a column mix-up, most often)."""
    flags = ds.data.column(IDENTICAL).to_pylist()
    n = sum(flags)
    if n and n == len(flags):
        raise DataError(f"{path}: all {n} preference pairs have chosen == rejected (after tokenisation). Fix: "
                        "check data.keys.chosen / data.keys.rejected point at different responses")
    if n:
        stats.identical_pairs[path] = n
        logger.warning("%s: dropped %d of %d preference pairs whose chosen equals rejected", path, n, len(flags))
        ds = ds.filter(lambda flag: not flag, input_columns=IDENTICAL,
                       new_fingerprint=_fingerprint(ds._fingerprint, "drop-identical"))
    return ds.remove_columns([IDENTICAL])


def _fingerprint(*parts: str) -> str:
    return hashlib.sha256(("\0".join((CACHE_VERSION,) + parts)).encode()).hexdigest()[:32]


def run_datasets(kind: str, cfg, tokenizer):
    """(train, eval or None, the train set's BuildStats) of a run config. Keyed on the tokenizer's folder
    name, so the controller's `prepare` and every worker's set-up share one tokenisation cache (the
    workers get cache hits)."""
    name = cfg.model.tokenizer_path or cfg.model.path
    train, stats = build_dataset(kind, cfg.data, cfg.data.train, tokenizer, cfg.seed, name)
    evals = build_dataset(kind, cfg.data, cfg.data.eval, tokenizer, cfg.seed, name)[0] if cfg.data.eval else None
    return train, evals, stats
