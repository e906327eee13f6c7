"""zeroconv: train ControlNets, and see whether control is being learned."""

__version__ = "0.1.0"


def toy_base() -> str:
    """Path of the toy SD-family base that ships inside the package (see zeroconv/assets/toy_base/README.md)."""
    from zeroconv.models.toy_base import toy_base_path

    return str(toy_base_path())
