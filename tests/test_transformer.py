"""The Transformer and its training math, checked against hand computations and invariances (no Ray).

Each test states a property the model must have and would fail if it did not: the written-out attention
against the fused one and against numbers worked out by hand, padding and causal masking, the tied MLM
output layer, BERT's masking proportions, weight decay groups, the LR schedule, learning, gradient
accumulation, and generation (the key/value cache against recomputing the whole context, batched against
one at a time, seeded sampling).
"""
from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
from torch import nn

from modelworks.data.text import (CLS_ID, MASK_ID, PAD_ID, SEP_ID, SPECIAL_TOKENS, WORD_START, fit_tokenizer,
                                  mask_tokens, word_starts)
from modelworks.models import build_model
from modelworks.models.generation import BatchedGenerator, generate, sample
from modelworks.models.kv_cache import DecodeStep
from modelworks.models.transformer import (IGNORE_INDEX, CausalLM, Encoder, MaskedLM, MultiHeadSelfAttention,
                                           SequenceClassifier)
from modelworks.text_steps import evaluate_rows, eval_step, make_batch, param_groups, train_step, warmup_cosine

VOCAB = 40


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: one thread is ~10x faster than two fighting each other on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_encoder(use_sdpa: bool = True, seed: int = 0, dropout: float = 0.0, n_layers: int = 2) -> Encoder:
    torch.manual_seed(seed)
    return Encoder(vocab_size=VOCAB, max_len=16, d_model=16, n_layers=n_layers, n_heads=4, d_ff=32,
                   dropout=dropout, pad_id=PAD_ID, use_sdpa=use_sdpa)


def tiny_classifier(use_sdpa: bool = True, seed: int = 0) -> SequenceClassifier:
    model = SequenceClassifier(tiny_encoder(use_sdpa, seed), num_classes=3, dropout=0.0)
    return model.eval()


# ------------------------------------------------------------------------------------------- attention
@pytest.mark.parametrize("causal", [False, True], ids=["padding-mask", "padding+causal"])
def test_written_out_attention_equals_sdpa(causal):
    fused = tiny_encoder(use_sdpa=True).eval()
    written = tiny_encoder(use_sdpa=False).eval()
    written.load_state_dict(fused.state_dict())
    assert all(not b.attn.use_sdpa for b in written.blocks) and all(b.attn.use_sdpa for b in fused.blocks)
    ids = torch.tensor([[CLS_ID, 7, 8, 9, 10, 11, SEP_ID],
                        [CLS_ID, 12, 13, SEP_ID, PAD_ID, PAD_ID, PAD_ID]])
    with torch.no_grad():
        a, b = fused(ids, causal=causal), written(ids, causal=causal)
    assert torch.isfinite(a).all() and torch.isfinite(b).all()
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    # The comparison is not vacuous: the mask matters for the result.
    with torch.no_grad():
        other = written(ids, causal=not causal)
    assert not torch.allclose(b, other, atol=1e-3)


def hand_attention(use_sdpa: bool) -> MultiHeadSelfAttention:
    """d_model = d_k = 2, one head, W_Q = I, W_K = 2I, W_V = [[1, 2], [3, 4]], W_O = I, no biases."""
    attn = MultiHeadSelfAttention(d_model=2, n_heads=1, dropout=0.0, use_sdpa=use_sdpa).eval()
    with torch.no_grad():
        attn.qkv.weight.copy_(torch.tensor([[1., 0.], [0., 1.],      # W_Q
                                            [2., 0.], [0., 2.],      # W_K
                                            [1., 2.], [3., 4.]]))    # W_V (Linear: v = W_V x)
        attn.qkv.bias.zero_()
        attn.out.weight.copy_(torch.eye(2))
        attn.out.bias.zero_()
    return attn


