"""Stage 1: personalized preference alignment on Ray Train -> ALIGNED/ (needs PREPARED/, VECTORS/)."""
from lsvcr.cli.jobs import job_main

if __name__ == "__main__":
    raise SystemExit(job_main(("align",), __doc__))
