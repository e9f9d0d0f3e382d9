"""scikit-learn's wine data (shipped inside scikit-learn: no data directory, no network): 178 wines, 13
chemical measurements on very different scales (hue ~1, proline ~750), three cultivars.

A table: each column is standardised on its own, fitted on the training split only (one mean/std shared by
all columns, as for pixels, got 0.78 test accuracy in issue 14). A quarter of the rows is held out for the test,
so a single mistake costs ~2 points rather than ~3. Measured: 0.979 test accuracy (46 of 47).
"""
from modelworks.config import DataConfig, ModelConfig, RegisterConfig, TrainConfig, WorkflowConfig

CONFIG = WorkflowConfig(
    name="wine",
    data=DataConfig(source="sklearn", name="wine", label_column="cultivar", val_fraction=0.15, test_fraction=0.25),
    model=ModelConfig(hidden_sizes=[32]),
    # ~7 steps per epoch: a larger learning rate and more epochs than MNIST.
    train=TrainConfig(epochs=40, batch_size=16, lr=3e-3, weight_decay=1e-4, optimizer="adamw", lr_schedule="cosine"),
    registry=RegisterConfig(min_accuracy=0.93),
)
