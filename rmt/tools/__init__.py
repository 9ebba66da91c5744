"""The command-line layer: what the scripts in ``scripts/`` and ``python -m rmt`` share, kept apart from the library.

* :mod:`~rmt.tools.cli`: one-line errors (``ScriptError``, ``run_main``), checked argument values, ``--config``
  files, model arguments and building, AMP set-up;
* :mod:`~rmt.tools.data`: datasets opened from ``--dataset`` / ``--data-dir``, the evaluation loader;
* :mod:`~rmt.tools.evaluate`: the evaluation loop of training and ``validate.py``;
* :mod:`~rmt.tools.train_utils`: the training checkpoint saver, DDP set-up, the Pillow fix RandAugment needs.

The library (the rest of ``rmt``) imports nothing from here; each submodule loads on first use
(``rmt.tools.cli``).
"""
import importlib

_SUBMODULES = ('cli', 'data', 'evaluate', 'train_utils')


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f'.{name}', __name__)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