@pytest.mark.parametrize("use_sdpa", [False, True], ids=["written-out", "sdpa"])
def test_attention_matches_a_hand_computation(use_sdpa):
    # Two tokens x1 = (1, 0), x2 = (0, 1).  q_i = x_i, k_i = 2 x_i, v1 = (1, 3), v2 = (2, 4).
    # Q Kᵀ / √2 = [[2, 0], [0, 2]] / √2 = [[√2, 0], [0, √2]]
    # softmax row 1 = (e^√2, 1) / (e^√2 + 1) = (0.8044297, 0.1955703); row 2 is its mirror.
    # out1 = 0.8044297 (1, 3) + 0.1955703 (2, 4) = (1.1955703, 3.1955703)
    # out2 = 0.1955703 (1, 3) + 0.8044297 (2, 4) = (1.8044297, 3.8044297)
    w = math.exp(math.sqrt(2)) / (math.exp(math.sqrt(2)) + 1)
    assert w == pytest.approx(0.8044297, abs=1e-7)
    expected = torch.tensor([[[1.1955703, 3.1955703], [1.8044297, 3.8044297]]])
    attn = hand_attention(use_sdpa)
    x = torch.tensor([[[1., 0.], [0., 1.]]])
    everything = torch.ones(1, 1, 2, 2, dtype=torch.bool)
    with torch.no_grad():
        torch.testing.assert_close(attn(x, everything), expected, atol=1e-6, rtol=0)
        # attend() itself, on the projected q, k, v in (B, heads, T, d_k) layout.
        q, k, v = x[:, None], 2 * x[:, None], torch.tensor([[[[1., 3.], [2., 4.]]]])
        torch.testing.assert_close(attn.attend(q, k, v, everything), expected[:, None], atol=1e-6, rtol=0)
        # Key 2 masked (padding): both queries can only look at token 1, so both outputs are v1 = (1, 3).
        only_first = torch.tensor([True, False]).view(1, 1, 1, 2)
        torch.testing.assert_close(attn(x, only_first), torch.tensor([[[1., 3.], [1., 3.]]]), atol=1e-6, rtol=0)
        # Causal: token 1 sees only itself (v1); token 2 sees both (as above).
        causal = torch.ones(2, 2, dtype=torch.bool).tril().view(1, 1, 2, 2)
        torch.testing.assert_close(attn(x, causal), torch.tensor([[[1., 3.], [1.8044297, 3.8044297]]]),
                                   atol=1e-6, rtol=0)


# ---------------------------------------------------------------------------------------------- masks
@pytest.mark.parametrize("use_sdpa", [True, False], ids=["sdpa", "written-out"])
def test_padding_does_not_change_real_positions(use_sdpa):
    model = tiny_classifier(use_sdpa)
    short = torch.tensor([[CLS_ID, 7, 9, 11, SEP_ID]])
    padded = torch.tensor([[CLS_ID, 7, 9, 11, SEP_ID, PAD_ID, PAD_ID, PAD_ID]])
    with torch.no_grad():
        h_short, h_padded = model.encoder(short), model.encoder(padded)
        torch.testing.assert_close(h_padded[:, :5], h_short, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(padded), model(short), atol=1e-5, rtol=1e-5)
        # In a batch next to a longer sentence, the same sentence gets the same logits.
        batch = torch.tensor([[CLS_ID, 7, 9, 11, SEP_ID, PAD_ID, PAD_ID, PAD_ID],
                              [CLS_ID, 8, 8, 12, 13, 14, 15, SEP_ID]])
        torch.testing.assert_close(model(batch)[0], model(short)[0], atol=1e-5, rtol=1e-5)
        # Control: the same padded input with padding *not* masked (pad_id no token has) differs.
        model.encoder.pad_id = -1
        assert not torch.allclose(model.encoder(padded)[:, :5], h_short, atol=1e-3)


def test_mean_pooling_averages_real_positions_only():
    model = tiny_classifier()
    ids = torch.tensor([[CLS_ID, 7, 9, SEP_ID, PAD_ID, PAD_ID],
                        [CLS_ID, 8, 10, 12, 14, SEP_ID]])
    with torch.no_grad():
        h = model.encoder(ids)
        expected = torch.stack([h[0, :4].mean(0), h[1].mean(0)])
        torch.testing.assert_close(model(ids), model.classifier(expected), atol=1e-6, rtol=1e-6)
        assert not torch.allclose(model(ids)[0], model.classifier(h[0].mean(0)), atol=1e-4)  # pads would count


