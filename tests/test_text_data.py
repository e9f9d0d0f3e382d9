"""Text data without Ray: reading CSV/TSV/JSONL/.gz files (``_read_text_rows`` called directly), the
tokenizer fitted on the training split only, the label map, dynamic padding, length-bucketed batches,
the text checkpoint round trip, and the config rules for text workflows."""
from __future__ import annotations

import gzip
import json
import random

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from modelworks import checkpoint
from modelworks.config import DataConfig, validate
from modelworks.data.text_files import _read_text_rows
from modelworks.data.text import (CLS_ID, PAD_ID, SEP_ID, TOKENIZER_FILE, TextPreprocessor, content_order,
                                  drop_contained, fit,
                                  fit_tokenizer, label_map, length_bucketed_batches, trim)
from modelworks.errors import CheckpointError, DataError, UserError
from modelworks.models import build_model
from modelworks.serve.testing import sentiment_data

WORDS = "the a film movie was is marvelous dreadful plot acting actors story boring great funny slow".split()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(n)]


@pytest.fixture(scope="module")
def fitted() -> TextPreprocessor:
    texts = sentences(200, seed=0)
    return fit(texts, ["pos" if i % 2 else "neg" for i in range(200)], {"neg": "negative", "pos": "positive"},
               vocab_size=300, max_len=16)


def read(path, fmt, labelled=True, **cfg):
    batch = {"path": np.array([str(path)], dtype=object), "format": np.array([fmt], dtype=object)}
    return _read_text_rows(batch, DataConfig(source="text", **cfg), labelled)


# ------------------------------------------------------------------------------------------- tokenizer
def test_tokenizer_is_fitted_on_training_text_only():
    train = sentences(200, seed=0)
    val = ["the zorblaxian film was marvelous", "a zorblaxian plot", "zorblaxian acting, zorblaxian story"]
    pre = fit(train, [i % 2 for i in range(200)], {}, vocab_size=300, max_len=16)
    vocab = pre.tokenizer.get_vocab()
    assert "▁marvelous" in vocab and "▁dreadful" in vocab        # frequent training words are whole tokens
    assert not any("zorblax" in token for token in vocab)        # the validation-only word is not
    tokens = pre.tokenizer.encode(val[0]).tokens
    assert tokens[0] == "[CLS]" and tokens[-1] == "[SEP]" and "▁marvelous" in tokens
    assert "▁zorblaxian" not in tokens
    # Control: had validation text been part of the fit, the word would be in the vocabulary.
    leaky = fit(train + val, [i % 2 for i in range(203)], {}, vocab_size=300, max_len=16)
    assert "▁zorblaxian" in leaky.tokenizer.get_vocab()


def test_one_text_fits_one_tokenizer():
    # Equally frequent merges are where a trainer can go either way; these 40 sentences have many ties
    # (tokenizers' WordPiece trainer gave 10 different vocabularies in 10 fits of them).
    texts, _ = sentiment_data()
    fits = {fit_tokenizer(texts, vocab_size=200, max_len=32).to_str() for _ in range(5)}
    assert len(fits) == 1
    tok = Tokenizer.from_str(fits.pop())
    assert tok.decode(tok.encode("A gorgeous witty film").ids) == "a gorgeous witty film"


def test_encode_pads_truncates_and_trims(fitted):
    ids, lengths = fitted.encode(["the film", "marvelous " * 40, "a slow boring plot"])
    assert ids.shape == (3, 16) and ids.dtype == np.int32
    assert list(lengths) == [4, 16, 6]
    assert ids[1, 0] == CLS_ID and ids[1, 15] == SEP_ID        # truncated to max_len, [SEP] kept
    assert (ids[0, 4:] == PAD_ID).all() and ids[0, 3] == SEP_ID
    short = fitted.to_model_input(["the film", "a slow boring plot"])
    assert short.shape == (2, 6) and short.dtype == torch.long  # padded to this batch's longest row only


def test_trim_cuts_to_the_longest_row():
    ids = np.arange(30).reshape(3, 10)
    out = trim(ids, np.array([3, 7, 5]))
    assert out.shape == (3, 7) and (out == ids[:, :7]).all()
    assert trim(ids, np.array([0, 0, 0])).shape == (3, 1)  # never zero-width


