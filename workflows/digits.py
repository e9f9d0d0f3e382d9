"""Embedded default: scikit-learn's 8x8 digits (1,797 images, shipped inside scikit-learn).

Needs no data directory and no network; about a minute on 2 cores. `make run` runs this.
"""
from modelworks.config import DataConfig, ModelConfig, RegisterConfig, TrainConfig, WorkflowConfig

CONFIG = WorkflowConfig(
    name="digits",
    data=DataConfig(source="digits", name="digits", val_fraction=0.15, test_fraction=0.2),
    model=ModelConfig(hidden_sizes=[128, 64]),
    # Small data: a larger learning rate and more epochs than MNIST; each epoch is ~20 steps.
    train=TrainConfig(epochs=20, batch_size=64, lr=3e-3, weight_decay=1e-4, optimizer="adamw", lr_schedule="cosine"),
    registry=RegisterConfig(min_accuracy=0.95),
)
