"""Hugging Face golden outputs of tiny, briefly trained decoder-only language models of each family.

Run by hand in a throwaway venv (never in CI); see tools/README.hf_lm.md:

    /tmp/hflmvenv/bin/python tools/hf_lm_goldens.py [--only NAME[,NAME...]] [--out tests/data/hf_lm]

For each model NAME it builds a family-style tokenizer with the `tokenizers` library (trained on the
toy corpus, wrapped by the family's transformers tokenizer class), trains a tiny causal LM of the
family on a toy language (deterministic chains of made-up words, each ended by an EOS token), saves
the Hugging Face directory (config.json, *.safetensors, generation_config.json, tokenizer files)
under OUT/NAME/, and records in OUT/NAME/goldens.json and OUT/NAME/arrays.npz what transformers
(and CTranslate2, converting the same directory) compute with it.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import random
import shutil
import tempfile
import time

import numpy as np
import torch

SEED = 4321
N_CHAINS = 8
N_UNSEEN = 6  # stored prompts whose sentence is held out of training
N_PROMPTS = 16
N_LOGITS = 8  # rows whose teacher-forced logits are stored
MAX_NEW_TOKENS = 40
BATCH = 32

# --------------------------------------------------------------------------------------------
# Toy language: chains of made-up words. Each word is determined by the two words before it
# (every pair of consecutive words occurs once in the whole language), and the last pair of a
# chain is followed by an EOS token (which one, for the families with several, depends on the
# chain). Sentences are the suffixes of the chains that keep at least 3 words; a prompt is the
# first 2, 3 or 5 words of a sentence and its continuation (the rest, then EOS) is determined.
# --------------------------------------------------------------------------------------------

SYLLABLES = ["ka", "to", "mi", "re", "su", "na", "lo", "pe", "vi", "da", "ru", "ne", "bo", "fe"]


def make_words(rng: random.Random, n: int = 20):
    out = []
    while len(out) < n:
        w = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 2)))
        if w not in out:
            out.append(w)
    return out


def make_chains(rng: random.Random, words):
    chains, pairs = [], set()
    while len(chains) < N_CHAINS:
        c = rng.sample(words, rng.randint(7, 10))
        ps = {(c[i], c[i + 1]) for i in range(len(c) - 1)}
        # every pair of consecutive words occurs once in the language: the word after it (or
        # the end) is determined by the pair
        if len(ps) == len(c) - 1 and not ps & pairs:
            chains.append(c)
            pairs |= ps
    return chains


def make_task(seed: int = SEED):
    """Words, chains, training sentences and the stored prompts."""
    rng = random.Random(seed)
    words = make_words(rng)
    chains = make_chains(rng, words)
    sentences = []  # (words, chain index)
    for k, c in enumerate(chains):
        for s in range(len(c) - 2):
            sentences.append((c[s:], k))
    # held-out sentences: suffixes that start inside a chain (their pairs are all seen in the
    # longer suffixes of the same chain); they have at least 5 words and their prompts 3, so
    # that the pair that decides the first new word does not stand at the start of a sentence
    # (tiny models learn the pairs that open a sentence by heart and do not generalise there)
    inner = [i for i, (w, k) in enumerate(sentences) if w != chains[k] and len(w) >= 5]
    unseen = sorted(rng.sample(inner, N_UNSEEN))
    train = [s for i, s in enumerate(sentences) if i not in unseen]
    # stored prompts: the 8 whole chains first (the longest sequences, teacher forced; prompts
    # of 2 or 3 words), then 2 more training sentences of 7 words or more with long prompts
    # (5 words: longer than mistral's sliding window in tokens), then the held-out ones (3 words)
    full = [i for i, (w, k) in enumerate(sentences) if w == chains[k]]
    long_seen = [i for i, (w, _) in enumerate(sentences) if i not in full + unseen and len(w) >= 7]
    stored = []
    for j, i in enumerate(full + rng.sample(long_seen, N_PROMPTS - N_UNSEEN - N_CHAINS) + unseen):
        w, k = sentences[i]
        n_prompt = 3 if i in unseen else 5 if i not in full else 2 + j % 2
        stored.append(
            dict(
                prompt=" ".join(w[:n_prompt]),
                continuation=" " + " ".join(w[n_prompt:]),
                chain=k,
                seen=i not in unseen,
            )
        )
    return dict(words=words, chains=chains, train=train, stored=stored)


def describe_task(task):
    return (
        f"{len(task['words'])} made-up words (1 or 2 syllables out of {len(SYLLABLES)}), "
        f"{N_CHAINS} chains of 7 to 10 distinct words (seed {SEED}); every pair of consecutive "
        "words occurs once in the language, so the word after a pair (or the chain's end) is "
        "determined by the two words before it. A sentence is a suffix of a chain with at least "
        "3 words, words separated by one space, followed by the chain's EOS token (and preceded by "
        "BOS where the tokenizer adds one). Training rows pack 1 to 3 random sentences. "
        f"{len(task['train'])} training sentences; {N_UNSEEN} more are held out. Stored prompts: "
        f"the first 2 or 3 words of the {N_CHAINS} whole chains, the first 5 words of "
        f"{N_PROMPTS - N_UNSEEN - N_CHAINS} longer training sentences, and the first 3 words of "
        f"the {N_UNSEEN} held-out sentences (not trained on; their word pairs are, in longer "
        "suffixes of the same chain)."
    )


# --------------------------------------------------------------------------------------------
# Tokenizers, trained with the `tokenizers` library on the training text, then handed to the
# family's transformers class (which rebuilds its own pipeline around the vocab and merges when
# it loads, so the saved tokenizer.json is exactly what that class loads).
# --------------------------------------------------------------------------------------------

LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
    r"\s*[\r\n]+|\s+(?!\S)|\s+"
)


def corpus_texts(task):
    return [" ".join(w) for w, _ in task["train"]]


def train_bpe(tok, texts, vocab_size, **trainer_kw):
    from tokenizers import trainers

    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False, **trainer_kw
    )
    # repeated so that the counts (and so the merges) do not hinge on single sentences
    tok.train_from_iterator(texts * 4, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    vocab = sorted(model["vocab"].items(), key=lambda kv: kv[1])
    return [t for t, _ in vocab], merges


def byte_level_bpe(texts, vocab_size, pattern=None, nfc=False):
    """GPT-2 / Llama 3 / Qwen2 style: byte-level alphabet (all 256 bytes), merges within words."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.BPE())
    if nfc:
        tok.normalizer = normalizers.NFC()
    if pattern is None:
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    else:
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    return train_bpe(tok, texts, vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())