def test_drop_contained_keeps_whole_sentences_only():
    phrases = ["a good film", "good", "a good", "goodness", "a good film", "film noir", " the end ", "the"]
    # "good"/"a good" sit inside "a good film" and "the" inside "the end"; "goodness" contains "good" but is
    # not inside anything (word-aligned), and duplicates collapse to the first one seen.
    assert drop_contained(phrases) == ["a good film", "goodness", "film noir", "the end"]
    assert drop_contained(["", "  "]) == []


def test_label_map_orders_numbers_numerically():
    classes, names = label_map(["10", 2, "neg", "1", 2, "10"], {"1": "one"})
    assert classes == ["1", "2", "10", "neg"] and names == ["one", "2", "10", "neg"]
    with pytest.raises(DataError, match="need at least 2"):
        label_map(["pos", "pos"], {})


# -------------------------------------------------------------------------------------------- batching
def test_length_bucketed_batches():
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 64, size=1037)
    batches = length_bucketed_batches(lengths, 16, torch.Generator().manual_seed(0), bucket_batches=8)
    assert all(len(b) == 16 for b in batches)
    assert len(batches) == 1037 // 16                             # only the partial last batch is dropped
    seen = np.concatenate(batches)
    assert len(set(seen.tolist())) == len(seen)                   # no row twice
    assert seen.min() >= 0 and seen.max() < 1037
    spread = np.mean([np.ptp(lengths[b]) for b in batches])
    random_spread = np.mean([np.ptp(lengths[b]) for b in rng.permutation(1037)[: 64 * 16].reshape(64, 16)])
    assert spread < 0.25 * random_spread
    # The same generator seed gives the same batches; another seed gives others.
    again = length_bucketed_batches(lengths, 16, torch.Generator().manual_seed(0), bucket_batches=8)
    other = length_bucketed_batches(lengths, 16, torch.Generator().manual_seed(1), bucket_batches=8)
    assert all((a == b).all() for a, b in zip(batches, again))
    assert not all((a == b).all() for a, b in zip(batches, other))
    # Keeping every batch (what one worker asks for) changes nothing.
    kept = length_bucketed_batches(lengths, 16, torch.Generator().manual_seed(0), bucket_batches=8,
                                   n_batches=len(batches))
    assert all((a == b).all() for a, b in zip(batches, kept))


