"""The LLM side of LSVCR: offline model registry, prompts, vLLM encoding, stage-1 alignment."""
