"""Text preprocessing: a subword BPE tokenizer (HF ``tokenizers``) fitted on the training split only,
token ids for Ray Data's ``map_batches``, per-batch dynamic padding and BERT's masked-token corruption.

Rows leave ``TextPreprocessor`` as ``ids`` (int32, padded to ``max_len`` so Arrow stores a fixed-shape
tensor), ``length`` (real tokens) and ``y`` (label index); ``trim`` then cuts each training batch to its
longest row, so the model never runs over padding a batch does not need. The fitted state is saved in
every checkpoint as ``preprocessor.json`` (label map, max_len) and ``tokenizer.json`` (the tokenizer).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Iterable

import numpy as np
import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from modelworks.errors import DataError
from modelworks.models.transformer import IGNORE_INDEX

# Fixed ids for the special tokens (the trainer assigns them first, in this order).
SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
PAD_ID, UNK_ID, CLS_ID, SEP_ID, MASK_ID = range(len(SPECIAL_TOKENS))
TOKENIZER_FILE = "tokenizer.json"
# SentencePiece's word-start marker: fit_tokenizer prefixes each word with it, word_starts reads it back.
WORD_START = "▁"
# Texts per forward pass when many are scored at once (to_model_groups). Grouped by length, 64 SST-2
# validation sentences score in 56 ms in groups of 16 on one CPU thread, 70 ms in groups of 32 and 100 ms as
# one batch padded to the longest (mean 27 tokens, longest 64); groups of 8 gain nothing more (57 ms), the
# model's per-call cost then outweighing the padding saved.
INFERENCE_GROUP_ROWS = 16


def fit_tokenizer(texts: Iterable[str], vocab_size: int, max_len: int, min_frequency: int = 2) -> Tokenizer:
    """Subword BPE: lower-case, split on spaces and punctuation (as BERT does), mark each word's start with
    "▁" (as SentencePiece does, so "▁good" and the "good" inside "▁feelgood" are different tokens), then
    merge frequent pairs; a word never seen in training still maps to known pieces instead of one [UNK].

    Not WordPiece: tokenizers' WordPiece trainer numbers its "##" pieces in hash-map order, which breaks
    ties between equally frequent merges differently in every process (huggingface/tokenizers#1794), so
    two fits of the same text gave two vocabularies. Plain BPE numbers its alphabet sorted, so one text
    gives one tokenizer (tests/test_text_data.py)."""
    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.BertPreTokenizer(),
                                                 pre_tokenizers.Metaspace(WORD_START, prepend_scheme="always")])
    tok.decoder = decoders.Metaspace(WORD_START, prepend_scheme="always")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", CLS_ID), ("[SEP]", SEP_ID)])
    tok.enable_truncation(max_len)
    return tok


@dataclass
class TextPreprocessor:
    tokenizer: Tokenizer
    max_len: int
    classes: list                   # raw label values in index order (the label map); empty for pre-training
    class_names: list[str] = field(default_factory=list)
    kind: str = "text"
    raw_column = "text"             # the source column this preprocessor reads

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    # -- applying --------------------------------------------------------------------------------
    def encode(self, texts) -> tuple[np.ndarray, np.ndarray]:
        """Texts -> (ids int32 (B, max_len) right-padded with PAD_ID, lengths int32 (B,))."""
        encodings = self.tokenizer.encode_batch([str(t) for t in texts])
        ids = np.full((len(encodings), self.max_len), PAD_ID, dtype=np.int32)
        lengths = np.empty(len(encodings), dtype=np.int32)
        for i, enc in enumerate(encodings):
            ids[i, :len(enc.ids)] = enc.ids
            lengths[i] = len(enc.ids)
        return ids, lengths

    def encode_labels(self, labels, files=None, rows=None) -> np.ndarray:
        lookup = {str(c): i for i, c in enumerate(self.classes)}
        out = np.empty(len(labels), dtype=np.int64)
        for i, v in enumerate(labels):
            if str(v) not in lookup:
                where = f"{files[i]} row {rows[i]}: " if files is not None else ""
                raise DataError(f"{where}label {v!r} is not in the label set {self.classes} (fitted on the "
                                f"training split); fix the row or the label column")
            out[i] = lookup[str(v)]
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """The map_batches function: {text[, label, file, row]} -> {ids, length[, y]}."""
        ids, lengths = self.encode(batch["text"])
        out = {"ids": ids, "length": lengths}
        if self.classes and "label" in batch:
            out["y"] = self.encode_labels(batch["label"], batch.get("file"), batch.get("row"))
        return out

    def apply(self, ds):
        return ds.map_batches(self, batch_format="numpy", batch_size=4096)

    def to_model_input(self, texts) -> torch.Tensor:
        """What a model takes for raw texts: ids (B, longest) padded to the longest text of this batch."""
        ids, lengths = self.encode(texts)
        return torch.from_numpy(trim(ids, lengths)).long()

    def to_model_groups(self, texts, rows: int = INFERENCE_GROUP_ROWS) -> list[tuple[np.ndarray, torch.Tensor]]:
        """Raw texts as model inputs in groups of ``rows`` texts of similar length, each padded to its own
        longest: [(positions in ``texts``, ids (n, longest)), ...], covering every position once. For
        inference on many texts at once (a server's batch, an evaluation), where one tensor padded to the
        longest text would spend most of its work on padding."""
        ids, lengths = self.encode(texts)
        order = np.argsort(lengths, kind="stable")
        return [(idx, torch.from_numpy(trim(ids[idx], lengths[idx])).long())
                for idx in (order[i:i + rows] for i in range(0, len(order), rows))]

    # -- persistence -----------------------------------------------------------------------------
    def meta(self) -> dict:
        return {"kind": self.kind, "max_len": self.max_len, "classes": self.classes,
                "class_names": self.class_names, "vocab_size": self.vocab_size}

    def to_json(self) -> str:
        """Everything in one string (the tokenizer inline): how it travels to Ray workers."""
        return json.dumps({**self.meta(), "tokenizer": self.tokenizer.to_str()})

    def files(self) -> dict[str, str]:
        """What a checkpoint stores: the label map and sizes, and the tokenizer in its own standard file."""
        return {"preprocessor.json": json.dumps(self.meta(), indent=2), TOKENIZER_FILE: self.tokenizer.to_str()}

    @classmethod
    def from_dict(cls, meta: dict, tokenizer_json: str | None = None) -> "TextPreprocessor":
        tok = Tokenizer.from_str(tokenizer_json or meta["tokenizer"])
        return cls(tok, int(meta["max_len"]), list(meta["classes"]), list(meta.get("class_names", [])))

    def with_labels(self, classes: list, class_names: list[str]) -> "TextPreprocessor":
        """The same tokenizer with a label map: a classifier fine-tuned from a pre-trained encoder must read
        text exactly as the encoder learned it."""
        return TextPreprocessor(self.tokenizer, self.max_len, classes, class_names)


def label_map(labels: Iterable, class_names: dict[str, str]) -> tuple[list[str], list[str]]:
    """(classes, names): the training labels as strings, numbers in numeric order, then the rest sorted,
    so the same data always gives the same label indices."""
    def order(v: str):
        number = v.lstrip("-").isdigit()
        return (not number, int(v) if number else 0, v)

    classes = sorted({str(v) for v in labels}, key=order)
    if len(classes) < 2:
        raise DataError(f"the training split has {len(classes)} class(es) ({classes}); need at least 2")
    return classes, [class_names.get(c, c) for c in classes]


def fit(texts: Iterable[str], labels: Iterable, class_names: dict[str, str], vocab_size: int,
        max_len: int) -> TextPreprocessor:
    """Fit the tokenizer on ``texts`` (training text only, never validation or test) and the label map."""
    classes, names = label_map(labels, class_names)
    return TextPreprocessor(fit_tokenizer(texts, vocab_size, max_len), max_len, classes, names)


def drop_contained(texts: Iterable[str]) -> list[str]:
    """The distinct texts that are not a word-aligned part of a longer one, in first-seen order.

    A treebank's training set lists every phrase of every parse tree (SST-2: 67,349 rows hold the text of
    6,885 sentences, 4.7x fewer words); masked-LM pre-training on the whole sentences sees the same words
    in full context for a fifth of the steps. An inverted word index keeps this near-linear: a candidate
    is only compared with the longer texts that share its rarest word."""
    unique = list(dict.fromkeys(t.strip() for t in texts))
    kept: list[str] = []  # space-padded, so containment is word-aligned ("good" is not in "goodness")
    by_word: dict[str, list[int]] = {}
    for text in sorted(unique, key=len, reverse=True):
        words = set(text.split())
        holders = [by_word.get(w) for w in words]
        if not words or (all(holders) and any(f" {text} " in kept[i] for i in min(holders, key=len))):
            continue
        for w in words:
            by_word.setdefault(w, []).append(len(kept))
        kept.append(f" {text} ")
    keep = {k[1:-1] for k in kept}
    return [t for t in unique if t in keep]


# ------------------------------------------------------------------------------------------ batching
def trim(ids: np.ndarray, lengths: np.ndarray):
    """Dynamic padding: cut a padded batch to the longest row in it."""
    return ids[:, : max(int(lengths.max()), 1)] if len(lengths) else ids[:, :1]


def content_order(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows ({ids, length[, y]}) sorted by their ids left to right, then by label. Ray Data hands a worker its
    blocks in the order they finish, and each epoch's shuffle permutes row positions: in content order, the same
    rows make the same batches in every run (rows equal in ids and label are interchangeable). np.lexsort's
    last key is the primary one."""
    keys = ([rows["y"]] if "y" in rows else []) + [rows["ids"][:, j] for j in reversed(range(rows["ids"].shape[1]))]
    order = np.lexsort(keys)
    return {k: v[order] for k, v in rows.items()}


def length_bucketed_batches(lengths: np.ndarray, batch_size: int, generator: torch.Generator,
                            bucket_batches: int = 50, *, order_generator: torch.Generator | None = None,
                            n_batches: int | None = None) -> list[np.ndarray]:
    """Shuffled batches of row indices in which rows of similar length sit together, so per-batch padding
    stays small: shuffle, sort each window of ``bucket_batches`` batches by length, cut into batches, keep
    the first ``n_batches`` (all by default), and shuffle the batch order. Drops the last partial batch.

    Under DDP each rank holds its own rows, but a step lasts as long as the longest batch on any rank. Ranks
    that pass ``order_generator``s seeded alike and the same ``n_batches`` take their k-th batch from the
    same window and length slot, so one step's batches have similar lengths on every rank (with independent
    orders, two ranks' steps cost 1.4x the mean on SST-2's phrases). ``generator`` shuffles this rank's rows
    and, without ``order_generator``, orders the batches too."""
    order = torch.randperm(len(lengths), generator=generator).numpy()
    window = batch_size * bucket_batches
    batches = []
    for start in range(0, len(order), window):
        chunk = order[start:start + window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk) - batch_size + 1, batch_size)]
    batches = batches[:n_batches]
    shuffled = torch.randperm(len(batches), generator=order_generator or generator).tolist()
    return [batches[i] for i in shuffled]