@pytest.mark.parametrize("use_sdpa", [True, False], ids=["sdpa", "written-out"])
def test_causal_mask_hides_later_tokens(use_sdpa):
    enc = tiny_encoder(use_sdpa).eval()
    a = torch.tensor([[CLS_ID, 7, 9, 11, 13, SEP_ID]])
    b = a.clone()
    b[0, 3] = 20  # change the 4th token
    with torch.no_grad():
        ha, hb = enc(a, causal=True), enc(b, causal=True)
        torch.testing.assert_close(ha[:, :3], hb[:, :3], atol=1e-6, rtol=1e-6)  # earlier positions: unchanged
        assert not torch.allclose(ha[:, 3:], hb[:, 3:], atol=1e-4)              # it and later ones: changed
        # Control: without the causal mask the first position does see the change.
        assert not torch.allclose(enc(a)[:, 0], enc(b)[:, 0], atol=1e-4)


# ----------------------------------------------------------------------------------------------- heads
def test_masked_lm_output_layer_is_the_token_embedding():
    torch.manual_seed(0)
    model = MaskedLM(tiny_encoder()).eval()
    # No second (vocab x d_model) matrix anywhere: the output layer *is* the embedding.
    big = [n for n, p in model.named_parameters() if p.shape == (VOCAB, 16)]
    assert big == ["encoder.tok.weight"]
    ids = torch.tensor([[CLS_ID, 7, 9, 11, SEP_ID]])
    with torch.no_grad():
        before = model(ids)
        h = model.transform(model.encoder(ids).reshape(-1, 16))
        torch.testing.assert_close(before, h @ model.encoder.tok.weight.T + model.bias)
        # Change the embedding of token 30 (not in the input): exactly its output column moves.
        model.encoder.tok.weight[30] += 1.0
        after = model(ids)
    torch.testing.assert_close(after[:, 30], before[:, 30] + h.sum(-1))
    others = [i for i in range(VOCAB) if i != 30]
    torch.testing.assert_close(after[:, others], before[:, others])
    # Training the output side trains the embedding: a loss on token 30's score reaches its embedding row.
    model.zero_grad()
    model(ids)[:, 30].sum().backward()
    assert model.encoder.tok.weight.grad[30].abs().sum() > 0


def test_masked_lm_scores_only_masked_positions():
    torch.manual_seed(0)
    model = MaskedLM(tiny_encoder()).eval()
    ids = torch.tensor([[CLS_ID, 7, MASK_ID, 11, SEP_ID], [CLS_ID, MASK_ID, 9, MASK_ID, SEP_ID]])
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[0, 2], labels[1, 1], labels[1, 3] = 8, 10, 12
    with torch.no_grad():
        logits = model(ids, labels)
        full = model(ids).view(2, 5, VOCAB)
    assert logits.shape == (3, VOCAB)
    torch.testing.assert_close(logits, torch.stack([full[0, 2], full[1, 1], full[1, 3]]))


def test_build_from_spec():
    spec = {"name": "transformer", "vocab_size": VOCAB, "max_len": 16, "d_model": 16, "n_layers": 1,
            "n_heads": 2, "d_ff": 32, "dropout": 0.0, "pad_id": 0, "num_classes": 2}
    assert isinstance(build_model({**spec, "head": "classify"}), SequenceClassifier)
    assert isinstance(build_model({**spec, "head": "mlm"}), MaskedLM)
    with pytest.raises(ValueError, match="unknown transformer head"):
        build_model({**spec, "head": "seq2seq"})
    with pytest.raises(ValueError, match="longer than max_len"):
        build_model({**spec, "head": "classify"})(torch.ones(1, 17, dtype=torch.long))


