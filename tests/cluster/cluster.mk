# Real two-node Slurm cluster on this machine, for tests and CI (needs root; make test then runs as ftl-alice).
# Included by the top-level Makefile. See tests/cluster/README.md.
#   make cluster-up                  start it (idempotent; fast no-op when healthy)
#   make cluster-down                stop it, keep state and accounting
#   make cluster-down PURGE=1        stop it and delete its state (job ids restart at 1)
CLUSTER_DIR := $(dir $(lastword $(MAKEFILE_LIST)))

.PHONY: cluster-up cluster-down
cluster-up:
	bash $(CLUSTER_DIR)up.sh

cluster-down:
	bash $(CLUSTER_DIR)down.sh $(if $(PURGE),--purge)