def word_starts(tokenizer: Tokenizer) -> torch.Tensor:
    """A bool per token id: True where the token begins a word (its text starts with WORD_START, which
    fit_tokenizer puts at each word start), False for the pieces that continue a word. What whole-word
    masking needs to find each word's pieces (mask_tokens treats the special tokens as words of their own)."""
    table = torch.zeros(tokenizer.get_vocab_size(), dtype=torch.bool)
    for token, i in tokenizer.get_vocab().items():
        table[i] = token.startswith(WORD_START)
    return table


def mask_tokens(ids: torch.Tensor, vocab_size: int, generator: torch.Generator | None = None,
                mask_prob: float = 0.15, word_start: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT's corruption for masked-language modelling: pick ``mask_prob`` of the real (non-special)
    tokens; of those 80 % become [MASK], 10 % a random token, 10 % stay as they are. Returns (corrupted
    ids, labels) with labels = the original token at picked positions, IGNORE_INDEX elsewhere.

    With ``word_start`` (word_starts' table) whole words are picked: a word's pieces are hidden together, so
    the model cannot guess "▁mov" + [MASK] from the other half of the word alone (BERT's whole-word masking).
    Each word is drawn with ``mask_prob``; the 80/10/10 choice stays per token, as in BERT."""
    ids = ids.clone()
    maskable = ids >= len(SPECIAL_TOKENS)
    rand = torch.rand(ids.shape, generator=generator, device=ids.device)
    if word_start is not None:
        # Every piece takes the draw of its word's first piece (the last word start at or before it).
        starts = word_start.to(ids.device)[ids] | ~maskable
        positions = torch.arange(ids.shape[-1], device=ids.device).expand_as(ids)
        first = torch.where(starts, positions, torch.zeros_like(positions)).cummax(dim=-1).values
        rand = rand.gather(-1, first)
    picked = maskable & (rand < mask_prob)
    labels = torch.where(picked, ids, torch.full_like(ids, IGNORE_INDEX))
    how = torch.rand(ids.shape, generator=generator, device=ids.device)
    ids[picked & (how < 0.8)] = MASK_ID
    random_slot = picked & (how >= 0.8) & (how < 0.9)
    random_ids = torch.randint(len(SPECIAL_TOKENS), vocab_size, ids.shape, generator=generator, device=ids.device)
    ids[random_slot] = random_ids[random_slot]
    return ids, labels