# ------------------------------------------------------------------------------------------- masking
def test_mask_tokens_follows_bert_proportions():
    g = torch.Generator().manual_seed(0)
    vocab = 1000
    ids = torch.randint(len(SPECIAL_TOKENS), vocab, (1000, 64), generator=g)
    ids[:, 0] = CLS_ID
    lengths = torch.randint(10, 64, (1000,), generator=g)
    ids[torch.arange(1000), lengths] = SEP_ID
    ids[torch.arange(64)[None, :] > lengths[:, None]] = PAD_ID
    ids[::7, 5] = 1  # some [UNK]s
    original = ids.clone()
    out, labels = mask_tokens(ids, vocab, generator=torch.Generator().manual_seed(1))
    assert torch.equal(ids, original)  # the input is not modified in place

    special = original < len(SPECIAL_TOKENS)
    picked = labels != IGNORE_INDEX
    assert not (picked & special).any()                       # specials never picked ...
    assert torch.equal(out[special], original[special])       # ... nor changed
    assert torch.equal(out[~picked], original[~picked])       # nothing outside the picked positions changes
    assert torch.equal(labels[picked], original[picked])      # labels are the original tokens
    real = int((~special).sum())
    assert real > 20_000
    assert 0.14 < picked.sum() / real < 0.16

    n = int(picked.sum())
    masked = (out == MASK_ID) & picked
    kept = (out == original) & picked
    randomised = picked & ~masked & ~kept
    assert 0.77 < masked.sum() / n < 0.83
    assert 0.08 < randomised.sum() / n < 0.12
    assert 0.08 < kept.sum() / n < 0.12
    assert (out[randomised] >= len(SPECIAL_TOKENS)).all() and (out[randomised] < vocab).all()


def test_whole_word_masking_hides_every_piece_of_a_word_together():
    # A real fitted tokenizer, small enough that rare words stay split into several pieces.
    texts = ["a gorgeous witty film", "a tedious lifeless film", "gorgeously witty and charming",
             "the film is unwatchable", "tediously charming film"] * 20
    tok = fit_tokenizer(texts, vocab_size=60, max_len=32)
    table = word_starts(tok)
    ids = torch.tensor([tok.encode("a gorgeously tedious unwatchable film").ids] * 2000)
    pieces = [tok.id_to_token(int(i)) for i in ids[0]]
    assert pieces[0] == "[CLS]" and pieces[-1] == "[SEP]"
    word_of = np.cumsum([p.startswith(WORD_START) for p in pieces[1:-1]])  # the word of each piece between them
    words = [1 + np.flatnonzero(word_of == w) for w in np.unique(word_of)]  # each word's columns in ids
    assert any(len(cols) > 1 for cols in words), pieces  # some word is several pieces

    _, labels = mask_tokens(ids, tok.get_vocab_size(), torch.Generator().manual_seed(0), 0.3, table)
    picked = (labels != IGNORE_INDEX).numpy()
    assert not picked[:, 0].any() and not picked[:, -1].any()  # specials never picked
    for cols in words:
        assert (picked[:, cols] == picked[:, cols[:1]]).all(), pieces  # a word's pieces: all or none
        assert 0.25 < picked[:, cols[0]].mean() < 0.35  # each word drawn with mask_prob
    # Without the table the pieces of one word are drawn apart.
    _, apart = mask_tokens(ids, tok.get_vocab_size(), torch.Generator().manual_seed(0), 0.3)
    apart = (apart != IGNORE_INDEX).numpy()
    assert any((apart[:, cols] != apart[:, cols[:1]]).any() for cols in words if len(cols) > 1)


# ------------------------------------------------------------------------------- optimiser and schedule
def test_param_groups_decay_only_linear_weights():
    for model in (tiny_classifier(), MaskedLM(tiny_encoder())):
        groups = param_groups(model, weight_decay=0.01)
        names = {id(p): n for n, p in model.named_parameters()}
        decay = {names[id(p)] for p in groups[0]["params"]}
        no_decay = {names[id(p)] for p in groups[1]["params"]}
        assert (groups[0]["weight_decay"], groups[1]["weight_decay"]) == (0.01, 0.0)
        assert not decay & no_decay and decay | no_decay == set(names.values())
        linear_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear)}
        assert decay == linear_weights
        assert {"encoder.tok.weight", "encoder.pos.weight", "encoder.ln_f.weight", "encoder.blocks.0.ln1.weight",
                "encoder.blocks.0.attn.qkv.bias"} <= no_decay
        assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))


