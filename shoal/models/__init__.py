"""Reference models by name. Each is an options dataclass with
`build(input_shape, num_classes)` -> `torch.nn.Module`."""

from shoal.registry import Registry

MODELS = Registry(
    "model",
    {
        "mlp": "shoal.models.mlp:MLP",
        "cnn": "shoal.models.cnn:CNN",
        "gpt": "shoal.models.gpt:GPT",
    },
)

__all__ = ["MODELS"]
