"""modelworks: a Python workflow takes a dataset to a served model on Ray."""
__version__ = "0.1.0"
