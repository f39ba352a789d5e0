"""pydantic v2 models: the single source of truth for every config a user writes."""
from schemas.loader import ConfigError, load_config, load_run_config
from schemas.run import RunConfig

__all__ = ["ConfigError", "RunConfig", "load_config", "load_run_config"]
