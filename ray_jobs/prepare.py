"""Raw tables (or the embedded synthetic set) -> PREPARED/ Parquet samples."""
from lsvcr.cli.jobs import job_main

if __name__ == "__main__":
    raise SystemExit(job_main(("prepare",), __doc__))