def metaspace_bpe(texts, n_pieces, prefix_first_word=True):
    """sentencepiece style: spaces as '▁', pieces within words; bytes are added by the caller."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    tok = Tokenizer(models.BPE())
    if prefix_first_word:  # Llama 2 / Mistral: '▁' before the first word too
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    else:  # Gemma: no dummy prefix
        tok.normalizer = normalizers.Replace(" ", "▁")
        tok.pre_tokenizer = pre_tokenizers.Split("▁", behavior="merged_with_next")
    return train_bpe(tok, texts, n_pieces)


def byte_tokens():
    return [f"<0x{b:02X}>" for b in range(256)]


def check_ids(tok, expected):
    for t, i in expected.items():
        got = tok.convert_tokens_to_ids(t)
        assert got == i, (t, got, i)


def build_gpt2_tokenizer(task):
    from transformers import GPT2Tokenizer

    tokens, merges = byte_level_bpe(corpus_texts(task), 256 + 56)
    vocab = {t: i for i, t in enumerate(tokens)}
    vocab["<|endoftext|>"] = len(vocab)  # last, as 50256 in gpt2
    tok = GPT2Tokenizer(vocab=vocab, merges=merges)
    check_ids(tok, {"<|endoftext|>": len(vocab) - 1})
    eot = len(vocab) - 1
    return tok, dict(bos=eot, eos=[eot], pad=eot, end_tokens=["<|endoftext|>"])


LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|finetune_right_pad_id|>",
    "<|reserved_special_token_2|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eom_id|>",
    "<|eot_id|>",
]


def build_llama3_tokenizer(task):
    from tokenizers import (
        AddedToken,
        Regex,
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
    )
    from transformers import PreTrainedTokenizerFast

    tokens, merges = byte_level_bpe(corpus_texts(task), 256 + 60, pattern=LLAMA3_PATTERN)
    vocab = {t: i for i, t in enumerate(tokens)}
    # as meta-llama/Llama-3.1-*'s tokenizer.json: ignore_merges, the split regex, then bytes
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIALS])
    ids = {t: tok.token_to_id(t) for t in LLAMA3_SPECIALS}
    bos = ids["<|begin_of_text|>"]
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(add_prefix_space=True, trim_offsets=False, use_regex=True),
            processors.TemplateProcessing(
                single="<|begin_of_text|> $A",
                pair="<|begin_of_text|> $A <|begin_of_text|> $B:1",
                special_tokens=[("<|begin_of_text|>", bos)],
            ),
        ]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        model_max_length=256,
        clean_up_tokenization_spaces=True,
    )
    check_ids(fast, ids)
    eos = [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]]
    return fast, dict(
        bos=bos,
        eos=eos,
        pad=ids["<|finetune_right_pad_id|>"],
        end_tokens=["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"],
        # the hub repositories name the class PreTrainedTokenizerFast (transformers 5 writes
        # TokenizersBackend, which transformers 4 cannot load)
        tokenizer_config_patch={"tokenizer_class": "PreTrainedTokenizerFast"},
    )


def build_llama2_tokenizer(task, n_pieces):
    """Llama 2 / Mistral layout: <unk> 0, <s> 1, </s> 2, <0x00>..<0xFF> 3..258, then pieces."""
    from transformers import LlamaTokenizer

    pieces, merges = metaspace_bpe(corpus_texts(task), n_pieces)
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for t in byte_tokens() + pieces:
        vocab.setdefault(t, len(vocab))
    tok = LlamaTokenizer(
        vocab=vocab,
        merges=merges,
        add_bos_token=True,
        add_eos_token=False,
        legacy=False,
        add_prefix_space=True,
        model_max_length=128,
    )
    check_ids(tok, {"<unk>": 0, "<s>": 1, "</s>": 2, "<0x00>": 3, "<0xFF>": 258})
    return tok, dict(
        bos=1,
        eos=[2],
        pad=None,
        end_tokens=["</s>"],
        # as meta-llama/Llama-2-*-hf and mistralai/Mistral-7B-v0.1 (transformers 5 leaves them
        # out; the BOS is then in tokenizer.json's post-processor only)
        tokenizer_config_patch={"add_bos_token": True, "add_eos_token": False},
    )


QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def build_qwen2_tokenizer(task):
    from transformers import Qwen2Tokenizer
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tokens, merges = byte_level_bpe(
        corpus_texts(task), 256 + 56, pattern=PRETOKENIZE_REGEX, nfc=True
    )
    vocab = {t: i for i, t in enumerate(tokens)}
    for t in QWEN2_SPECIALS:  # after the BPE vocabulary, as 151643.. in Qwen/Qwen2-*
        vocab[t] = len(vocab)
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
        model_max_length=128,
    )
    ids = {t: vocab[t] for t in QWEN2_SPECIALS}
    check_ids(tok, ids)
    return tok, dict(
        bos=ids["<|endoftext|>"],  # config.json's bos_token_id, as Qwen2 (the tokenizer adds none)
        eos=[ids["<|im_end|>"], ids["<|endoftext|>"]],
        pad=ids["<|endoftext|>"],
        end_tokens=["<|im_end|>", "<|endoftext|>"],
    )


GEMMA_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>"]


def build_gemma_tokenizer(task):
    from transformers import GemmaTokenizer

    pieces, merges = metaspace_bpe(corpus_texts(task), 40, prefix_first_word=False)
    vocab = {}
    for t in GEMMA_SPECIALS + byte_tokens() + pieces:
        vocab.setdefault(t, len(vocab))
    tok = GemmaTokenizer(vocab=vocab, merges=merges, add_bos_token=True, model_max_length=128)
    check_ids(tok, {t: i for i, t in enumerate(GEMMA_SPECIALS)})
    return tok, dict(
        bos=2,
        eos=[1],
        pad=0,
        end_tokens=["<eos>"],
        tokenizer_config_patch={"add_bos_token": True, "add_eos_token": False},  # as google/gemma-*
    )


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------


def build_gpt2(task, spec):
    from transformers import GPT2Config, GPT2LMHeadModel

    tok, ids = build_gpt2_tokenizer(task)
    cfg = GPT2Config(
        vocab_size=len(tok),
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        activation_function="gelu_new",
        layer_norm_epsilon=1e-5,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"][0],
        tie_word_embeddings=True,
    )
    return GPT2LMHeadModel(cfg), tok, ids


def legacy_rope(c):
    """config.json's RoPE keys as the hub repositories have them (transformers < 4.56 wrote
    them): `rope_theta` at the top, `rope_scaling` (null when unscaled); transformers 5 writes
    `rope_parameters` and reads both."""
    rp = dict(c.pop("rope_parameters"))
    c["rope_theta"] = rp.pop("rope_theta")
    c["rope_scaling"] = None if rp.get("rope_type", "default") == "default" else rp
    return c


def qwen2_config_patch(c):
    """As Qwen/Qwen2.5-*: legacy RoPE keys, no `layer_types`, and a `sliding_window` value that
    `use_sliding_window: false` switches off (small here, so that applying it would change the
    logits; `max_window_layers` below the layer count for the same reason)."""
    c = legacy_rope(c)
    c.pop("layer_types", None)
    c.update(sliding_window=4, max_window_layers=1, use_sliding_window=False)
    return c


def gemma_config_patch(c):
    """As google/gemma-2b and -7b: legacy RoPE keys, `hidden_act: gelu` (which transformers reads
    as the tanh approximation for Gemma) next to `hidden_activation: gelu_pytorch_tanh`."""
    c = legacy_rope(c)
    c.update(hidden_act="gelu", hidden_activation="gelu_pytorch_tanh")
    return c


def build_llama(task, spec):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok, ids = build_llama3_tokenizer(task)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        hidden_act="silu",
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        # as Llama 3.1 (factor 8, low 1, high 4) but a small original context: with head_dim 16
        # and theta 5e5 the wavelengths are 6.3 (kept), 32.5 (smoothed), 168 and up (divided by 8)
        rope_parameters=dict(
            rope_type="llama3",
            rope_theta=500000.0,
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"],
    )
    return LlamaForCausalLM(cfg), tok, ids


def build_llama_linear(task, spec):
    from transformers import LlamaConfig, LlamaForCausalLM

    tok, ids = build_llama2_tokenizer(task, 48)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0),
        tie_word_embeddings=True,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"][0],
    )
    return LlamaForCausalLM(cfg), tok, ids


def build_mistral(task, spec):
    from transformers import MistralConfig, MistralForCausalLM

    tok, ids = build_llama2_tokenizer(task, 40)
    cfg = MistralConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-5,
        sliding_window=spec["sliding_window"],
        tie_word_embeddings=False,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"][0],
    )
    return MistralForCausalLM(cfg), tok, ids


def build_qwen2(task, spec):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tok, ids = build_qwen2_tokenizer(task)
    cfg = Qwen2Config(
        vocab_size=((len(tok) + 15) // 16) * 16 + 16,  # larger than the tokenizer, as Qwen2
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        rope_parameters=dict(rope_type="default", rope_theta=1000000.0),
        use_sliding_window=False,
        tie_word_embeddings=True,
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"][0],
    )
    return Qwen2ForCausalLM(cfg), tok, ids


def build_gemma(task, spec):
    from transformers import GemmaConfig, GemmaForCausalLM

    tok, ids = build_gemma_tokenizer(task)
    cfg = GemmaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,  # 4 heads x 16 = 64 != hidden_size 32
        hidden_activation="gelu_pytorch_tanh",
        max_position_embeddings=128,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        pad_token_id=ids["pad"],
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"][0],
    )
    return GemmaForCausalLM(cfg), tok, ids


MODELS = {
    "gpt2": dict(build=build_gpt2, cls="GPT2LMHeadModel", steps=3000, lr=3e-3, seed=21),
    "llama": dict(
        build=build_llama,
        cls="LlamaForCausalLM",
        steps=3000,
        lr=3e-3,
        seed=22,
        config_patch=legacy_rope,
    ),
    "mistral": dict(
        build=build_mistral,
        cls="MistralForCausalLM",
        steps=3000,
        lr=3e-3,
        seed=23,
        sliding_window=8,
    ),
    "qwen2": dict(
        build=build_qwen2,
        cls="Qwen2ForCausalLM",
        steps=3000,
        lr=3e-3,
        seed=24,
        config_patch=qwen2_config_patch,
    ),
    "gemma": dict(
        build=build_gemma,
        cls="GemmaForCausalLM",
        steps=3000,
        lr=3e-3,
        seed=25,
        save_dtype="bfloat16",
        config_patch=gemma_config_patch,
    ),
    "llama_linear": dict(
        build=build_llama_linear,
        cls="LlamaForCausalLM",
        steps=3000,
        lr=3e-3,
        seed=26,
        save_dtype="float16",
        shards=2,
    ),
}


# --------------------------------------------------------------------------------------------
# Encoding, training, recording
# --------------------------------------------------------------------------------------------


def end_id(ids, chain):
    """The EOS that ends the chain's sentences: for several EOS ids, never the first one
    (llama: <|eot_id|>, every third chain <|eom_id|>; qwen2: <|im_end|>, every fourth chain
    <|endoftext|>)."""
    eos = ids["eos"]
    if len(eos) == 3:
        return eos[1] if chain % 3 == 2 else eos[2]
    if len(eos) == 2:
        return eos[1] if chain % 4 == 3 else eos[0]
    return eos[0]


def encode_sentence(tok, ids, words, chain):
    return [*tok(" ".join(words))["input_ids"], end_id(ids, chain)]


def pad_right(rows, pad):
    n = max(len(r) for r in rows)
    x = np.array([r + [pad] * (n - len(r)) for r in rows], dtype=np.int64)
    m = np.array([[1] * len(r) + [0] * (n - len(r)) for r in rows], dtype=np.int64)
    return x, m


def pad_left(rows, pad):
    n = max(len(r) for r in rows)
    x = np.array([[pad] * (n - len(r)) + r for r in rows], dtype=np.int64)
    m = np.array([[0] * (n - len(r)) + [1] * len(r) for r in rows], dtype=np.int64)
    return x, m


def train_model(model, tok, ids, task, spec, log):
    torch.manual_seed(spec["seed"])
    rng = random.Random(spec["seed"])
    data = [encode_sentence(tok, ids, w, k) for w, k in task["train"]]
    opt = torch.optim.AdamW(model.parameters(), lr=spec["lr"], weight_decay=0.0)
    steps = spec["steps"]
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / 50) * max(0.05, 1 - s / steps)
    )
    model.train()
    losses = []
    t0 = time.time()
    for step in range(steps):
        # packed rows of 1 to 3 sentences (each with its BOS where the family adds one, and its
        # EOS): the sentences start at many positions, so the word pairs are learnt wherever
        # they occur and the held-out sentences are continued too
        b = [[t for _ in range(rng.randint(1, 3)) for t in rng.choice(data)] for _ in range(BATCH)]
        x, m = pad_right(b, 0)
        y = np.where(m == 1, x, -100)
        out = model(
            input_ids=torch.tensor(x), attention_mask=torch.tensor(m), labels=torch.tensor(y)
        )
        opt.zero_grad()
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(out.loss.item())
        if step % 250 == 0 or step == steps - 1:
            log(f"  step {step:4d} loss {np.mean(losses[-20:]):.4f}")
    model.eval()
    return dict(
        steps=steps,
        batch_size=BATCH,
        lr=spec["lr"],
        optimizer="AdamW (weight decay 0), 50 warm-up steps, linear decay to 5%, clip 1.0",
        final_loss=round(float(np.mean(losses[-20:])), 6),
        seed=spec["seed"],
        seconds=round(time.time() - t0, 1),
    )


def is_eos(t, ids):
    return t in ids["eos"]


def cut_after_eos(row, ids):
    row = list(row)
    for i, t in enumerate(row):
        if is_eos(t, ids):
            return row[: i + 1]
    return row


def hf_generate(model, prompt_ids, ids, **kw):
    pad = ids["gen_pad"]
    x, m = pad_left(prompt_ids, pad)
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor(x),
            attention_mask=torch.tensor(m),
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            return_dict_in_generate=True,
            output_scores=True,
            **kw,
        )
    new = out.sequences[:, x.shape[1] :].tolist()
    rows = [cut_after_eos(r, ids) for r in new]
    scores = getattr(out, "sequences_scores", None)
    return rows, (scores.tolist() if scores is not None else None)


def margins(model, prompt_ids, outs):
    """top-1 minus top-2 log-prob at each generated step (teacher forced, one row at a time)."""
    m, per_row = [], []
    for p, o in zip(prompt_ids, outs, strict=True):
        x = torch.tensor([p + o])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=x).logits[0].double(), -1)
        top2 = lp[len(p) - 1 : len(p) - 1 + len(o)].topk(2, -1).values
        row = (top2[:, 0] - top2[:, 1]).tolist()
        m.extend(row)
        per_row.append(round(min(row), 3))
    m = np.array(m)
    return dict(
        mean=round(float(m.mean()), 3),
        min=round(float(m.min()), 3),
        frac_below_1=round(float((m < 1.0).mean()), 4),
        n=int(m.size),
        min_per_prompt=per_row,
    )


TOKENIZER_TEXTS = [
    "",
    " ",
    "  leading spaces",
    "trailing space ",
    "multiple   inner    spaces",
    "line one\nline two\n\nend",
    "tab\tseparated",
    "unseen words: Hello, World! It's 'quoted'.",
    "digits 0 7 42 2024 1234567 3.14",
    "unicode café naïve Ωμέγα 日本語",
    "emoji 🙂 👍🏽 🇫🇷",
]


def record_tokenizer(tok, out_dir, ids, task):
    """The tokenizer as loaded by AutoTokenizer on a task sentence, edge cases and the family's
    EOS text inside a string; `raw_tokenizer_json_ids` is what tokenizer.json alone gives
    (`tokenizers.Tokenizer.from_file(...).encode(text)`) where it differs (null: the same)."""
    from tokenizers import Tokenizer

    raw = Tokenizer.from_file(os.path.join(out_dir, "tokenizer.json"))
    eos_text = tok.convert_ids_to_tokens(ids["eos"][0])
    texts = [
        " ".join(task["chains"][0][:5]),
        *TOKENIZER_TEXTS,
        f"special {eos_text} inside",
    ]
    cases = []
    for t in texts:
        got = tok(t)["input_ids"]
        raw_ids = raw.encode(t).ids
        cases.append(
            dict(
                text=t,
                ids=got,
                tokens=tok.convert_ids_to_tokens(got),
                decoded=tok.decode(got, skip_special_tokens=True),
                raw_tokenizer_json_ids=None if raw_ids == got else raw_ids,
            )
        )
    return cases


def run_ct2(model_dir, tok, prompt_ids, ids, log):
    import ctranslate2
    from ctranslate2.converters import TransformersConverter

    out_dir = tempfile.mkdtemp(prefix="ct2_")
    shutil.rmtree(out_dir)
    try:
        TransformersConverter(model_dir).convert(out_dir, quantization=None)
    except Exception as e:  # recorded, not fatal: a family the converter cannot handle
        log(f"  CTranslate2 conversion failed: {type(e).__name__}: {e}")
        return dict(error=f"{type(e).__name__}: {e}")
    gen = ctranslate2.Generator(
        out_dir, device="cpu", compute_type="float32", inter_threads=1, intra_threads=1
    )
    with open(os.path.join(out_dir, "config.json")) as f:
        ct2_config = json.load(f)
    vocab = tok.get_vocab()
    tokens = [tok.convert_ids_to_tokens(r) for r in prompt_ids]
    res = dict(config=ct2_config)
    for beam in (1, 4):
        opts = dict(
            beam_size=beam,
            length_penalty=0.0,
            include_prompt_in_result=False,
            max_length=MAX_NEW_TOKENS,
            return_scores=True,
            return_end_token=True,
            end_token=list(ids["end_tokens"]),
            max_batch_size=0,
        )
        try:
            results = gen.generate_batch(tokens, **opts)
        except Exception as e:
            log(f"  CTranslate2 beam {beam} failed: {type(e).__name__}: {e}")
            res[f"beam{beam}"] = dict(options=opts, error=f"{type(e).__name__}: {e}")
            continue
        toks = [r.sequences[0] for r in results]
        res[f"beam{beam}"] = dict(
            options=opts,
            tokens=toks,
            ids=[[vocab[t] for t in r] for r in toks],
            scores=[float(r.scores[0]) for r in results],
        )
        assert res[f"beam{beam}"]["ids"] == [list(r.sequences_ids[0]) for r in results]
        if beam == 1:
            # each prompt alone (batch of 1): the whole prompt goes through the decoder at once
            single = [gen.generate_batch([t], **opts)[0] for t in tokens]
            res["beam1_single"] = dict(
                options=opts,
                ids=[list(r.sequences_ids[0]) for r in single],
                scores=[float(r.scores[0]) for r in single],
            )
    del gen
    shutil.rmtree(out_dir)
    return res


def versions():
    import ctranslate2
    import safetensors
    import tokenizers
    import transformers

    return dict(
        python=platform.python_version(),
        torch=torch.__version__,
        transformers=transformers.__version__,
        tokenizers=tokenizers.__version__,
        safetensors=safetensors.__version__,
        ctranslate2=ctranslate2.__version__,
        numpy=np.__version__,
    )


def save_model(model, tok, ids, spec, out_dir):
    from transformers import GenerationConfig

    gen = GenerationConfig(
        bos_token_id=ids["bos"],
        eos_token_id=ids["eos"] if len(ids["eos"]) > 1 else ids["eos"][0],
        pad_token_id=ids["gen_pad"],
        do_sample=False,
        max_new_tokens=MAX_NEW_TOKENS,
    )
    model.generation_config = gen
    dtype = spec.get("save_dtype")
    to_save = model
    if dtype:
        to_save = copy.deepcopy(model).to(getattr(torch, dtype))
    kw = {}
    if spec.get("shards"):
        total = sum(t.numel() * t.element_size() for t in to_save.state_dict().values())
        kw["max_shard_size"] = int(total * 0.6)
    to_save.save_pretrained(out_dir, **kw)
    tok.save_pretrained(out_dir)
    if ids.get("tokenizer_config_patch"):
        path = os.path.join(out_dir, "tokenizer_config.json")
        with open(path) as f:
            c = json.load(f)
        c.update(ids["tokenizer_config_patch"])
        with open(path, "w") as f:
            json.dump(c, f, indent=2, sort_keys=True, ensure_ascii=False)
            f.write("\n")
    if spec.get("config_patch"):
        path = os.path.join(out_dir, "config.json")
        with open(path) as f:
            c = spec["config_patch"](json.load(f))
        with open(path, "w") as f:
            json.dump(c, f, indent=2, sort_keys=True)
            f.write("\n")
    if spec.get("shards"):
        shards = sorted(p for p in os.listdir(out_dir) if p.endswith(".safetensors"))
        assert len(shards) == spec["shards"], shards
        assert os.path.exists(os.path.join(out_dir, "model.safetensors.index.json"))


def make_one(name, out_root, log):
    spec = MODELS[name]
    task = make_task(SEED)
    out_dir = os.path.join(out_root, name)
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)
    torch.manual_seed(spec["seed"])
    model, tok, ids = spec["build"](task, spec)
    ids["gen_pad"] = ids["pad"] if ids["pad"] is not None else ids["eos"][0]
    log(
        f"[{name}] vocab: tokenizer {len(tok)}, model {model.config.vocab_size}; "
        f"params {sum(p.numel() for p in model.parameters())}"
    )
    train_stats = train_model(model, tok, ids, task, spec, log)
    save_model(model, tok, ids, spec, out_dir)
    return finish(name, out_dir, model, tok, ids, spec, train_stats, task, log)


def config_summary(cfg):
    keys = [
        "model_type",
        "vocab_size",
        "hidden_size",
        "n_embd",
        "intermediate_size",
        "num_hidden_layers",
        "n_layer",
        "num_attention_heads",
        "n_head",
        "num_key_value_heads",
        "head_dim",
        "hidden_act",
        "hidden_activation",
        "activation_function",
        "max_position_embeddings",
        "n_positions",
        "rms_norm_eps",
        "layer_norm_epsilon",
        "rope_parameters",
        "sliding_window",
        "tie_word_embeddings",
        "attention_bias",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "dtype",
    ]
    d = cfg.to_dict()
    return {k: d[k] for k in keys if k in d}


def finish(name, out_dir, trained, train_tok, ids, spec, train_stats, task, log):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Everything below comes from the saved directory, as a user would load it.
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32).eval()
    assert type(model).__name__ == spec["cls"], type(model).__name__
    tok = AutoTokenizer.from_pretrained(out_dir)
    stored = task["stored"]
    prompts = [s["prompt"] for s in stored]
    prompt_ids = [tok(p)["input_ids"] for p in prompts]
    full_ids = [
        encode_sentence(tok, ids, (s["prompt"] + s["continuation"]).split(" "), s["chain"])
        for s in stored
    ]
    for p, f in zip(prompt_ids, full_ids, strict=True):
        assert f[: len(p)] == p, (p, f)
        assert train_tok(tok.decode(p, skip_special_tokens=True))["input_ids"] == p

    # teacher forcing, right-padded, float32 and float64
    x, m = pad_right(full_ids[:N_LOGITS], ids["gen_pad"])
    xt, mt = torch.tensor(x), torch.tensor(m)
    # the trained model, its weights rounded as saved: what the directory must reproduce (this
    # also checks that the hand-edited config.json means the same to transformers)
    rounded = trained
    if spec.get("save_dtype"):
        rounded = copy.deepcopy(trained)
        with torch.no_grad():
            for prm in rounded.parameters():  # the parameters only: RoPE buffers stay float32
                prm.copy_(prm.to(getattr(torch, spec["save_dtype"])).float())
    with torch.no_grad():
        l32 = model(input_ids=xt, attention_mask=mt).logits
        l_trained = trained(input_ids=xt, attention_mask=mt).logits
        l_rounded = rounded(input_ids=xt, attention_mask=mt).logits
        l64 = copy.deepcopy(model).double()(input_ids=xt, attention_mask=mt).logits
    valid = mt.bool()
    reload_diff = float((l32 - l_rounded)[valid].abs().max())
    assert reload_diff < 1e-4, f"reloaded model differs from the trained one: {reload_diff}"
    rounding_effect = float((l_rounded - l_trained)[valid].abs().max())
    f32_err = float((l32.double() - l64)[valid].abs().max())
    np.savez(
        os.path.join(out_dir, "arrays.npz"),
        input_ids=x.astype(np.int32),
        attention_mask=m.astype(np.int32),
        logits_f32=l32.numpy().astype(np.float32),
        logits_f64=l64.numpy().astype(np.float64),
    )

    # convention checks: the model run with a convention dropped (or wrongly applied); how
    # much that changes the logits at these lengths and the greedy outputs
    variants = convention_variants(model)
    effects = {
        k: _variant_diff(model, v, xt, mt, valid, prompt_ids, ids) for k, v in variants.items()
    }

    gen_cfg = json.loads(model.generation_config.to_json_string(use_diff=True))
    pad = ids["gen_pad"]
    greedy_kw = dict(do_sample=False, num_beams=1, max_new_tokens=MAX_NEW_TOKENS)
    greedy, _ = hf_generate(model, prompt_ids, ids, num_beams=1)
    single = [hf_generate(model, [p], ids, num_beams=1)[0][0] for p in prompt_ids]
    beam_kw = dict(num_beams=4, length_penalty=0.0, early_stopping=False, num_return_sequences=1)
    beam, beam_scores = hf_generate(model, prompt_ids, ids, **beam_kw)
    texts = tok.batch_decode(greedy, skip_special_tokens=True)
    expected = [
        [*tok(s["prompt"] + s["continuation"])["input_ids"][len(p) :], end_id(ids, s["chain"])]
        for s, p in zip(stored, prompt_ids, strict=True)
    ]
    exact = [g == e for g, e in zip(greedy, expected, strict=True)]
    marg = margins(model, prompt_ids, greedy)
    ct2 = run_ct2(out_dir, tok, prompt_ids, ids, log)

    agree = dict(
        rows=len(prompts),
        greedy_batched_vs_single=sum(a == b for a, b in zip(greedy, single, strict=True)),
        greedy_vs_beam_hf=sum(a == b for a, b in zip(greedy, beam, strict=True)),
        greedy_vs_task=sum(exact),
        greedy_vs_task_seen=sum(e for e, s in zip(exact, stored, strict=True) if s["seen"]),
        greedy_ends_with_eos=sum(1 for r in greedy if r and is_eos(r[-1], ids)),
        greedy_eos_used={str(t): sum(1 for r in greedy if r and r[-1] == t) for t in ids["eos"]},
    )
    max_score_diff = None
    ct2_mismatch = {}
    score_attribution = {}
    hf_beam_rescored = rescore(model, prompt_ids, beam)
    hf_beam_score_err = max(abs(a - b) for a, b in zip(beam_scores, hf_beam_rescored, strict=True))
    for key, ref in (("beam1", greedy), ("beam1_single", greedy), ("beam4", beam)):
        if "ids" not in ct2.get(key, {}):
            continue
        got = ct2[key]["ids"]
        agree[f"hf_vs_ct2_{key}"] = sum(a == b for a, b in zip(ref, got, strict=True))
        ct2_mismatch[key] = [i for i, (a, b) in enumerate(zip(ref, got, strict=True)) if a != b]
        # which model do CTranslate2's scores belong to? rescore its outputs with the model
        # and with each variant
        score_attribution[key] = {
            k: round(
                max(
                    abs(a - b)
                    for a, b in zip(ct2[key]["scores"], rescore(m, prompt_ids, got), strict=True)
                ),
                6,
            )
            for k, m in {"hf": model, **variants}.items()
        }
    if "ids" in ct2.get("beam4", {}):
        same = [
            (a, b)
            for a, b, r, s in zip(
                beam_scores, ct2["beam4"]["scores"], beam, ct2["beam4"]["ids"], strict=True
            )
            if r == s
        ]
        if same:
            max_score_diff = round(max(abs(a - b) for a, b in same), 6)

    goldens = dict(
        name=name,
        generator="tools/hf_lm_goldens.py",
        versions=versions(),
        model_type=model.config.model_type,
        model_class=spec["cls"],
        config=config_summary(model.config),
        saved_dtype=spec.get("save_dtype", "float32"),
        weight_files=sorted(p for p in os.listdir(out_dir) if "safetensors" in p),
        tokenizer_class=type(tok).__name__,
        tokenizer_len=len(tok),
        bos_id=ids["bos"],
        adds_bos=bool(prompt_ids[0] and prompt_ids[0][0] == ids["bos"]),
        eos_ids=ids["eos"],
        pad_id=pad,
        generation_config=gen_cfg,
        training=dict(
            {k: v for k, v in train_stats.items() if k != "seconds"},
            sentences=len(task["train"]),
        ),
        task=dict(
            description=describe_task(task),
            words=task["words"],
            chains=task["chains"],
            end_token_per_chain=[
                tok.convert_ids_to_tokens(end_id(ids, k)) for k in range(len(task["chains"]))
            ],
        ),
        tokenizer_cases=record_tokenizer(tok, out_dir, ids, task),
        prompts=[
            dict(
                text=s["prompt"],
                ids=p,
                continuation=s["continuation"],
                expected_new_ids=e,
                seen=s["seen"],
            )
            for s, p, e in zip(stored, prompt_ids, expected, strict=True)
        ],
        teacher_forcing=dict(
            rows=N_LOGITS,
            shape=list(l32.shape),
            note="arrays.npz: input_ids/attention_mask [8, T] (right-padded with pad_id), "
            "logits_f32 [8, T, V] (float32 model), logits_f64 (the same weights in float64); "
            "only positions with attention_mask 1 are meaningful",
            max_abs_f32_vs_f64=f32_err,
            max_abs_reload_vs_trained=reload_diff,
            max_abs_change_from_saved_dtype_rounding=rounding_effect,
        ),
        greedy=dict(
            kwargs=greedy_kw,
            batch="all prompts in one batch, left-padded with pad_id (attention_mask 0 there)",
            ids=greedy,
            texts=texts,
            single_ids_differ=[
                i for i, (a, b) in enumerate(zip(greedy, single, strict=True)) if a != b
            ],
        ),
        beam_hf=dict(
            kwargs=dict(do_sample=False, max_new_tokens=MAX_NEW_TOKENS, **beam_kw),
            ids=beam,
            sequence_scores=beam_scores,
            texts=tok.batch_decode(beam, skip_special_tokens=True),
        ),
        ct2=ct2,
        report=dict(
            agreement=agree,
            ct2_mismatch_rows=ct2_mismatch,
            ct2_vs_hf_beam_max_score_diff=max_score_diff,
            ct2_max_abs_score_vs_rescored=score_attribution,
            hf_beam_max_abs_score_vs_rescored=round(hf_beam_score_err, 6),
            greedy_margin=marg,
            max_abs_f32_vs_f64=f32_err,
            convention_effects=effects,
        ),
    )
    with open(os.path.join(out_dir, "goldens.json"), "w") as f:
        json.dump(goldens, f, ensure_ascii=False, indent=1)
        f.write("\n")
    size = sum(os.path.getsize(os.path.join(out_dir, p)) for p in os.listdir(out_dir))
    log(
        f"[{name}] loss {train_stats['final_loss']:.4f} in {train_stats['seconds']}s; "
        f"agreement {agree}; ct2 mismatches {ct2_mismatch}; margin {marg}; "
        f"f32 err {f32_err:.2e}; score diff {max_score_diff}; effects {effects}; "
        f"{size / 1024:.0f} KiB"
    )
    return goldens["report"]


def convention_variants(model):
    """The same weights under configs that drop (or wrongly apply) a convention of the family."""
    cfg = model.config
    d = cfg.to_dict()
    rope = dict(getattr(cfg, "rope_parameters", None) or {})
    cfgs = {}
    if rope.get("rope_type", "default") != "default":
        cfgs["without_rope_scaling"] = dict(
            d, rope_parameters={"rope_type": "default", "rope_theta": rope["rope_theta"]}
        )
    if rope.get("rope_type") == "llama3":
        # what a loader that ignores original_max_position_embeddings (Llama 3.1's 8192) runs
        cfgs["llama3_original_max_8192"] = dict(
            d, rope_parameters=dict(rope, original_max_position_embeddings=8192)
        )
    if cfg.model_type == "gpt2":
        cfgs["gpt2_exact_gelu"] = dict(d, activation_function="gelu")  # not gelu_new (tanh)
    if cfg.model_type == "mistral":
        cfgs["without_sliding_window"] = dict(d, sliding_window=None)
    if cfg.model_type == "qwen2":
        # config.json's sliding_window applied although use_sliding_window is false
        cfgs["qwen2_sliding_window_applied"] = dict(
            d, use_sliding_window=True, sliding_window=4, layer_types=None
        )
    out = {}
    for k, c in cfgs.items():
        other = type(model)(type(cfg).from_dict(c)).eval()
        other.load_state_dict(model.state_dict())
        other.generation_config = model.generation_config
        out[k] = other
    if cfg.model_type == "gemma":
        # config.json's `hidden_act: gelu` taken literally (exact erf GELU)
        c = type(cfg).from_dict(d)
        c.hidden_act = "gelu"
        other = type(model)(c).eval()
        other.load_state_dict(model.state_dict())
        other.generation_config = model.generation_config
        out["gemma_hidden_act_exact_gelu"] = other
    return out


def rescore(model, prompt_ids, rows):
    """Sum of the log-probs of each row of new ids after its prompt (teacher forced, one row at
    a time, float64 log-softmax of the model's logits)."""
    out = []
    for p, r in zip(prompt_ids, rows, strict=True):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([p + r])).logits[0].double()
        lp = torch.log_softmax(logits, -1)[len(p) - 1 : len(p) - 1 + len(r)]
        out.append(float(lp[torch.arange(len(r)), torch.tensor(r)].sum()))
    return out


def _variant_diff(model, other, xt, mt, valid, prompt_ids, ids):
    """Max |logit change| when the model runs without the convention, and the greedy rows that
    change (so that a peer ignoring it would be caught)."""
    with torch.no_grad():
        a = model(input_ids=xt, attention_mask=mt).logits
        b = other(input_ids=xt, attention_mask=mt).logits
    g1, _ = hf_generate(model, prompt_ids, ids, num_beams=1)
    g2, _ = hf_generate(other, prompt_ids, ids, num_beams=1)
    return dict(
        max_abs=round(float((a - b)[valid].abs().max()), 6),
        greedy_rows_changed=sum(x != y for x, y in zip(g1, g2, strict=True)),
    )


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="comma-separated model names: " + ",".join(MODELS))
    ap.add_argument(
        "--out",
        default=os.path.join(
            os.path.dirname(os.path.abspath(__file__)), "..", "tests", "data", "hf_lm"
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

    t_all = time.time()
    for n in names:
        t0 = time.time()
        make_one(n, os.path.normpath(args.out), log)
        log(f"[{n}] done in {time.time() - t0:.1f}s")
    log(f"all done in {time.time() - t_all:.1f}s")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("RAYON_NUM_THREADS", "1")
    main()
