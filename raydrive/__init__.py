"""raydrive: train camera 3D detection and end-to-end driving models on Ray clusters."""

__version__ = "0.1.0"


def list_models() -> list[str]:
    """Names of the registered models (`python -m raydrive.train NAME`)."""
    from raydrive.trainers import list_models as _list

    return _list()


def build_model(name: str, preset: str = "full", assets: dict | None = None, **overrides):
    """The model as a plain `nn.Module` (random init), e.g. `build_model("sparse4d", preset="small")`;
    see `raydrive.trainers.build_model`."""
    from raydrive.trainers import build_model as _build

    return _build(name, preset, assets, **overrides)
