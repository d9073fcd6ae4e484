"""Raw tables -> prepare -> encode -> align -> finetune (both tasks) -> evaluate -> report; resumes on re-submit."""
from lsvcr.cli.jobs import job_main
from lsvcr.pipeline import STAGES

if __name__ == "__main__":
    raise SystemExit(job_main(STAGES, __doc__))
