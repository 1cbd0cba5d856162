"""Hugging Face golden outputs of tiny, briefly trained translation models of each family.

Run by hand in a throwaway venv (never in CI); see tools/README.hf.md:

    /tmp/hfvenv/bin/python tools/hf_goldens.py [--only NAME[,NAME...]] [--out tests/data/hf]

For each model NAME it trains a tiny encoder-decoder of the family on a toy word-by-word
translation task (tokenizer trained on the same corpus), saves the Hugging Face directory
(config.json, model.safetensors, generation_config.json, tokenizer files) under OUT/NAME/, and
records in OUT/NAME/goldens.json and OUT/NAME/arrays.npz what transformers (and CTranslate2,
converting the same directory) produce from it.
"""

from __future__ import annotations

import argparse
import base64
import functools
import io
import json
import operator
import os
import platform
import random
import shutil
import tempfile
import time

import numpy as np
import torch

SEED = 1234
N_SOURCES = 32  # stored sources: N_SEEN from the training corpus, the rest unseen
N_SEEN = 22
N_LOGITS = 8  # rows whose teacher-forced logits are stored
MAX_NEW_TOKENS = 48
N_TRAIN = 4000  # training pairs


# --------------------------------------------------------------------------------------------
# Toy task: made-up source words, each translated by a fixed made-up target word; order kept.
# --------------------------------------------------------------------------------------------

SRC_SYL = ["ka", "to", "mi", "re", "su", "na", "lo", "pe", "vi", "da", "ru", "ne"]
TGT_SYL = ["zor", "vel", "qua", "dax", "mip", "lun", "ter", "bo", "gri", "sha", "fen", "o"]


def make_lexicon(rng: random.Random, n_words: int = 28):
    def words(syl, n, lo, hi):
        out = []
        while len(out) < n:
            w = "".join(rng.choice(syl) for _ in range(rng.randint(lo, hi)))
            if w not in out:
                out.append(w)
        return out

    src = words(SRC_SYL, n_words, 1, 3)
    tgt = words(TGT_SYL, n_words, 1, 2)
    return dict(zip(src, tgt, strict=False))


def make_sentence(rng: random.Random, lexicon: dict[str, str]):
    words = list(lexicon)
    n = rng.randint(3, 9)
    src = [rng.choice(words) for _ in range(n)]
    return " ".join(src), " ".join(lexicon[w] for w in src)


def make_corpus(seed: int, n_train: int | None = None):
    n_train = n_train or N_TRAIN
    rng = random.Random(seed)
    lexicon = make_lexicon(rng)
    train = [make_sentence(rng, lexicon) for _ in range(n_train)]
    seen = {s for s, _ in train}
    unseen = []
    while len(unseen) < N_SOURCES - N_SEEN:
        s, t = make_sentence(rng, lexicon)
        if s not in seen and s not in {u for u, _ in unseen}:
            unseen.append((s, t))
    stored = train[:N_SEEN] + unseen
    return lexicon, train, stored


# --------------------------------------------------------------------------------------------
# Tokenizers
# --------------------------------------------------------------------------------------------


def train_spm(texts, path, vocab_size, model_type="unigram", **extra):
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_writer=buf,
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=1.0,
        num_threads=1,
        seed_sentencepiece_size=100000,
        shuffle_input_sentence=False,
        hard_vocab_limit=False,
        minloglevel=2,
        **extra,
    )
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return path


def spm_pieces(path):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=path)
    return [sp.id_to_piece(i) for i in range(sp.get_piece_size())]


# --------------------------------------------------------------------------------------------
# Families: each returns (model, tokenizer, info) ready to train; info holds conventions.
# --------------------------------------------------------------------------------------------


