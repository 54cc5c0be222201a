"""Online inference: the medray Ray Serve application.

* :mod:`medray.serve.encoder`: the encoder deployment (decode off the event
  loop, ``@serve.batch`` dynamic batching, GPU when present);
* :mod:`medray.serve.heads`: task heads multiplexed by id (``@serve.multiplexed``);
* :mod:`medray.serve.ingress`: FastAPI routes, auth, limits, error mapping;
* :mod:`medray.serve.app`: ``build_app(args) -> Application``, the one builder
  behind ``medray serve``, ``serve run``/``serve deploy`` and a RayService;
* :mod:`medray.serve.config`: the settings and their checks (no Ray).

Importing this package is cheap; ``build_app`` and ``ServeArgs`` import Ray
Serve on first use.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ServeArgs", "build_app"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from medray.serve import app  # lazy: imports ray

        return getattr(app, name)
    raise AttributeError(f"module 'medray.serve' has no attribute {name!r}")
