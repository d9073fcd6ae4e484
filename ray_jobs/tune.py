"""Ray Tune sweep over stage-2 fine-tuning on the pipeline's PREPARED/ and ALIGNED/ outputs."""
from lsvcr.cli.jobs import tune_job_main

if __name__ == "__main__":
    raise SystemExit(tune_job_main())
