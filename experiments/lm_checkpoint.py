"""A Hugging Face Llama directory of a real model's exact shapes, random weights, written with numpy.

    python experiments/lm_checkpoint.py --shape llama-3.2-1b --out ~/.cache/jaxformer/llama-3.2-1b

Nothing is downloaded: ``config.json`` and ``generation_config.json`` carry the released model's
fields (meta-llama/Llama-3.2-1B: 16 layers, D 2048, 32 heads, 8 key/value heads, F 8192, vocabulary
128,256, tied embeddings, RoPE theta 500,000 with the llama3 scaling, three end ids), and
``model.safetensors`` random bfloat16 weights (normal, std 0.02; norms 1), written tensor by tensor
in the safetensors format (an 8-byte header length, a JSON header, the bytes), so writing never
holds more than one tensor. ``bench_lm.py`` loads it with every engine; ``--shape tiny-llama`` is a
small one for the smoke run.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import ml_dtypes
import numpy as np

SHAPES = {
    "llama-3.2-1b": dict(
        vocab_size=128256,
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        max_position_embeddings=131072,
    ),
    "tiny-llama": dict(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=2048,
    ),
}


def config(shape: str) -> dict:
    sizes = SHAPES[shape]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **sizes,
        "hidden_act": "silu",
        "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0,
        "rope_scaling": {
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "tie_word_embeddings": True,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 128000 if sizes["vocab_size"] > 128000 else 1,
        "eos_token_id": [128001, 128008, 128009] if sizes["vocab_size"] > 128000 else [2],
        "torch_dtype": "bfloat16",
    }


def tensor_shapes(c: dict) -> dict[str, tuple[int, ...]]:
    d, f, h = c["hidden_size"], c["intermediate_size"], c["head_dim"]
    q, kv = c["num_attention_heads"] * h, c["num_key_value_heads"] * h
    shapes = {"model.embed_tokens.weight": (c["vocab_size"], d), "model.norm.weight": (d,)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}"
        shapes |= {
            f"{p}.input_layernorm.weight": (d,),
            f"{p}.post_attention_layernorm.weight": (d,),
            f"{p}.self_attn.q_proj.weight": (q, d),
            f"{p}.self_attn.k_proj.weight": (kv, d),
            f"{p}.self_attn.v_proj.weight": (kv, d),
            f"{p}.self_attn.o_proj.weight": (d, q),
            f"{p}.mlp.gate_proj.weight": (f, d),
            f"{p}.mlp.up_proj.weight": (f, d),
            f"{p}.mlp.down_proj.weight": (d, f),
        }
    return shapes


def write(directory: pathlib.Path, shape: str, seed: int = 0) -> pathlib.Path:
    """Writes the directory (if its ``model.safetensors`` is not there yet) and returns it."""
    directory.mkdir(parents=True, exist_ok=True)
    c = config(shape)
    target = directory / "model.safetensors"
    if target.exists():
        return directory
    (directory / "config.json").write_text(json.dumps(c, indent=2))
    generation = {"bos_token_id": c["bos_token_id"], "eos_token_id": c["eos_token_id"]}
    (directory / "generation_config.json").write_text(json.dumps(generation, indent=2))
    shapes = tensor_shapes(c)
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dims in shapes.items():
        size = 2 * int(np.prod(dims))
        header[name] = {
            "dtype": "BF16",
            "shape": list(dims),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-aligned
    rng = np.random.default_rng(seed)
    partial = target.with_suffix(".partial")
    with partial.open("wb") as f:
        f.write(len(text).to_bytes(8, "little"))
        f.write(text)
        for name, dims in shapes.items():
            if name.endswith("norm.weight"):
                values = np.ones(dims, np.float32)
            else:
                values = rng.standard_normal(dims, np.float32) * np.float32(0.02)
            f.write(values.astype(ml_dtypes.bfloat16).tobytes())
            del values
    partial.rename(target)
    write_tokenizer(directory, c["vocab_size"])
    return directory


def write_tokenizer(directory: pathlib.Path, vocab_size: int) -> None:
    """A placeholder ``tokenizer.json`` (token i is the word ``t{i}``): the benchmark decodes ids,
    but CTranslate2's converter builds its vocabulary from a tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {f"t{i}": i for i in range(vocab_size)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(directory / "tokenizer.json"))
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "t0"}
    (directory / "tokenizer_config.json").write_text(json.dumps(settings))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.partition("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="llama-3.2-1b")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    print(write(pathlib.Path(args.out).expanduser(), args.shape))
