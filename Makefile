# Every target is a thin wrapper around `python -m ftlib <command>`; call that directly with the same arguments.
#   make demo                                   the whole pipeline locally on the embedded default
#   make test                                   the test suite (starts the local test Slurm cluster)
#   make test-security                          only the security tests (another user attacks the product)
#   make train RECIPE=recipes/x.yaml [OVERRIDES="train.learning_rate=1e-4 slurm.train.nodes=4"] [DRY_RUN=1]
# Each target first makes sure of the environment it runs in (env/setup.sh: a fast check once it is built): every
# one needs .venv; make test and setup-serve also .venv-serve, which serve.engine=vllm builds on first use otherwise.
VENV     ?= .venv
PY       := $(VENV)/bin/python
FT       := $(PY) -m ftlib
RECIPE   ?= recipes/demo.yaml
OVERRIDES ?=
RUN      ?=
STAGE    ?= train
TASK     ?= 0
RUNS     ?= runs
PYTEST_ARGS ?=
DRY      := $(if $(filter 1 yes true,$(DRY_RUN)),--dry-run)

.PHONY: setup setup-serve demo test test-security train preprocess sweep serve show status logs cancel export eval report tensorboard tunnel stage \
        schema bench clean load-adapter

include tests/cluster/cluster.mk

setup:                                ## the training environment .venv: built, updated or rebuilt as needed
	@VENV=$(VENV) env/setup.sh train

setup-serve:                          ## the serving environment .venv-serve (vLLM, for serve.engine=vllm)
	@env/setup.sh serve

demo: setup                           ## preprocess -> 2-process DeepSpeed LoRA -> Serve -> two requests, locally
	$(FT) demo $(OVERRIDES)

# As root, `make test` brings the test cluster up, then runs the suite as the unprivileged ftl-alice
# (tests/cluster/run-as-user.sh); as any other user it runs the suite as that user, against the running cluster.
# PYTEST_TIMEOUT bounds each test without its own timeout mark.
IS_ROOT  := $(filter 0,$(shell id -u))
PYTEST_TIMEOUT ?= 600
# Two pytest workers: one runs every test on the Slurm cluster, one after the other (they share its nodes and its
# queue), while the other runs the rest (tests/conftest.py groups them). PYTEST_WORKERS=0 runs all in one process.
PYTEST_WORKERS ?= 2
# As root the cluster comes up (apt-get, daemons) while the environments build; its output follows theirs.
test:                                 ## the whole suite, against a real local Slurm cluster
	@$(if $(IS_ROOT),log=$$(mktemp) && { $(MAKE) --no-print-directory cluster-up >$$log 2>&1 & cluster=$$!; } &&) \
	$(MAKE) --no-print-directory setup setup-serve \
	$(if $(IS_ROOT),&& { wait $$cluster; rc=$$?; cat $$log; rm -f $$log; exit $$rc; })
	bash tests/cluster/run-as-user.sh $(PY) -m pytest --timeout=$(PYTEST_TIMEOUT) \
	    -n $(PYTEST_WORKERS) --dist loadgroup --no-loadscope-reorder $(PYTEST_SELECT) $(PYTEST_ARGS)

# The security suite alone: every test marked `security` (another user of the same nodes attacks a run, an
# endpoint, TensorBoard), as ftl-alice with ftl-bob as the attacker. A site runs it after installing.
test-security: PYTEST_SELECT := -m security
test-security: test                   ## only the security tests (pytest -m security)

train: setup                          ## submit the pipeline: preprocess array -> training -> serve (if asked)
	$(FT) train $(RECIPE) $(OVERRIDES) $(DRY)

preprocess: setup                     ## only the preprocessing array
	$(FT) preprocess $(RECIPE) $(OVERRIDES) $(DRY)

sweep: setup                          ## a recipe's sweep: one tokenization, the trials as one training array
	$(FT) sweep $(RECIPE) $(OVERRIDES) $(DRY)

serve: setup                          ## serve a finished run (RUN=runs/<name>), a sweep's trials [BEST=1], or a recipe
	$(FT) serve $(or $(RUN),$(RECIPE)) $(OVERRIDES) $(DRY) $(if $(filter 1 yes true,$(BEST)),--best)

show: setup                           ## print the resolved recipe
	$(FT) show $(RECIPE) $(OVERRIDES)

status: setup                         ## state of a run's stages (all runs without RUN)
	$(FT) status $(RUN)

logs: setup                           ## a stage's log: RUN=... [STAGE=train] [TASK=0]
	$(FT) logs $(RUN) --stage $(STAGE) --task $(TASK)

cancel: setup                         ## cancel a run's jobs
	$(FT) cancel $(RUN)

load-adapter: setup                   ## serve one more adapter from RUN's running endpoint: NAME=... ADAPTER=dir
	$(FT) load-adapter $(RUN) $(NAME) $(ADAPTER)

report: setup                         ## report.md and plots in the run directory
	$(FT) report $(RUN)

eval: setup                           ## held-out loss of base vs adapter: RUN=... [DATA=file.jsonl]
	$(FT) eval $(RUN) $(OVERRIDES) $(if $(DATA),--data $(DATA))

export: setup                         ## merged full model in RUN/merged
	$(FT) export $(RUN) $(OVERRIDES)

tensorboard: setup                    ## TensorBoard over RUNS on loopback; prints the ssh -L line
	$(FT) tensorboard $(RUNS)

tunnel: setup                         ## the ssh -L line to RUN's endpoint [OPEN=1 runs it] [LOGIN_HOST=...]
	$(FT) tunnel $(RUN) $(if $(LOGIN_HOST),--login-host $(LOGIN_HOST)) $(if $(OPEN),--open)

stage: setup                          ## fetch RECIPE's hub models and data sets into STAGE_DIR for offline nodes
	$(FT) stage $(RECIPE) $(OVERRIDES) --into $(or $(STAGE_DIR),cache/hub)

schema: setup                         ## regenerate README.md's recipe reference from the schema
	$(FT) schema --readme README.md
