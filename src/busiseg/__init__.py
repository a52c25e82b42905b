"""busiseg: breast-ultrasound lesion segmentation, run through DVC."""
__version__ = "0.1.0"


def busiseg_version() -> str:
    """The installed package's version (what `busiseg --version` prints and predict records),
    else `__version__` for a source tree that was never installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("busiseg")
    except PackageNotFoundError:
        return __version__
