"""monai-multiad: Multi-AD unsupervised anomaly detection for MONAI."""


def _version() -> str:
    """The installed distribution's version (``version`` in pyproject.toml, the one place it is set);
    from a source folder that was never installed, the one in its pyproject.toml."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("monai-multiad")
    except PackageNotFoundError:
        import re
        from pathlib import Path

        try:
            text = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
        except OSError:
            return "0+unknown"
        found = re.search(r'^version\s*=\s*"([^"]+)"', text, re.MULTILINE)
        return found.group(1) if found else "0+unknown"


__version__ = _version()