def build_marian(work, train, spec):
    from transformers import GenerationConfig, MarianConfig, MarianMTModel, MarianTokenizer

    separate = spec.get("variant") == "separate"
    src_texts = [s for s, _ in train]
    tgt_texts = [t for _, t in train]
    train_spm(src_texts, os.path.join(work, "source.spm"), 40)
    train_spm(tgt_texts, os.path.join(work, "target.spm"), 44 if not separate else 40)
    specials = ("<s>", "</s>", "<unk>", "<pad>")

    def marian_vocab(*spms):
        # as in OPUS-MT: </s> 0, <unk> 1, the pieces, <pad> last
        vocab = {"</s>": 0, "<unk>": 1}
        for p in functools.reduce(
            operator.iadd, (spm_pieces(os.path.join(work, m)) for m in spms), []
        ):
            if p not in vocab and p not in specials:
                vocab[p] = len(vocab)
        vocab["<pad>"] = len(vocab)
        return vocab

    if not separate:
        # one vocab.json shared by both sides (and both spm models)
        vocab = marian_vocab("source.spm", "target.spm")
        tgt_vocab = vocab
    else:
        # vocab.json for the source, target_vocab.json for the target; transformers' Marian
        # converter assumes both have the same size (one pad_token_id, last in each)
        vocab = marian_vocab("source.spm")
        tgt_vocab = marian_vocab("target.spm")
        assert len(vocab) == len(tgt_vocab), (len(vocab), len(tgt_vocab))
        with open(os.path.join(work, "target_vocab.json"), "w") as f:
            json.dump(tgt_vocab, f, ensure_ascii=False, indent=2)
    with open(os.path.join(work, "vocab.json"), "w") as f:
        json.dump(vocab, f, ensure_ascii=False, indent=2)
    tok = MarianTokenizer(
        source_spm=os.path.join(work, "source.spm"),
        target_spm=os.path.join(work, "target.spm"),
        vocab=os.path.join(work, "vocab.json"),
        source_lang="src",
        target_lang="tgt",
        **(
            dict(target_vocab_file=os.path.join(work, "target_vocab.json"), separate_vocabs=True)
            if separate
            else {}
        ),
    )
    pad = vocab["<pad>"]
    assert tgt_vocab["<pad>"] == pad
    cfg = MarianConfig(
        vocab_size=len(vocab),
        decoder_vocab_size=len(tgt_vocab),
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        activation_function="swish",
        max_position_embeddings=128,
        scale_embedding=True,
        static_position_embeddings=True,
        normalize_embedding=False,
        add_bias_logits=False,
        share_encoder_decoder_embeddings=not separate,
        tie_word_embeddings=True,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        pad_token_id=pad,
        eos_token_id=0,
        bos_token_id=0,
        forced_eos_token_id=0,
        decoder_start_token_id=pad,
        bad_words_ids=[[pad]],
        num_beams=4,
        max_length=512,
    )
    model = MarianMTModel(cfg)
    # As in converted OPUS-MT checkpoints: a non-zero output bias (kept fixed: it is a buffer).
    g = torch.Generator().manual_seed(SEED + 1)
    with torch.no_grad():
        bias = torch.randn(1, len(tgt_vocab), generator=g) * 0.1
        bias[0, pad] = 0.0
        model.final_logits_bias.copy_(bias)
    gen = GenerationConfig(
        bad_words_ids=[[pad]],
        bos_token_id=0,
        decoder_start_token_id=pad,
        eos_token_id=0,
        forced_eos_token_id=0,
        max_length=512,
        num_beams=4,
        pad_token_id=pad,
    )
    info = dict(
        family="marian",
        model_class="MarianMTModel",
        pad_id=pad,
        eos_id=0,
        decoder_start_id=pad,
        forced_bos_id=None,
        source_lang=None,
        target_lang=None,
        source_prefix="",
        ct2_target_prefix=None,
        banned_ids=[pad],
        # the start (pad) embedding row is kept at zero during training, as Marian has it
        zero_rows=[pad],
        gen_kwargs={},
        # CTranslate2's Marian loader registers the source vocabulary for both sides
        ct2_skip="CTranslate2 4.8 converts separate Marian vocabularies wrongly (one vocabulary)"
        if separate
        else None,
    )
    return model, tok, gen, info


