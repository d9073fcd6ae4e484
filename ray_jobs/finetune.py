"""Stage 2: fine-tune the SR backbone for both tasks on Ray Train -> models/ (needs ALIGNED/)."""
from lsvcr.cli.jobs import job_main

if __name__ == "__main__":
    raise SystemExit(job_main(("finetune",), __doc__))
