"""Collect metrics of every fine-tuned model plus the popularity baseline, write report/ (Markdown + PNG)."""
from lsvcr.cli.jobs import job_main

if __name__ == "__main__":
    raise SystemExit(job_main(("evaluate", "report"), __doc__))