def build_nllb(work, train, spec):
    from transformers import (
        GenerationConfig,
        M2M100Config,
        M2M100ForConditionalGeneration,
        NllbTokenizer,
    )
    from transformers.models.nllb.tokenization_nllb import FAIRSEQ_LANGUAGE_CODES

    texts = [s for s, _ in train] + [t for _, t in train]
    spm_dir = os.path.join(work, "spm")
    os.makedirs(spm_dir)
    train_spm(texts, os.path.join(spm_dir, "sentencepiece.bpe.model"), 100, model_type="bpe")
    src_lang, tgt_lang = "eng_Latn", "fra_Latn"
    # transformers 5 converts the .model but then leaves the language codes out and puts <mask>
    # right after the pieces; rebuild it with the real NLLB layout: <s> 0, <pad> 1, </s> 2,
    # <unk> 3, spm piece i (i >= 3) at i + 1, then the 202 language codes, then <mask>.
    conv = json.loads(NllbTokenizer.from_pretrained(spm_dir)._tokenizer.to_str())
    pieces = spm_pieces(os.path.join(spm_dir, "sentencepiece.bpe.model"))
    vocab = {k: v for k, v in conv["model"]["vocab"].items() if v <= len(pieces)}
    assert len(vocab) == len(pieces) + 1, (len(vocab), len(pieces))
    for code in FAIRSEQ_LANGUAGE_CODES:
        vocab[code] = len(vocab)
    vocab["<mask>"] = len(vocab)
    merges = [
        tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in conv["model"]["merges"]
    ]
    (charsmap,) = [
        n["precompiled_charsmap"]
        for n in conv["normalizer"]["normalizers"]
        if n["type"] == "Precompiled"
    ]
    tok = NllbTokenizer(
        vocab=vocab,
        merges=merges,
        _spm_precompiled_charsmap=base64.b64decode(charsmap),
        extra_special_tokens=list(FAIRSEQ_LANGUAGE_CODES),
        src_lang=src_lang,
        tgt_lang=tgt_lang,
    )
    for i, p in enumerate(pieces[3:], start=3):
        assert tok.convert_tokens_to_ids(p) == i + 1, (p, i, tok.convert_tokens_to_ids(p))
    assert tok.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>"]) == [0, 1, 2, 3]
    assert tok.convert_tokens_to_ids(FAIRSEQ_LANGUAGE_CODES[0]) == len(pieces) + 1
    assert tok.convert_tokens_to_ids("<mask>") == len(tok) - 1
    # the user-facing sentencepiece model, as in facebook/nllb-200-* (tokenizer.json is what loads)
    info_extra_files = [os.path.join(spm_dir, "sentencepiece.bpe.model")]
    V = len(tok)
    cfg = M2M100Config(
        vocab_size=V + 2,  # 2 more than the tokenizer, as 256206 vs 256204 in facebook/nllb-200-*
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        activation_function="relu",
        max_position_embeddings=128,
        scale_embedding=True,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        encoder_layerdrop=0.0,
        decoder_layerdrop=0.0,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        tokenizer_class="NllbTokenizer",
    )
    model = M2M100ForConditionalGeneration(cfg)
    gen = GenerationConfig(
        bos_token_id=0, decoder_start_token_id=2, eos_token_id=2, max_length=200, pad_token_id=1
    )
    tgt_id = tok.convert_tokens_to_ids(tgt_lang)
    info = dict(
        family="nllb",
        model_class="M2M100ForConditionalGeneration",
        pad_id=1,
        eos_id=2,
        decoder_start_id=2,
        forced_bos_id=tgt_id,
        source_lang=src_lang,
        target_lang=tgt_lang,
        source_prefix="",
        ct2_target_prefix=[tgt_lang],
        banned_ids=[],
        zero_rows=[],
        # as a user of NLLB does: the target language is forced through generate()
        gen_kwargs={"forced_bos_token_id": tgt_id},
        extra_files=info_extra_files,
    )
    return model, tok, gen, info


def _t5_common(work, train, prefix, extra_ids, spm_size):
    from transformers import T5Tokenizer

    texts = [prefix + s for s, _ in train] + [t for _, t in train]
    spm_dir = os.path.join(work, "spm")
    os.makedirs(spm_dir)
    train_spm(
        texts,
        os.path.join(spm_dir, "spiece.model"),
        spm_size,
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        pad_piece="<pad>",
        eos_piece="</s>",
        unk_piece="<unk>",
    )
    tok = T5Tokenizer.from_pretrained(spm_dir, extra_ids=extra_ids)
    assert tok.convert_tokens_to_ids(["<pad>", "</s>", "<unk>"]) == [0, 1, 2]
    pieces = spm_pieces(os.path.join(spm_dir, "spiece.model"))
    for i, p in enumerate(pieces[3:], start=3):
        assert tok.convert_tokens_to_ids(p) == i, (p, i)
    tok._hf_extra_files = [
        os.path.join(spm_dir, "spiece.model")
    ]  # as in t5-small / google/mt5-small
    return tok


