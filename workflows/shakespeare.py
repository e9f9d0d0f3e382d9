"""Text generation: a character-level causal Transformer (GPT-style) on Tiny Shakespeare.

The settings are the well-known small CPU configuration of this task (nanoGPT's shakespeare_char on a
CPU): context 64, batch 12, 4 layers, 4 heads, width 128, no dropout, 2,000 steps, learning rate 1e-3
warming up over 100 steps and decaying to 1e-4, AdamW (beta2 0.99), gradients clipped at 1.0. The first
90 % of the text trains and the last 10 % validates, as published figures do (validation loss ~1.88).

Reads $MODELWORKS_DATA_DIR/tiny-shakespeare/input.txt (or --data-dir, or --set data.path=FILE).
Then: modelworks generate shakespeare@production --prompt "ROMEO:" --max-new-tokens 200
"""
from modelworks.config import (DataConfig, EvaluateConfig, ModelConfig, RegisterConfig, ServeConfig, TrainConfig,
                               WorkflowConfig)

CONFIG = WorkflowConfig(
    name="shakespeare",
    data=DataConfig(source="corpus", name="tiny-shakespeare", val_fraction=0.1),
    model=ModelConfig(name="transformer", task="language_model", d_model=128, n_layers=4, n_heads=4, d_ff=512,
                      max_len=64, dropout=0.0),
    train=TrainConfig(max_steps=2000, eval_every=250, eval_batches=20, batch_size=12, lr=1e-3, lr_schedule="cosine",
                      min_lr=1e-4, warmup_ratio=0.05, beta2=0.99, weight_decay=0.1, grad_clip=1.0),
    evaluate=EvaluateConfig(sample_prompts=["ROMEO:", "JULIET:\n"], sample_tokens=300, sample_temperature=0.8),
    # A model that has not learned more than letter frequencies (loss ~3.3) is not worth promoting.
    registry=RegisterConfig(gate_metric="val_loss", gate_threshold=2.5),
    serve=ServeConfig(max_replicas=1),
)