def test_warmup_cosine_shape():
    f = [warmup_cosine(s, warmup_steps=10, total_steps=110, min_ratio=0.1) for s in range(121)]
    assert f[0] == pytest.approx(0.1)
    assert all(f[s + 1] - f[s] == pytest.approx(0.1) for s in range(9))  # linear rise
    assert f[9] == pytest.approx(1.0) and f[10] == pytest.approx(1.0) and max(f) == pytest.approx(1.0)
    assert all(f[s + 1] <= f[s] + 1e-12 for s in range(10, 120))        # then never rises
    assert f[60] == pytest.approx((1 + 0.1) / 2)                          # half-way down the cosine
    assert f[110] == pytest.approx(0.1) and f[120] == pytest.approx(0.1)  # ends (and stays) at min_ratio
    assert warmup_cosine(0, 0, 100) == pytest.approx(1.0) and warmup_cosine(100, 0, 100) == pytest.approx(0.0)


# --------------------------------------------------------------------------------------------- training
def learnable_task(n: int, seed: int) -> dict:
    """Label = which of tokens 6/7/8 the sentence holds (exactly one, among noise tokens >= 9); the second
    half of the rows are shorter (padded), so padding is part of every batch."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(9, VOCAB, (n, 8), generator=g)
    y = torch.randint(0, 3, (n,), generator=g)
    ids[torch.arange(n), torch.randint(1, 4, (n,), generator=g)] = 6 + y
    ids[:, 0], ids[:, 7] = CLS_ID, SEP_ID
    ids[n // 2:, 4], ids[n // 2:, 5:] = SEP_ID, PAD_ID
    return {"ids": ids, "y": y}


def test_train_step_learns_a_tiny_task():
    torch.manual_seed(0)
    model = SequenceClassifier(tiny_encoder(n_layers=1), num_classes=3, dropout=0.0)
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=3e-3)
    data = learnable_task(64, seed=0)
    losses = []
    for step in range(30):
        rows = torch.arange(step * 16, step * 16 + 16) % 64
        out = train_step(model, opt, [{"ids": data["ids"][rows], "y": data["y"][rows]}])
        assert out["targets"] == 16 and out["tokens"] == int((data["ids"][rows] != PAD_ID).sum())
        losses.append(out["loss"])
    assert losses[0] == pytest.approx(math.log(3), abs=0.15)  # chance level at the start
    assert sum(losses[-5:]) / 5 < 0.5 * losses[0]
    result = eval_step(model, data)
    assert result["count"] == 64 and result["correct"] >= 56
    assert result["loss_sum"] / 64 < 0.5 * losses[0]


def test_a_masked_lm_batch_with_nothing_masked_counts_zero_and_leaves_the_weights_finite():
    """Short texts can draw no token to mask: that step adds nothing to the epoch's summed loss (it used to add
    NaN, and the epoch's train_loss printed nan) and its optimizer step keeps every weight finite."""
    model = MaskedLM(tiny_encoder())
    opt = torch.optim.AdamW(param_groups(model, 0.01), lr=1e-3)
    ids = torch.tensor([[CLS_ID, 7, SEP_ID, PAD_ID], [CLS_ID, 8, 9, SEP_ID]])
    nothing = {"ids": ids, "labels": torch.full_like(ids, IGNORE_INDEX)}
    something = {"ids": ids, "labels": torch.where(ids == 8, ids, torch.full_like(ids, IGNORE_INDEX))}
    out = train_step(model, opt, [nothing])
    assert (out["loss"], out["targets"]) == (0.0, 0)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    mixed = train_step(model, opt, [nothing, something])  # gradient accumulation over both
    assert mixed["targets"] == 1 and math.isfinite(mixed["loss"]) and mixed["loss"] > 0
    assert eval_step(model, nothing) == {"loss_sum": 0.0, "correct": 0, "count": 0}


