"""vLLM on Ray actors: item texts and user-history prompts -> VECTORS/ (needs PREPARED/)."""
from lsvcr.cli.jobs import job_main

if __name__ == "__main__":
    raise SystemExit(job_main(("encode",), __doc__))
