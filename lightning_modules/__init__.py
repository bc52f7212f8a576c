"""Lightning glue: thin modules that call the framework-free core in :mod:`robustx`."""

__all__ = ["RobustClassifier"]


def __getattr__(name: str):
    # Lazy, so that an entry point's --help (jobs.help) does not import Lightning.
    if name == "RobustClassifier":
        from lightning_modules.robust_classifier import RobustClassifier

        return RobustClassifier
    raise AttributeError(name)
