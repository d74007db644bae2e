"""topology.yaml: the pydantic models that mirror it (`topology`) and reading it (`loader`)."""
