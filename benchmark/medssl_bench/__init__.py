"""medssl-bench: benchmark self-supervised proxy tasks for medical imaging.

The core holds the plugin contract (hookspecs, base classes, registry), the engine
(pretrain, fine-tune, evaluate), the protocol runners, MLflow tracking, the leaderboard
and the CLI. Proxy tasks, backbones and datasets live in plugins, the built-in ones in
``medssl_bench_tasks``, ``medssl_bench_backbones`` and ``medssl_bench_datasets``.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("medssl-bench")
except PackageNotFoundError:  # running from a checkout without installing
    __version__ = "0.0.0+unknown"