def build_t5(work, train, spec):
    from transformers import GenerationConfig, T5Config, T5ForConditionalGeneration

    prefix = "translate Kato to Zorvel: "
    tok = _t5_common(work, train, prefix, extra_ids=8, spm_size=80)
    V = len(tok)
    cfg = T5Config(
        vocab_size=((V + 31) // 32) * 32 + 32,  # larger than the tokenizer, as 32128 vs 32100
        d_model=32,
        d_kv=16,
        d_ff=64,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.0,
        feed_forward_proj="relu",
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    model = T5ForConditionalGeneration(cfg)
    gen = GenerationConfig(decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)
    info = dict(
        family="t5",
        model_class="T5ForConditionalGeneration",
        pad_id=0,
        eos_id=1,
        decoder_start_id=0,
        forced_bos_id=None,
        source_lang=None,
        target_lang=None,
        source_prefix=prefix,
        ct2_target_prefix=None,
        banned_ids=[],
        zero_rows=[],
        gen_kwargs={},
    )
    return model, tok, gen, info


def build_mt5(work, train, spec):
    from transformers import GenerationConfig, MT5Config, MT5ForConditionalGeneration

    tok = _t5_common(work, train, "", extra_ids=0, spm_size=90)
    V = len(tok)
    cfg = MT5Config(
        vocab_size=((V + 15) // 16) * 16 + 16,
        d_model=32,
        d_kv=16,
        d_ff=48,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        relative_attention_num_buckets=32,
        relative_attention_max_distance=128,
        dropout_rate=0.0,
        feed_forward_proj="gated-gelu",
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
        tokenizer_class="T5Tokenizer",
    )
    model = MT5ForConditionalGeneration(cfg)
    # Real mT5 checkpoints have an lm_head of their own (tie_word_embeddings false in config.json);
    # transformers 5 builds the model tied, so untie it here.
    with torch.no_grad():
        model.lm_head.weight = torch.nn.Parameter(
            model.shared.weight.detach().clone().normal_(0.0, 1.0)
        )
    model.config.tie_word_embeddings = False
    gen = GenerationConfig(decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)
    info = dict(
        family="mt5",
        model_class="MT5ForConditionalGeneration",
        pad_id=0,
        eos_id=1,
        decoder_start_id=0,
        forced_bos_id=None,
        source_lang=None,
        target_lang=None,
        source_prefix="",
        ct2_target_prefix=None,
        banned_ids=[],
        zero_rows=[],
        gen_kwargs={},
        config_patch={"tie_word_embeddings": False},
    )
    return model, tok, gen, info


def _bpe_tokenizer(work, train, add_prefix_space):
    from tokenizers import ByteLevelBPETokenizer
    from transformers import BartTokenizer

    texts = [s for s, _ in train] + [t for _, t in train]
    bpe = ByteLevelBPETokenizer(add_prefix_space=add_prefix_space)
    bpe.train_from_iterator(
        texts,
        vocab_size=330,
        min_frequency=2,
        special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
        show_progress=False,
    )
    bdir = os.path.join(work, "bpe")
    os.makedirs(bdir)
    bpe.save_model(bdir)
    vpath = os.path.join(bdir, "vocab.json")
    with open(vpath) as f:
        vocab = json.load(f)
    vocab["<mask>"] = len(vocab)  # last, as in facebook/bart-*
    with open(vpath, "w") as f:
        json.dump(vocab, f, ensure_ascii=False)
    tok = BartTokenizer.from_pretrained(bdir, add_prefix_space=add_prefix_space)
    assert tok.convert_tokens_to_ids(["<s>", "<pad>", "</s>", "<unk>"]) == [0, 1, 2, 3]
    assert tok.convert_tokens_to_ids("<mask>") == len(vocab) - 1
    tok._hf_extra_files = [vpath, os.path.join(bdir, "merges.txt")]  # as in facebook/bart-large
    return tok


def build_bart(work, train, spec):
    from transformers import BartConfig, BartForConditionalGeneration, GenerationConfig

    variant = spec.get("variant", "base")
    add_prefix_space = variant != "base"
    tok = _bpe_tokenizer(work, train, add_prefix_space)
    V = len(tok)
    kw = dict(
        vocab_size=V,
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=128,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=2,
        # fields of facebook/bart-large's config.json that BartConfig no longer declares (CTranslate2
        # reads normalize_before); the model class ignores them: always post-norm with a
        # layernorm_embedding
        normalize_before=False,
        add_final_layer_norm=False,
        normalize_embedding=True,
        static_position_embeddings=False,
        add_bias_logits=False,
    )
    if variant == "base":
        kw.update(activation_function="gelu", scale_embedding=False, forced_bos_token_id=0)
    else:
        kw.update(
            activation_function="relu",
            scale_embedding=True,
            forced_bos_token_id=None,
            max_position_embeddings=40,
        )
    cfg = BartConfig(**kw)
    model = BartForConditionalGeneration(cfg)
    g = torch.Generator().manual_seed(SEED + 2)
    with torch.no_grad():
        model.final_logits_bias.copy_(torch.randn(1, V, generator=g) * 0.1)
    gkw = dict(
        bos_token_id=0,
        decoder_start_token_id=2,
        eos_token_id=2,
        forced_eos_token_id=2,
        pad_token_id=1,
    )
    if variant == "base":
        gkw["forced_bos_token_id"] = 0
    gen = GenerationConfig(**gkw)
    info = dict(
        family="bart",
        model_class="BartForConditionalGeneration",
        pad_id=1,
        eos_id=2,
        decoder_start_id=2,
        forced_bos_id=0 if variant == "base" else None,
        source_lang=None,
        target_lang=None,
        source_prefix="",
        # CTranslate2 knows nothing of forced_bos_token_id: give it the forced token as a prefix
        ct2_target_prefix=["<s>"] if variant == "base" else None,
        banned_ids=[],
        zero_rows=[],
        gen_kwargs={},
    )
    return model, tok, gen, info


MODELS = {
    "marian": dict(build=build_marian, steps=2000, lr=3e-3, seed=11),
    "nllb": dict(build=build_nllb, steps=2000, lr=3e-3, seed=12),
    "t5": dict(build=build_t5, steps=2000, lr=3e-3, seed=13),
    # variant: separate source/target vocabularies (vocab.json + target_vocab.json),
    # share_encoder_decoder_embeddings false, decoder_vocab_size
    "marian_separate": dict(build=build_marian, steps=2000, lr=3e-3, seed=17, variant="separate"),
    "mt5": dict(build=build_mt5, steps=2000, lr=3e-3, seed=14),
    "bart": dict(build=build_bart, steps=2000, lr=3e-3, seed=15),
    # variant: scale_embedding true, relu, no forced BOS, add_prefix_space, 40 positions
    "bart_scaled": dict(build=build_bart, steps=3000, lr=5e-3, seed=16, variant="scaled"),
}


# --------------------------------------------------------------------------------------------
# Encoding, training, recording
# --------------------------------------------------------------------------------------------


def encode_sources(tok, info, texts):
    return [tok(info["source_prefix"] + t)["input_ids"] for t in texts]


def encode_targets(tok, texts):
    return [tok(text_target=t)["input_ids"] for t in texts]


def pad_rows(rows, pad):
    n = max(len(r) for r in rows)
    return np.array([r + [pad] * (n - len(r)) for r in rows], dtype=np.int64)


def decoder_inputs(labels, start, pad):
    return pad_rows([[start, *r[:-1]] for r in labels], pad)


def train_model(model, tok, info, train, spec, log):
    torch.manual_seed(spec["seed"])
    rng = random.Random(spec["seed"])
    src = encode_sources(tok, info, [s for s, _ in train])
    tgt = encode_targets(tok, [t for _, t in train])
    pad, start = info["pad_id"], info["decoder_start_id"]
    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=0.0)
    steps, batch = spec["steps"], 48
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * max(0.05, 1 - s / steps)
    )
    model.train()
    idx = list(range(len(src)))
    losses = []
    t0 = time.time()
    for step in range(steps):
        b = rng.sample(idx, batch)
        x = torch.tensor(pad_rows([src[i] for i in b], pad))
        lab = [tgt[i] for i in b]
        y_in = torch.tensor(decoder_inputs(lab, start, pad))
        y = torch.tensor(pad_rows(lab, -100))
        out = model(input_ids=x, attention_mask=(x != pad).long(), decoder_input_ids=y_in, labels=y)
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        if info["zero_rows"]:
            with torch.no_grad():
                for emb in {
                    id(e): e
                    for e in (model.get_input_embeddings(), model.get_decoder().embed_tokens)
                }.values():
                    emb.weight[info["zero_rows"]] = 0.0
        losses.append(out.loss.item())
        if step % 100 == 0 or step == steps - 1:
            log(f"  step {step:4d} loss {np.mean(losses[-20:]):.4f}")
    model.eval()
    return dict(
        steps=steps,
        batch_size=batch,
        lr=spec["lr"],
        final_loss=float(np.mean(losses[-20:])),
        seconds=round(time.time() - t0, 1),
    )


def cut_after_eos(row, eos):
    row = list(row)
    if eos in row:
        row = row[: row.index(eos) + 1]
    return row


def hf_generate(model, src_ids, info, **kw):
    pad = info["pad_id"]
    x = torch.tensor(pad_rows(src_ids, pad))
    with torch.no_grad():
        out = model.generate(
            input_ids=x,
            attention_mask=(x != pad).long(),
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            return_dict_in_generate=True,
            output_scores=True,
            **info["gen_kwargs"],
            **kw,
        )
    seqs = out.sequences.tolist()
    rows = []
    for r in seqs:
        assert r[0] == info["decoder_start_id"], r
        rows.append(cut_after_eos(r[1:], info["eos_id"]))
    scores = (
        out.sequences_scores.tolist()
        if getattr(out, "sequences_scores", None) is not None
        else None
    )
    hit_limit = sum(1 for r in rows if r[-1] != info["eos_id"])
    return rows, scores, hit_limit


def margins(model, src_ids, outs, info):
    """top1 - top2 log-prob along the given outputs (teacher forced; forced first step skipped)."""
    pad, start = info["pad_id"], info["decoder_start_id"]
    x = torch.tensor(pad_rows(src_ids, pad))
    y_in = torch.tensor(decoder_inputs(outs, start, pad))
    with torch.no_grad():
        logits = model(input_ids=x, attention_mask=(x != pad).long(), decoder_input_ids=y_in).logits
    lp = torch.log_softmax(logits.float(), -1)
    if info["banned_ids"]:
        lp[..., info["banned_ids"]] = -float("inf")
    top2 = lp.topk(2, -1).values
    m = []
    for i, r in enumerate(outs):
        first = 1 if info["forced_bos_id"] is not None else 0
        for t in range(first, len(r)):
            m.append((top2[i, t, 0] - top2[i, t, 1]).item())
    m = np.array(m)
    return dict(
        mean=round(float(m.mean()), 3),
        min=round(float(m.min()), 3),
        frac_below_1=round(float((m < 1.0).mean()), 4),
        n=int(m.size),
    )


def run_ct2(model_dir, tok, src_ids, info, log):
    import ctranslate2
    from ctranslate2.converters import TransformersConverter

    class Converter(TransformersConverter):
        # transformers 5 forces MT5Config.tie_word_embeddings to True whatever config.json says, and
        # CTranslate2 4.8 then scales the decoder output by d_model**-0.5 as for a tied T5 v1.0:
        # wrong logits scale for mT5 (the argmax survives, the scores and beam results do not).
        # Put back what config.json says before converting.
        def load_model(self, model_class, model_name_or_path, **kwargs):
            model = super().load_model(model_class, model_name_or_path, **kwargs)
            with open(os.path.join(model_name_or_path, "config.json")) as f:
                tied = json.load(f).get("tie_word_embeddings", True)
            if tied is False and model.config.tie_word_embeddings:
                model.config.tie_word_embeddings = False
                patches.append(
                    "config.tie_word_embeddings = False (from config.json) before conversion"
                )
            return model

    patches = []
    out_dir = tempfile.mkdtemp(prefix="ct2_")
    shutil.rmtree(out_dir)
    Converter(model_dir).convert(out_dir, quantization=None)
    translator = ctranslate2.Translator(out_dir, device="cpu", inter_threads=1, intra_threads=1)
    tokens = [tok.convert_ids_to_tokens(r) for r in src_ids]
    vocab = tok.get_vocab()
    res = {}
    for beam in (1, 4):
        opts = dict(
            beam_size=beam,
            length_penalty=0.0,
            max_decoding_length=MAX_NEW_TOKENS,
            return_scores=True,
            max_batch_size=0,
        )
        prefix = (
            [list(info["ct2_target_prefix"]) for _ in tokens] if info["ct2_target_prefix"] else None
        )
        results = translator.translate_batch(tokens, target_prefix=prefix, **opts)
        toks = [r.hypotheses[0] for r in results]
        res[f"beam{beam}"] = dict(
            options={**opts, "target_prefix": info["ct2_target_prefix"]},
            tokens=toks,
            ids=[[vocab[t] for t in r] for r in toks],
            scores=[float(r.scores[0]) for r in results],
        )
    shutil.rmtree(out_dir)
    res["converter_patches"] = patches
    return res


def versions():
    import ctranslate2
    import safetensors
    import sentencepiece
    import tokenizers
    import transformers

    return dict(
        python=platform.python_version(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        tokenizers=tokenizers.__version__,
        sentencepiece=sentencepiece.__version__,
        safetensors=safetensors.__version__,
        ctranslate2=ctranslate2.__version__,
        numpy=np.__version__,
    )


def make_one(name, out_root, log):
    spec = MODELS[name]
    lexicon, train, stored = make_corpus(SEED)
    out_dir = os.path.join(out_root, name)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)
    torch.manual_seed(spec["seed"])
    work = tempfile.mkdtemp(prefix=f"hf_{name}_")
    try:
        model, tok, gen, info = spec["build"](work, train, spec)
        log(
            f"[{name}] vocab: tokenizer {len(tok)}, model {model.config.vocab_size}; "
            f"params {sum(p.numel() for p in model.parameters())}"
        )
        train_stats = train_model(model, tok, info, train, spec, log)
        model.generation_config = gen
        model.save_pretrained(out_dir)
        tok.save_pretrained(out_dir)
        for path in info.get("extra_files", []) + getattr(tok, "_hf_extra_files", []):
            shutil.copyfile(path, os.path.join(out_dir, os.path.basename(path)))
        if info.get("config_patch"):
            with open(os.path.join(out_dir, "config.json")) as f:
                c = json.load(f)
            c.update(info["config_patch"])
            with open(os.path.join(out_dir, "config.json"), "w") as f:
                json.dump(c, f, indent=2, sort_keys=True)
                f.write("\n")
    finally:
        shutil.rmtree(work)
    return finish(name, out_dir, model, info, train_stats, stored, lexicon, log)


def finish(name, out_dir, trained, info, train_stats, stored, lexicon, log):
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    # Everything below comes from the saved directory, as a user would load it.
    model = AutoModelForSeq2SeqLM.from_pretrained(out_dir).eval()
    assert type(model).__name__ == info["model_class"], type(model).__name__
    tok_kw = {}
    if info["source_lang"]:
        tok_kw = dict(src_lang=info["source_lang"], tgt_lang=info["target_lang"])
    tok = AutoTokenizer.from_pretrained(out_dir, **tok_kw)
    sources = [s for s, _ in stored]
    targets = [t for _, t in stored]
    source_ids = encode_sources(tok, info, sources)
    target_ids = encode_targets(tok, targets)

    pad, start = info["pad_id"], info["decoder_start_id"]
    src8 = pad_rows(source_ids[:N_LOGITS], pad)
    tgt8 = decoder_inputs(target_ids[:N_LOGITS], start, pad)
    with torch.no_grad():
        x, y = torch.tensor(src8), torch.tensor(tgt8)
        out = model(input_ids=x, attention_mask=(x != pad).long(), decoder_input_ids=y)
        ref = trained(input_ids=x, attention_mask=(x != pad).long(), decoder_input_ids=y)
    reload_diff = float((out.logits - ref.logits).abs().max())
    assert reload_diff < 1e-4, f"reloaded model differs from the trained one: {reload_diff}"
    np.savez(
        os.path.join(out_dir, "arrays.npz"),
        logits=out.logits.float().numpy(),
        encoder_output=out.encoder_last_hidden_state.float().numpy(),
    )

    greedy, _, greedy_hit = hf_generate(model, source_ids, info, num_beams=1)
    beam_kw = dict(num_beams=4, length_penalty=1.0, early_stopping=False)
    beam, beam_scores, beam_hit = hf_generate(model, source_ids, info, **beam_kw)
    beam0_kw = dict(num_beams=4, length_penalty=0.0, early_stopping=False)
    beam0, beam0_scores, beam0_hit = hf_generate(model, source_ids, info, **beam0_kw)
    texts = tok.batch_decode(greedy, skip_special_tokens=True)
    exact = sum(a.strip() == b for a, b in zip(texts, targets, strict=False))
    seen_exact = sum(a.strip() == b for a, b in zip(texts[:N_SEEN], targets[:N_SEEN], strict=False))
    marg = margins(model, source_ids, greedy, info)

    eos = info["eos_id"]
    ct2 = None if info.get("ct2_skip") else run_ct2(out_dir, tok, source_ids, info, log)

    def strip_eos(r):
        return r[:-1] if r and r[-1] == eos else r

    agree = dict(
        greedy_vs_beam_hf=sum(a == b for a, b in zip(greedy, beam, strict=False)), rows=len(sources)
    )
    max_score_diff = None
    if ct2 is not None:
        agree.update(
            greedy_hf_vs_ct2=sum(
                strip_eos(a) == b for a, b in zip(greedy, ct2["beam1"]["ids"], strict=False)
            ),
            beam_hf_lp0_vs_ct2=sum(
                strip_eos(a) == b for a, b in zip(beam0, ct2["beam4"]["ids"], strict=False)
            ),
            beam_hf_vs_ct2=sum(
                strip_eos(a) == b for a, b in zip(beam, ct2["beam4"]["ids"], strict=False)
            ),
        )
        max_score_diff = round(
            max(abs(a - b) for a, b in zip(beam0_scores, ct2["beam4"]["scores"], strict=False)), 6
        )

    goldens = dict(
        name=name,
        versions=versions(),
        generator="tools/hf_goldens.py",
        family=info["family"],
        model_class=info["model_class"],
        pad_id=pad,
        eos_id=eos,
        decoder_start_id=start,
        forced_bos_id=info["forced_bos_id"],
        source_lang=info["source_lang"],
        target_lang=info["target_lang"],
        source_prefix=info["source_prefix"],
        tokenizer_class=type(tok).__name__,
        tokenizer_len=len(tok),
        model_vocab_size=model.config.vocab_size,
        training=dict(
            {k: v for k, v in train_stats.items() if k != "seconds"},
            corpus_pairs=N_TRAIN,
            seed=MODELS[name]["seed"],
        ),
        lexicon=lexicon,
        n_seen=N_SEEN,
        sources=sources,
        targets=targets,
        source_ids=source_ids,
        target_ids=target_ids,
        src_ids=src8.tolist(),
        tgt_in_ids=tgt8.tolist(),
        arrays=dict(
            logits=list(out.logits.shape), encoder_output=list(out.encoder_last_hidden_state.shape)
        ),
        greedy=dict(
            kwargs=dict(
                num_beams=1, do_sample=False, max_new_tokens=MAX_NEW_TOKENS, **info["gen_kwargs"]
            ),
            ids=greedy,
            rows_hitting_limit=greedy_hit,
        ),
        texts=texts,
        beam_hf=dict(
            kwargs=dict(
                do_sample=False, max_new_tokens=MAX_NEW_TOKENS, **beam_kw, **info["gen_kwargs"]
            ),
            ids=beam,
            sequence_scores=beam_scores,
            rows_hitting_limit=beam_hit,
        ),
        beam_hf_lp0=dict(
            kwargs=dict(
                do_sample=False, max_new_tokens=MAX_NEW_TOKENS, **beam0_kw, **info["gen_kwargs"]
            ),
            ids=beam0,
            sequence_scores=beam0_scores,
            rows_hitting_limit=beam0_hit,
        ),
        ct2=ct2,
        report=dict(
            agreement=agree,
            ct2_vs_hf_lp0_max_score_diff=max_score_diff,
            ct2_skipped=info.get("ct2_skip"),
            greedy_margin=marg,
            greedy_text_exact=exact,
            greedy_text_exact_seen=seen_exact,
        ),
    )
    with open(os.path.join(out_dir, "goldens.json"), "w") as f:
        json.dump(goldens, f, ensure_ascii=False, indent=1)
        f.write("\n")
    size = sum(os.path.getsize(os.path.join(out_dir, p)) for p in os.listdir(out_dir))
    log(
        f"[{name}] loss {train_stats['final_loss']:.4f} in {train_stats['seconds']}s; exact {exact}/{len(sources)} "
        f"(seen {seen_exact}/{N_SEEN}); agreement {agree}; margin {marg}; ct2 score diff {max_score_diff}; "
        f"hit limit {greedy_hit}/{beam_hit}/{beam0_hit}; {size / 1024:.0f} KiB"
    )
    return goldens["report"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="comma-separated model names: " + ",".join(MODELS))
    ap.add_argument(
        "--out",
        default=os.path.join(
            os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "hf"
        ),
    )
    args = ap.parse_args(argv)
    names = args.only.split(",") if args.only else list(MODELS)
    for n in names:
        if n not in MODELS:
            ap.error(f"unknown model {n!r}; known: {', '.join(MODELS)}")
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)

    def log(msg):
        print(msg, flush=True)

    for n in names:
        t0 = time.time()
        make_one(n, os.path.normpath(args.out), log)
        log(f"[{n}] done in {time.time() - t0:.1f}s")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
