"""Embedded default: scikit-learn's 8x8 digits (1,797 images, shipped inside scikit-learn).

Needs no data directory and no network; about a minute on 2 cores. `make run` runs this.
"""
from modelworks.config import DataConfig, ModelConfig, RegisterConfig, SearchConfig, TrainConfig, WorkflowConfig

CONFIG = WorkflowConfig(
    name="digits",
    data=DataConfig(source="digits", name="digits", val_fraction=0.15, test_fraction=0.2),
    model=ModelConfig(hidden_sizes=[128, 64]),
    # Small data: a larger learning rate and more epochs than MNIST; each epoch is ~20 steps.
    train=TrainConfig(epochs=20, batch_size=64, lr=3e-3, weight_decay=1e-4, optimizer="adamw", lr_schedule="cosine"),
    registry=RegisterConfig(min_accuracy=0.95),
    # `modelworks tune workflows/digits.py` (or --set search.enabled=true on `run`): 8 trials, ASHA.
    search=SearchConfig(
        enabled=False,
        num_samples=8,
        max_epochs=20,
        grace_period=2,
        reduction_factor=3,
        space={
            "train.lr": {"loguniform": [3e-4, 1e-2]},
            "train.batch_size": {"choice": [32, 64, 128]},
            "model.hidden_sizes": {"choice": [[64], [128, 64], [256, 128]]},
            "model.dropout": {"uniform": [0.0, 0.3]},
            "train.weight_decay": {"loguniform": [1e-6, 1e-3]},
        },
    ),
)
