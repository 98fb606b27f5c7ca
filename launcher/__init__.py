"""The executors: they run ftlib's steps as jobs, on Slurm or on this machine. ftlib never imports this package.

How `make train RECIPE=x.yaml` goes, top to bottom:

  ftlib/cli.py         loads the recipe, picks the stages (preprocess -> train -> serve) and an executor
  launcher/launch.py   the chain: one loop over the stages; a stage already done is skipped
  launcher/stages.py   what each stage is: the callable its tasks run, how many, how to know it is done
  launcher/executors.py  how a stage is run: Slurm (submitit, afterok chain), Local (submitit's LocalExecutor,
                       one stage after the other), DryRun (writes the sbatch scripts)
  launcher/sbatch.py   recipe -> sbatch parameters and text (pure; checked against tests/golden/)
  launcher/jobs.py     the callables inside the jobs: thin wrappers around ftlib's steps (signals, requeue)
  launcher/task.py     what each task runs on its node: submitit's job runner, then an exit that cannot fail it
  launcher/records.py  jobs.json (which job ran which stage) and Slurm's accounting (sacct, squeue)
  launcher/status.py   `make status`, `make logs`, `make cancel`

The top-level slurm/ folder keeps the sbatch script users submit by hand (slurm/preprocess.sbatch).
"""
