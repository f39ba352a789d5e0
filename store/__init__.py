"""Where runs live, without Ray: :class:`~store.storage.Storage` (a local folder or S3, atomic writes, retries),
:class:`~store.run_store.RunStore` (one run's layout and facts) and reference statistics in storage.

Between ``sida_core`` (below: it never imports this) and ``ray_jobs`` / ``pipelines`` (above), so read-only
commands (``sida leaderboard``, ``report``, ``evaluate``) never import Ray."""