def test_ranks_with_the_same_batch_order_step_through_batches_of_similar_length():
    """Two DDP ranks hold different rows (every 2nd of a skewed, phrase-like length distribution); a step
    costs what the longer of its two padded batches costs. A shared order generator must keep that close to
    the mean; independent orders (the control) cost far more."""
    rng = np.random.default_rng(0)
    lengths = np.minimum(1 + rng.geometric(0.1, size=4001), 64)
    shards = [lengths[0::2], lengths[1::2]]                        # 2001 and 2000 rows
    n = min(len(s) // 16 for s in shards)

    def step_cost_ratio(shared: bool) -> float:
        per_rank = [length_bucketed_batches(s, 16, torch.Generator().manual_seed(10 + rank), n_batches=n,
                                            order_generator=torch.Generator().manual_seed(7) if shared else None)
                    for rank, s in enumerate(shards)]
        assert [len(b) for b in per_rank] == [n, n]                 # every rank takes the same number of steps
        padded = np.array([[len(b) * s[b].max() for b in batches] for s, batches in zip(shards, per_rank)])
        return padded.max(axis=0).sum() / padded.mean(axis=0).sum()

    assert step_cost_ratio(shared=True) < 1.05
    assert step_cost_ratio(shared=False) > 1.2


# ------------------------------------------------------------------------------------------ checkpoint
def tiny_text_spec(pre: TextPreprocessor, head: str = "classify", dropout: float = 0.0) -> dict:
    return {"name": "transformer", "head": head, "vocab_size": pre.vocab_size, "max_len": pre.max_len,
            "d_model": 16, "n_layers": 1, "n_heads": 2, "d_ff": 32, "dropout": dropout, "pad_id": PAD_ID,
            "num_classes": pre.num_classes, "pooling": "mean", "use_sdpa": True}


def tiny_text_checkpoint(tmp_path, pre: TextPreprocessor):
    spec = tiny_text_spec(pre)
    torch.manual_seed(0)
    model = build_model(spec).eval()
    path = checkpoint.save(tmp_path / "ckpt", model=model, spec=spec, preprocessor=pre,
                           metrics={"val_accuracy": 0.5}, config={"name": "t"})
    return model, path


def test_text_checkpoint_round_trip(tmp_path, fitted):
    model, path = tiny_text_checkpoint(tmp_path, fitted)
    sums = dict(reversed(line.split("  ")) for line in (path / "sha256sums").read_text().splitlines())
    assert TOKENIZER_FILE in sums and "preprocessor.json" in sums
    assert sums[TOKENIZER_FILE] == checkpoint.sha256(path / TOKENIZER_FILE)

    loaded = checkpoint.load(path)
    new_texts = ["a marvelous story", "the acting was dreadful and slow", "unseen wordz here"]
    ids, lengths = fitted.encode(new_texts)
    ids2, lengths2 = loaded.preprocessor.encode(new_texts)
    assert (ids == ids2).all() and (lengths == lengths2).all()
    assert loaded.preprocessor.classes == fitted.classes == ["neg", "pos"]
    assert loaded.class_names == loaded.preprocessor.class_names == ["negative", "positive"]
    with torch.no_grad():
        expected = torch.softmax(model(fitted.to_model_input(new_texts)), dim=1)
    torch.testing.assert_close(loaded.predict_proba(new_texts), expected)
    # The one-string form that travels to Ray workers round-trips too.
    again = TextPreprocessor.from_dict(json.loads(fitted.to_json()))
    assert (again.encode(new_texts)[0] == ids).all() and again.classes == fitted.classes


def test_many_texts_run_in_length_groups_with_the_same_outputs(tmp_path, fitted):
    """A server's batch or an evaluation scores texts in groups of similar length (less padding): every
    text lands in one group, a group is padded to its own longest text only, and the outputs are those of
    each text scored alone, in the caller's order."""
    texts = sentences(37, seed=5) + ["short", sentences(1, seed=6)[0] * 3]
    groups = fitted.to_model_groups(texts, rows=8)
    positions = np.concatenate([idx for idx, _ in groups])
    assert sorted(positions.tolist()) == list(range(len(texts)))
    assert [len(idx) for idx, _ in groups] == [8, 8, 8, 8, 7]
    _, lengths = fitted.encode(texts)
    for idx, ids in groups:
        assert ids.shape == (len(idx), lengths[idx].max())  # padded to the group's longest, not the batch's
    longest = [int(lengths[idx].max()) for idx, _ in groups]
    assert longest == sorted(longest) and longest[0] < longest[-1]

    model, path = tiny_text_checkpoint(tmp_path, fitted)
    loaded = checkpoint.load(path)
    with torch.no_grad():
        alone = torch.cat([torch.softmax(model(fitted.to_model_input([t])), dim=1) for t in texts])
        padded_together = torch.softmax(model(fitted.to_model_input(texts)), dim=1)
    torch.testing.assert_close(loaded.predict_proba(texts), alone, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(loaded.predict_proba(texts), padded_together, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(loaded.predict_proba(texts[:1]), alone[:1])


def test_modified_tokenizer_is_refused(tmp_path, fitted):
    _, path = tiny_text_checkpoint(tmp_path, fitted)
    tok = path / TOKENIZER_FILE
    original = tok.read_text()
    tok.write_text(original.replace('"▁marvelous"', '"▁marvellous"'))
    assert tok.read_text() != original
    with pytest.raises(CheckpointError, match="tokenizer.json does not match its sha256"):
        checkpoint.load(path)


def test_tokenizer_left_out_of_the_sums_is_refused(tmp_path, fitted):
    _, path = tiny_text_checkpoint(tmp_path, fitted)
    sums = path / "sha256sums"
    sums.write_text("".join(line + "\n" for line in sums.read_text().splitlines() if TOKENIZER_FILE not in line))
    with pytest.raises(CheckpointError, match="tokenizer.json is not covered"):
        checkpoint.load(path)


def test_a_fine_tune_and_its_baseline_start_the_same_head_and_random_stream(tmp_path, fitted):
    """train_text.initial_model with a pre-trained encoder changes the encoder only: reading the checkpoint
    (which builds its model, drawing random weights) leaves the head and every later random draw (dropout
    masks) as they are without one, so the two arms of a comparison differ in the encoder alone."""
    from modelworks.train_text import initial_model

    torch.manual_seed(123)
    mlm_spec = tiny_text_spec(fitted, head="mlm", dropout=0.1)
    pretrained = build_model(mlm_spec)
    path = checkpoint.save(tmp_path / "encoder", model=pretrained, spec=mlm_spec, preprocessor=fitted, metrics={},
                           config={"name": "t"})
    spec = tiny_text_spec(fitted, dropout=0.1)

    scratch = initial_model(spec, random_seed=7)
    after_scratch = torch.rand(16)
    tuned = initial_model(spec, random_seed=7, init_encoder=str(path))
    after_tuned = torch.rand(16)

    assert torch.equal(after_tuned, after_scratch)
    assert checkpoint.state_digest(tuned.encoder) == checkpoint.state_digest(pretrained.encoder)
    assert checkpoint.state_digest(scratch.encoder) != checkpoint.state_digest(pretrained.encoder)
    for name, value in tuned.state_dict().items():
        if not name.startswith("encoder."):
            assert torch.equal(value, scratch.state_dict()[name]), name


# ------------------------------------------------------------------------------------------ file reading
CSV = 'text,label\n"a film, truly marvelous",1\nboring plot,0\n"she said ""wow""",1\n'


def test_reads_csv_tsv_jsonl_and_gz(tmp_path):
    (tmp_path / "a.csv").write_text(CSV)
    with gzip.open(tmp_path / "b.csv.gz", "wt") as f:
        f.write(CSV)
    (tmp_path / "c.tsv").write_text('sentence\tlabel\nit\'s "great" , really\t1\nNA\t0\n')
    (tmp_path / "d.jsonl").write_text('{"text": "good film", "label": 1}\n{"text": "bad, bad film", "label": 0}\n')
    expected = {"text": ["a film, truly marvelous", "boring plot", 'she said "wow"'], "label": ["1", "0", "1"]}
    for name in ("a.csv", "b.csv.gz"):
        out = read(tmp_path / name, "csv")
        assert out["text"].tolist() == expected["text"] and out["label"].tolist() == expected["label"]
        assert out["row"].tolist() == [1, 2, 3] and set(out["file"]) == {str(tmp_path / name)}
    out = read(tmp_path / "c.tsv", "tsv", text_column="sentence")
    assert out["text"].tolist() == ['it\'s "great" , really', "NA"] and out["label"].tolist() == ["1", "0"]
    out = read(tmp_path / "d.jsonl", "jsonl")
    assert out["text"].tolist() == ["good film", "bad, bad film"] and out["label"].tolist() == ["1", "0"]
    assert out["row"].tolist() == [1, 2]


def test_reads_several_files_and_unlabelled_lines(tmp_path):
    (tmp_path / "a.csv").write_text(CSV)
    (tmp_path / "corpus.txt").write_text("first line\n\n  \nsecond line\n")
    batch = {"path": np.array([str(tmp_path / "a.csv"), str(tmp_path / "a.csv")], dtype=object),
             "format": np.array(["csv", "csv"], dtype=object)}
    out = _read_text_rows(batch, DataConfig(source="text"), True)
    assert out["row"].tolist() == [1, 2, 3, 1, 2, 3] and len(out["label"]) == 6
    out = read(tmp_path / "corpus.txt", "lines", labelled=False)
    assert out["text"].tolist() == ["first line", "second line"] and "label" not in out


@pytest.mark.parametrize("name, content, fmt, needles", [
    ("empty.csv", 'text,label\ngood,1\n"",0\n', "csv", ["row 2", "text is empty", "remove the row"]),
    ("blank.csv", "text,label\ngood,1\nfine,0\n   ,1\n", "csv", ["row 3", "text is empty", "remove the row"]),
    ("number.jsonl", '{"text": "good", "label": 1}\n{"text": 42, "label": 0}\n', "jsonl",
     ["row 2", "text is int, not a string", "fix the row"]),
    ("nolabel.csv", "text,stars\ngood,1\n", "csv", ["no column 'label'", "text, stars", "data.label_column"]),
    ("notext.jsonl", '{"review": "good", "label": 1}\n', "jsonl", ["no column 'text'", "data.text_column"]),
    ("unlabelled.csv", "text,label\ngood,1\nbad,\n", "csv", ["row 2", "label is missing", "label it"]),
], ids=["empty", "blank", "number", "no-label-column", "no-text-column", "no-label"])
def test_bad_rows_name_file_row_and_fix(tmp_path, name, content, fmt, needles):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError) as err:
        read(path, fmt)
    message = str(err.value)
    assert str(path) in message and "\n" not in message
    for needle in needles:
        assert needle in message


def test_label_outside_the_label_set_names_file_and_row(tmp_path, fitted):
    path = tmp_path / "val.csv"
    path.write_text("text,label\ngood film,pos\nbad film,neg\nodd film,meh\n")
    batch = read(path, "csv")
    with pytest.raises(DataError) as err:
        fitted(batch)
    message = str(err.value)
    assert f"{path} row 3" in message and "'meh'" in message and "['neg', 'pos']" in message
    good = fitted({k: v[:2] for k, v in batch.items()})
    assert good["y"].tolist() == [1, 0] and good["ids"].shape == (2, 16)


# ---------------------------------------------------------------------------------------------- config
TEXT = {"name": "t", "data": {"source": "text"}, "model": {"name": "transformer"}}


@pytest.mark.parametrize("change, needle", [
    ({"model": {"name": "mlp"}}, "does not read data.source='text'"),
    ({"data": {"source": "digits"}}, "does not read data.source='digits'"),
    ({"steps": ["train", "pretrain"]}, "in the order"),
    ({"steps": ["pretrain", "evaluate"]}, "need 'train'"),
    ({"steps": ["train", "train"]}, "each step once"),
    ({"steps": ["train", "register"]}, "'register' needs 'evaluate'"),
    ({"steps": ["train", "deploy"]}, "steps.1"),
    ({"model": {"name": "transformer", "d_model": 30, "n_heads": 4}}, "must be divisible by model.n_heads"),
    ({"search": {"enabled": True}}, "search.enabled: searching a transformer is not supported"),
])
def test_text_config_errors_are_one_line(change, needle):
    assert validate(TEXT).steps == ["train", "evaluate", "register"]
    with pytest.raises(UserError) as err:
        validate({**TEXT, **change})
    assert needle in str(err.value) and "\n" not in str(err.value)


def test_pretrain_needs_the_transformer():
    with pytest.raises(UserError, match="'pretrain' .* needs model.name='transformer'"):
        validate({"name": "t", "steps": ["pretrain", "train"]})
    cfg = validate({**TEXT, "steps": ["pretrain", "train", "evaluate", "register"]})
    assert cfg.steps == ["pretrain", "train", "evaluate", "register"]


def test_content_order_is_the_same_whatever_order_the_rows_arrive_in():
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 7, size=(40, 5)).astype(np.int32)  # few token values: rows share prefixes
    ids[:, -1] = rng.permutation(40) + 4  # but no two rows are equal, so each row's length is its own
    rows = {"ids": ids, "length": rng.integers(1, 6, size=40), "y": rng.integers(0, 2, size=40)}
    ordered = content_order(rows)
    keys = [(tuple(r), int(y)) for y, r in zip(ordered["y"], ordered["ids"])]
    assert keys == sorted(keys)  # by ids left to right, then label
    length_of = {tuple(r): int(n) for r, n in zip(rows["ids"], rows["length"])}
    assert [length_of[tuple(r)] for r in ordered["ids"]] == ordered["length"].tolist()  # arrays permuted alike
    perm = rng.permutation(40)
    again = content_order({k: v[perm] for k, v in rows.items()})
    assert all(np.array_equal(again[k], ordered[k]) for k in ordered)
