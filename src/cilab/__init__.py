"""cilab: class-incremental learning on CIFAR-100 with ResNet-32, fast and faithful.

The Python API, for notebooks and sweeps (the command line runs the same)::

    from cilab import build_config, run

    cfg = build_config("icarl", ["data.name=digits", "scenario.num_tasks=5"])
    metrics = run(cfg, "runs/icarl-digits")   # metrics.json's content

- ``build_config(preset=None, overrides=None)``: defaults <- preset (a name or
  a YAML path) <- overrides (``["key=value", ...]`` or a nested dict), validated;
- ``run(cfg, out, *, resume=False, overwrite=False, progress=True)``: the whole
  protocol into the run folder ``out``; returns the metrics;
- ``evaluate_run(cfg, source, out, *, overwrite=False)``: a run of ``cfg`` whose config
  differs from the complete run in ``source`` only in its classifiers, evaluated from
  ``source``'s checkpoints instead of trained (``cilab evaluate``); returns the metrics;
- the registries a user's own code adds to: ``METHODS``, ``MODELS``, ``DATASETS``.

Everything is imported on first use, so ``import cilab`` stays cheap.
"""

__version__ = "0.1.0"

__all__ = ["Config", "build_config", "run", "evaluate_run", "METHODS", "MODELS", "DATASETS", "__version__"]

# name -> (module, attribute), imported on first access (PEP 562)
_LAZY = {
    "Config": ("cilab.config", "Config"),
    "build_config": ("cilab.config", "build_config"),
    "run": ("cilab.experiment", "run"),
    "evaluate_run": ("cilab.reevaluate", "evaluate_run"),
    "METHODS": ("cilab.methods", "METHODS"),  # a module or a package: either exports METHODS
    "MODELS": ("cilab.models", "MODELS"),
    "DATASETS": ("cilab.data", "DATASETS"),
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'cilab' has no attribute '{name}'")


def __dir__() -> list[str]:
    return sorted(list(globals()) + list(_LAZY))
