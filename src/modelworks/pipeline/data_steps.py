"""The built-in data steps, ``ingest`` and ``preprocess``. Each writes its output into the run folder (the
files the cache keeps) and has a ``load`` that rebuilds the in-memory object from those files, so a step
downstream of a cache hit reads exactly what the step made then:

    runs/<run>/data/source.json           ingest: what the data is (class names, image shape, column roles)
    runs/<run>/data/<split>.parquet       ingest: arrays read on the driver (digits, MNIST)
    runs/<run>/data/<split>/              ingest: Ray Data splits, written by Ray (tables, text)
    runs/<run>/data/{train,val}.txt       ingest: a language model's corpus, split by position
    runs/<run>/preprocess/preprocessor/   preprocess: the fitted preprocessor (as a checkpoint stores it)
    runs/<run>/preprocess/<split>[.parquet]  preprocess: the preprocessed train and val splits
    runs/<run>/preprocess/<split>.npy     preprocess: a language model's token ids
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import ray

from modelworks import registry as registry_mod
from modelworks.config import SKLEARN_TABLES, WorkflowConfig
from modelworks.data import chars as chars_mod
from modelworks.data import corpus as corpus_mod
from modelworks.data import preprocess, sources, store, text_files
from modelworks.data import text as text_data
from modelworks.errors import UserError
from modelworks.pipeline.types import Context, Output
from modelworks.steps import describe_preprocessor, fit_preprocessor

SPLITS = ("train", "val", "test")


def data_files(cfg: WorkflowConfig, data_dir: str | None) -> list[str]:
    """The files the ingest step reads: what its cache key fingerprints."""
    d, root = cfg.data, sources.data_dir(data_dir)
    if d.source in ("digits", "sklearn"):  # shipped inside scikit-learn: its own data files
        folder = sources.sklearn_data_folder()  # found, not imported: the plan runs before Ray starts
        stem = "digits" if d.source == "digits" else SKLEARN_TABLES.get(d.name, d.name).removeprefix("load_")
        paths = [str(p) for p in sorted(folder.glob(f"{stem}*"))]
    elif d.source == "corpus":
        paths = [corpus_mod.corpus_path(d, root)]
    elif d.path:
        paths = [p for p in (d.path, d.val_path, d.test_path) if p]
    else:
        paths = [str(root / d.name)]
    return paths + list(cfg.pretrain.corpus if "pretrain" in cfg.steps else [])


def _rebuild_dir(path: Path) -> Path:
    shutil.rmtree(path, ignore_errors=True)  # a step that died mid-write left part of it
    path.mkdir(parents=True)
    return path


# ---------------------------------------------------------------------------------------------- ingest
def ingest(ctx: Context) -> Output:
    cfg, out = ctx.cfg, _rebuild_dir(ctx.run_dir / "data")
    if cfg.model.task == "language_model":
        corpus = corpus_mod.read_corpus(cfg.data, sources.data_dir(ctx.data_dir), cfg.model.max_len)
        for split in ("train", "val"):
            (out / f"{split}.txt").write_text(getattr(corpus, split), encoding="utf-8")
        (out / "source.json").write_text(json.dumps({"kind": "corpus", "path": corpus.path}))
        return Output({"corpus": corpus.path, "characters": {"train": len(corpus.train), "val": len(corpus.val)}},
                      ["data"], corpus,
                      f"corpus {corpus.path}: {len(corpus.train):,} training and {len(corpus.val):,} validation "
                      f"characters")
    src = sources.load_source(cfg.data, ctx.data_dir)
    meta = {"kind": "arrays" if src.arrays is not None else "datasets", "class_names": src.class_names,
            "image_shape": src.image_shape, "roles": src.roles}
    (out / "source.json").write_text(json.dumps(meta))  # the folder is new and counts only once the step returns
    if src.arrays is not None:  # on the driver: written for a rerun, and used as they are in this one
        for split, arrays in src.arrays.items():
            store.write_arrays(out / f"{split}.parquet", arrays)
        rows = {s: len(a["label"]) for s, a in src.arrays.items()}
    else:  # one pass over the source; every later step reads these files
        for split, ds in src.splits.items():
            ds.write_parquet(sources.ray_path(out / split))
        src = load_ingest(ctx, {})
        rows = {s: store.parquet_rows(out / s) for s in src.splits}  # from the Parquet footers: no Ray Data pass
    where = f"{cfg.data.source} '{cfg.data.name}'" + (f" ({cfg.data.path})" if cfg.data.path else "")
    return Output({"rows": rows, "source": where}, ["data"], src,
                  f"{where}: {', '.join(f'{n:,} {s}' for s, n in rows.items())} rows")


def load_ingest(ctx: Context, value: dict):
    folder = ctx.run_dir / "data"
    meta = json.loads((folder / "source.json").read_text())
    if meta["kind"] == "corpus":
        return corpus_mod.Corpus(meta["path"], *((folder / f"{s}.txt").read_text(encoding="utf-8")
                                                 for s in ("train", "val")))
    if meta["kind"] == "arrays":
        arrays = {s: store.read_arrays(folder / f"{s}.parquet") for s in SPLITS if (folder / f"{s}.parquet").exists()}
        return sources.Source(sources.ArraySplits(arrays), meta["class_names"],
                              meta["image_shape"], meta["roles"], arrays)
    splits = {s: ray.data.read_parquet(sources.ray_path(folder / s)) for s in SPLITS if (folder / s).is_dir()}
    return sources.Source(splits, meta["class_names"], meta["image_shape"], meta["roles"])


# ------------------------------------------------------------------------------------------ preprocess
def preprocess_step(ctx: Context) -> Output:
    cfg, src = ctx.cfg, ctx.obj("ingest")
    out = _rebuild_dir(ctx.run_dir / "preprocess")
    transformed: dict[str, dict[str, np.ndarray]] = {}
    if cfg.model.task == "language_model":
        pre = chars_mod.fit(src.train)
        # One byte per token when the vocabulary allows: the ids travel to every worker.
        dtype = np.uint8 if pre.vocab_size <= 256 else np.int32
        for split in ("train", "val"):
            np.save(out / f"{split}.npy", pre.encode(getattr(src, split)).astype(dtype))
        result = f"{pre.vocab_size} characters fitted on the training text"
    elif cfg.model.name == "transformer":
        pre = _text_preprocessor(ctx, src)
        for split in ("train", "val"):  # tokenised once; training and every rerun read the token ids
            pre.apply(src.splits[split]).write_parquet(sources.ray_path(out / split))
        result = f"{pre.num_classes} classes {pre.class_names}, max_len {pre.max_len}"
    else:
        pre = fit_preprocessor(cfg, src, ctx.console)
        for split in ("train", "val"):
            if src.arrays is not None:  # on the driver already: the same transform, no Ray Data pass
                transformed[split] = pre(src.arrays[split])
                store.write_arrays(out / f"{split}.parquet", transformed[split])
            else:
                pre.apply(src.splits[split]).write_parquet(sources.ray_path(out / split))
        result = describe_preprocessor(cfg, pre)
    (out / "preprocessor").mkdir()
    for name, text in pre.files().items():
        (out / "preprocessor" / name).write_text(text)
    # Arrays transformed here are used as they are (reading back what was just written costs seconds for MNIST).
    value = (pre, transformed) if transformed else load_preprocess(ctx, {})
    return Output({"kind": getattr(pre, "kind", "image"), "classes": pre.num_classes}, ["preprocess"], value, result)


def load_preprocess(ctx: Context, value: dict) -> tuple:
    """(preprocessor, {"train": ..., "val": ...}): numpy arrays, token ids, or Ray Datasets over Parquet."""
    folder = ctx.run_dir / "preprocess"
    pre = preprocess.read_dir(folder / "preprocessor")
    datasets = {}
    for split in ("train", "val"):
        if (folder / f"{split}.npy").exists():
            datasets[split] = np.load(folder / f"{split}.npy")
        elif (folder / f"{split}.parquet").exists():
            datasets[split] = store.read_arrays(folder / f"{split}.parquet")
        else:
            datasets[split] = ray.data.read_parquet(sources.ray_path(folder / split))
    return pre, datasets


def split_texts(ds: ray.data.Dataset, labels: set | None = None):
    """Stream a split's texts to the driver in batches (the tokenizer trainer consumes an iterator); with
    ``labels``, the label values seen are added to it on the way, so one pass gives both."""
    columns = ["text"] if labels is None else ["text", "label"]
    for batch in ds.select_columns(columns).iter_batches(batch_size=4096, batch_format="numpy"):
        if labels is not None:
            labels.update(batch["label"].tolist())
        yield from (str(t) for t in batch["text"])


def pretrain_corpus(cfg: WorkflowConfig):
    """The extra unlabelled text the pre-training step reads (and the tokenizer is fitted on), or None."""
    if "pretrain" in cfg.steps and cfg.pretrain.enabled and cfg.pretrain.corpus:
        return text_files.read_text_files(cfg.pretrain.corpus, cfg.data, labelled=False, fmt="lines")
    return None


def init_encoder(cfg: WorkflowConfig):
    """The registered encoder a fine-tune starts from (train.init_from), or None."""
    if not cfg.train.init_from:
        return None
    encoder, _ = registry_mod.Registry().load(cfg.train.init_from)
    if encoder.spec.get("name") != "transformer":
        raise UserError(f"train.init_from={cfg.train.init_from} is a {encoder.spec.get('name')} model, "
                        f"not a Transformer encoder")
    return encoder


def _text_preprocessor(ctx: Context, src: sources.Source) -> text_data.TextPreprocessor:
    """A BPE tokenizer fitted on the training split (and the pre-training corpus), or the tokenizer of
    the encoder a fine-tune starts from."""
    cfg = ctx.cfg
    labels: set = set()  # filled by the pass over the training texts (a Ray Data unique() is a second pass)
    encoder = init_encoder(cfg)
    if encoder is not None:
        for _ in split_texts(src.splits["train"], labels):
            pass
        pre = encoder.preprocessor.with_labels(*text_data.label_map(labels, src.class_names))
        ctx.console(f"      tokenizer: the encoder's ({pre.vocab_size} BPE tokens)")
        return pre
    corpus = pretrain_corpus(cfg)
    texts = split_texts(src.splits["train"], labels)
    if corpus is not None:
        texts = (t for part in (texts, split_texts(corpus)) for t in part)
    tokenizer = text_data.fit_tokenizer(texts, cfg.model.vocab_size, cfg.model.max_len)
    pre = text_data.TextPreprocessor(tokenizer, cfg.model.max_len, *text_data.label_map(labels, src.class_names))
    ctx.console(f"      tokenizer: BPE, {pre.vocab_size} tokens fitted on the training split"
                + (" and the pre-training corpus" if corpus is not None else ""))
    return pre