def test_make_batch_and_evaluate_rows_on_in_memory_rows():
    """The batch a training loop builds from padded rows: cut to its own longest row, labels for the classifier,
    masked-LM targets only where tokens were picked; evaluation sums over every row with the same masks each time."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 12, size=40).astype(np.int32)
    ids = np.zeros((40, 16), np.int32)
    for i, n in enumerate(lengths):
        ids[i, :n] = rng.integers(len(SPECIAL_TOKENS), 50, size=n)
    rows = {"ids": ids, "length": lengths, "y": rng.integers(0, 2, size=40)}
    idx = np.array([0, 5, 7])
    cpu = torch.device("cpu")
    batch = make_batch(rows, idx, "classify", 50, 0.15, torch.Generator().manual_seed(0), cpu)
    assert batch["ids"].shape == (3, lengths[idx].max()) and batch["y"].tolist() == rows["y"][idx].tolist()
    mlm = make_batch(rows, idx, "mlm", 50, 0.5, torch.Generator().manual_seed(0), cpu)
    picked = mlm["labels"] != IGNORE_INDEX
    assert picked.any() and (mlm["labels"][picked] == batch["ids"][picked]).all()
    assert (mlm["ids"][~picked] == batch["ids"][~picked]).all()

    torch.manual_seed(0)
    model = build_model({"name": "transformer", "head": "mlm", "vocab_size": 50, "max_len": 16, "d_model": 16,
                         "n_layers": 1, "n_heads": 2, "d_ff": 32, "dropout": 0.0, "pad_id": PAD_ID})
    first = evaluate_rows(model, rows, "mlm", 50, 0.15, cpu, batch_size=16)
    assert first == evaluate_rows(model, rows, "mlm", 50, 0.15, cpu, batch_size=16)  # fixed masks
    assert 0 < first["count"] < lengths.sum() and math.isfinite(first["loss_sum"])


def test_gradient_accumulation_equals_one_big_batch():
    torch.manual_seed(0)
    one = SequenceClassifier(tiny_encoder(n_layers=1), num_classes=3, dropout=0.0).double()
    two = copy.deepcopy(one)
    data = learnable_task(8, seed=3)
    full = {"ids": data["ids"], "y": data["y"]}
    halves = [{"ids": data["ids"][i::2], "y": data["y"][i::2]} for i in (0, 1)]  # both have short rows
    opt_one = torch.optim.SGD(one.parameters(), lr=0.5)
    opt_two = torch.optim.SGD(two.parameters(), lr=0.5)
    r1 = train_step(one, opt_one, [full], max_grad_norm=None)  # clipping would hide a scale error
    r2 = train_step(two, opt_two, halves, max_grad_norm=None)
    # loss_of scores the logits in float32 (bf16 autocast on GPUs), so float64 agrees to float32 precision.
    assert r1["loss"] == pytest.approx(r2["loss"], rel=1e-6)
    assert (r1["targets"], r1["tokens"]) == (r2["targets"], r2["tokens"])
    for (name, p1), p2 in zip(one.named_parameters(), two.parameters()):
        torch.testing.assert_close(p1.grad, p2.grad, atol=1e-7, rtol=1e-5, msg=name)
        torch.testing.assert_close(p1, p2, atol=1e-7, rtol=1e-5, msg=name)
    # Control: the step did move the weights (the comparison is not between two untouched copies).
    fresh = SequenceClassifier(tiny_encoder(n_layers=1), num_classes=3, dropout=0.0).double()
    assert not torch.allclose(fresh.classifier.weight, one.classifier.weight)


# ---------------------------------------------------------------------- language model and generation
LM_MAX_LEN = 16


def tiny_lm(use_sdpa: bool = True, seed: int = 0) -> CausalLM:
    """A causal LM with weights ~ N(0, 0.3) instead of 0.02: large enough that its next-token scores are
    far apart, so greedy generation wanders over several tokens instead of repeating one."""
    torch.manual_seed(seed)
    model = build_model({"name": "transformer", "head": "lm", "vocab_size": VOCAB, "max_len": LM_MAX_LEN,
                         "d_model": 16, "n_layers": 2, "n_heads": 4, "d_ff": 32, "dropout": 0.0, "pad_id": None,
                         "use_sdpa": use_sdpa})
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.3)
    return model.eval()


@pytest.mark.parametrize("use_sdpa", [True, False], ids=["sdpa", "written-out"])
def test_lm_causal_mask_hides_later_tokens(use_sdpa):
    model = tiny_lm(use_sdpa)
    a = torch.tensor([[3, 7, 9, 11, 13, 15, 17, 19]])
    b = a.clone()
    b[0, 4] = 30  # change the 5th token
    with torch.no_grad():
        la, lb = model(a), model(b)
        torch.testing.assert_close(la[:, :4], lb[:, :4], atol=1e-6, rtol=1e-6)  # earlier positions: unchanged
        assert not torch.allclose(la[:, 4:], lb[:, 4:], atol=1e-3)                # it and later ones: changed
        # The two attentions agree on the lm head too.
        other = tiny_lm(not use_sdpa)
        torch.testing.assert_close(other(a), la, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("use_sdpa", [True, False], ids=["sdpa", "written-out"])
def test_kv_cache_steps_equal_the_full_forward(use_sdpa):
    model = tiny_lm(use_sdpa)
    ids = torch.randint(0, VOCAB, (1, LM_MAX_LEN), generator=torch.Generator().manual_seed(1))
    step = DecodeStep(model)
    with torch.no_grad():
        full = model(ids)[0]  # (T, vocab): the logits after each position, all positions in one pass
        cache, written_out = model.new_cache(1), model.new_cache(1)
        prefilled = model.next_token_logits(ids[:, :5], cache)  # prefill 5 tokens, then one at a time
        model.next_token_logits(ids[:, :5], written_out)
        torch.testing.assert_close(prefilled[0], full[4], atol=1e-5, rtol=1e-5)
        for t in range(5, LM_MAX_LEN):
            through_modules = model.next_token_logits(ids[:, t:t + 1], cache)
            torch.testing.assert_close(through_modules[0], full[t], atol=1e-5, rtol=1e-5)
            # DecodeStep is the same arithmetic as the modules', operation for operation: bit for bit equal.
            assert torch.equal(step(ids[:, t:t + 1], written_out), through_modules)
        assert cache.lengths == written_out.lengths == [LM_MAX_LEN]
        with pytest.raises(ValueError, match="max_len"):  # a cache holds max_len positions, no more
            model.next_token_logits(ids[:, :1], cache)
        # Rows at different positions in one batch (a mask then hides each row's unused slots): each row
        # gets what it gets alone.
        batches = model.new_cache(2), model.new_cache(2)
        row0, row1 = model.new_cache(1), model.new_cache(1)
        model.next_token_logits(ids[:, :3], row0)
        model.next_token_logits(ids[:, :7], row1)
        for batch in batches:
            batch.replace_row(0, row0)
            batch.replace_row(1, row1)
        newest = torch.stack([ids[:, 3], ids[:, 7]])
        both = model.next_token_logits(newest, batches[0])
        torch.testing.assert_close(both, torch.stack([full[3], full[7]]), atol=1e-5, rtol=1e-5)
        assert torch.equal(step(newest, batches[1]), both)
        assert batches[0].lengths == batches[1].lengths == [4, 8]


def test_training_forward_needs_no_cache():
    """The cache is an inference-time addition: a training forward takes the causal-only fast path."""
    model = tiny_lm()
    ids = torch.randint(0, VOCAB, (2, LM_MAX_LEN), generator=torch.Generator().manual_seed(2))
    labels = ids.clone()
    logits = model.train()(ids, labels)
    assert logits.shape == (2 * LM_MAX_LEN, VOCAB) and logits.requires_grad


@pytest.mark.parametrize("use_sdpa", [True, False], ids=["sdpa", "written-out"])
def test_cached_generation_equals_full_prefix_generation(use_sdpa):
    model = tiny_lm(use_sdpa)
    n = 2 * LM_MAX_LEN + 20  # past max_len twice: the window restarts (and the cache is refilled) three times
    for prompt in ([3, 5, 7], list(range(1, 25))):  # short, and longer than max_len
        cached = list(generate(model, prompt, n, temperature=0))
        recomputed = list(generate(model, prompt, n, temperature=0, use_cache=False))
        assert cached == recomputed
        assert len(cached) == n and len(set(cached)) >= 3  # not a single token repeated


def test_batched_generator_equals_one_generation_at_a_time():
    model = tiny_lm()
    requests = [  # prompt, max_new_tokens, temperature, top_k, random_seed
        ([3], 40, 1.0, None, 1),
        ([4, 5, 6, 7, 8, 9, 10], 7, 0.8, 5, 2),
        (list(range(2, 22)), 25, 1.5, None, 3),  # longer than max_len
        ([11, 12], 1, 1.0, 3, 4),
        ([13, 14, 15], 30, 0.0, None, None),     # greedy next to sampled rows
        ([9, 8, 7, 6], 18, 1.2, 10, 5),
    ]
    expected = [list(generate(model, p, n, temperature=t, top_k=k, random_seed=s)) for p, n, t, k, s in requests]
    batched = BatchedGenerator(model, max_batch=4)  # 6 requests: some wait for a place
    got: dict[int, list[int]] = {}
    order: list[int] = []
    joins = {0: [0, 1], 3: [2, 3], 4: [4], 9: [5]}  # step -> requests added before it
    step = 0
    while step in joins or batched.active:
        for r in joins.get(step, []):
            order.append(batched.add(requests[r][0], requests[r][1], temperature=requests[r][2],
                                     top_k=requests[r][3], random_seed=requests[r][4]))
        outputs = batched.step()
        assert len(outputs) <= 4
        for handle, token, finished in outputs:
            got.setdefault(handle, []).append(token)
            assert finished == (len(got[handle]) == requests[order.index(handle)][1])
        step += 1
    assert [got[h] for h in order] == expected
    assert batched.step() == []


def test_batched_generator_cancel():
    model = tiny_lm()
    batched = BatchedGenerator(model, max_batch=1)
    first = batched.add([3, 4], 10, random_seed=0)
    second = batched.add([5], 3, temperature=0)
    assert batched.active == 2
    assert [h for h, _, _ in batched.step()] == [first]  # the second waits: max_batch is 1
    batched.cancel(first)
    assert batched.active == 1
    tokens = [t for _ in range(3) for h, t, _ in batched.step() if h == second]
    assert tokens == list(generate(model, [5], 3, temperature=0)) and batched.active == 0
    batched.cancel(first)  # no longer active: nothing happens


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    model = tiny_lm()
    a = list(generate(model, [3, 4], 30, temperature=1.0, random_seed=7))
    assert a == list(generate(model, [3, 4], 30, temperature=1.0, random_seed=7))
    assert a != list(generate(model, [3, 4], 30, temperature=1.0, random_seed=8))
    greedy = list(generate(model, [3, 4], 30, temperature=0))
    assert list(generate(model, [3, 4], 30, temperature=1.0, top_k=1, random_seed=9)) == greedy
    assert a != greedy
    assert all(0 <= t < VOCAB for t in a)


def test_top_k_restricts_sampling_to_the_most_likely_tokens():
    logits = torch.tensor([0.0, 3.0, 1.0, 2.5, -1.0])
    g = torch.Generator().manual_seed(0)
    drawn = {sample(logits, 5.0, 2, g) for _ in range(200)}  # a high temperature: without top_k all 5 appear
    assert drawn == {1, 3}


def test_generation_rejects_bad_input():
    model = tiny_lm()
    batched = BatchedGenerator(model)
    for bad in ({"prompt": []}, {"prompt": [3, VOCAB]}, {"prompt": [-1]}, {"prompt": [1.5]},
                {"temperature": -1.0}, {"temperature": float("nan")}, {"top_k": 0}):
        args = {"prompt": [3, 4], "max_new_tokens": 5, **bad}
        with pytest.raises(ValueError) as err:
            generate(model, **args)  # raised at the call, not at the first token
        assert "\n" not in str(err.value)
        with pytest.raises(ValueError):
            batched.add(**args)
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(model, [3], -1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        batched.add([3], 0)
    assert list(generate(model, [3], 0)) == []
    with pytest.raises(ValueError, match="causal language model"):
        generate(tiny_classifier(), [3], 5)
    assert batched.active == 0
