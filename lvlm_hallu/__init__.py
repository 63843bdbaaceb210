"""lvlm-hallu: one import namespace for the project's packages.

The repository keeps the design's top-level folders (lvlm/, interventions/, kernels/, eval/,
serve/); installed, they are the subpackages `lvlm_hallu.lvlm`, `lvlm_hallu.kernels`, ... so that
none of them takes a top-level name another distribution owns (Hugging Face's `kernels`, for one).
pyproject.toml maps the folders into this namespace for wheels and editable installs. A source
checkout used without installing (a benchmark script, a lent GPU machine's system Python) finds
them through `__path__` below, which looks beside this folder only in this project's own checkout.
"""

from pathlib import Path as _Path

_CHECKOUT = _Path(__file__).resolve().parent.parent
if (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "lvlm" / "__init__.py").is_file():
    __path__.append(str(_CHECKOUT))  # noqa: F821 (the package's own __path__)
