# kubelvs: the two commands a newcomer needs are `make demo` and `make test`.
PY := .venv/bin/python
VM := $(PY) hack/vm.py

.PHONY: demo test lint unit bench bench-ipvs bench-director bench-budget bench-ha bench-flows cluster cluster-down bootstrap clean install-check

bootstrap:
	bash hack/bootstrap.sh

## demo: the local control plane on the host (built on the first run), then in the IPVS VM: the
## standalone CLI with DR and TUN, and the operator: three directors, an owner per VIP, a failover
## with connections surviving
demo: bootstrap
	bash hack/bootstrap.sh --cluster
	$(PY) hack/demo.py

## test: lint, then every test: unit tests and API tests on the host, kernel tests in one VM boot
test:
	bash hack/bootstrap.sh --cluster
	$(MAKE) lint
	$(PY) -m pytest

lint:
	.venv/bin/ruff check operator tests bench hack
	.venv/bin/ruff format --check operator
	.venv/bin/mypy
	.venv/bin/lint-imports

unit: bootstrap
	$(PY) -m pytest tests/unit

## bench: IPVS programming/dump/update against ipvsadm (one VM run), then the director's convergence,
## start-up and memory (control plane on the host, director in the VM) -> bench/results.json, README table
bench: bench-ipvs bench-director
	$(PY) bench/table.py

# The VM writes to this checkout's output directory, outside the checkout (which may be under
# /tmp, where the guest cannot write): `hack/vm.py --vmout` creates and prints it (.vmout links to it).
bench-ipvs: bootstrap
	out=$$($(VM) --vmout) && \
	$(VM) --rwdir "$$out" --timeout 3000 -- $(PY) bench/ipvs_bench.py --out "$$out/ipvs_bench.json" && \
	$(PY) bench/merge_results.py "$$out/ipvs_bench.json" bench/results.json

bench-director: bootstrap
	bash hack/bootstrap.sh --cluster
	out=$$($(VM) --vmout) && \
	$(PY) bench/director_bench.py host --out "$$out/director_bench.json" && \
	$(PY) bench/merge_results.py "$$out/director_bench.json" bench/results.json

## bench-budget: the director's memory at 1,000 VirtualServers against its budget (natively: a control plane
## of its own, the kernel in memory; seconds, not a VM run); fails loudly over it. BUDGET_MB=65 by default
# 65 MB: the issue's target is < 80 MB; measured 51 MB, so a regression shows long before the target.
BUDGET_MB ?= 65
bench-budget: bootstrap
	bash hack/bootstrap.sh --cluster
	$(PY) bench/director_profile.py --budget 1000 --budget-mb $(BUDGET_MB)

## bench-ha: VIP failover, kubelvs's election against keepalived (control plane on the host, one VM
## run; hours at the full counts, HA_BENCH_ARGS=--quick for a short run) -> bench/results.json, README table
HA_BENCH_ARGS ?=
bench-ha: bootstrap
	bash hack/bootstrap.sh --cluster
	out=$$($(VM) --vmout) && \
	$(PY) bench/ha_bench.py host --out "$$out/ha_bench.json" $(HA_BENCH_ARGS) && \
	$(PY) bench/merge_results.py "$$out/ha_bench.json" bench/results.json
	$(PY) bench/table.py

## bench-flows: established flows across repeated failovers and failbacks (tests/kernel/test_ha_flows.py
## with KUBELVS_HA_FLOW_CYCLES), then keepalived with lvs_sync_daemon in the same topology
## (bench/keepalived_flows.py); two VM runs, about a minute per cycle -> bench/results.json, README table
FLOW_CYCLES ?= 20
bench-flows: bootstrap
	bash hack/bootstrap.sh --cluster
	out=$$($(VM) --vmout) && \
	$(PY) bench/flow_bench.py --cycles $(FLOW_CYCLES) --out "$$out/flow_bench.json" && \
	$(PY) bench/merge_results.py "$$out/flow_bench.json" bench/results.json
	$(PY) bench/table.py

## install-check: the install path alone: the chart (lint, kubeconform, dry-run, migration), alerts
## (promtool, from Debian's package or built from Go modules), Argo CD health, then the chart under a real kubelet
install-check: bootstrap
	bash hack/bootstrap.sh --cluster
	bash hack/install/tools.sh promtool
	$(PY) -m pytest tests/unit/test_alerts.py tests/unit/test_argocd_health.py tests/api/test_chart.py \
		tests/api/test_deploy.py tests/install

## cluster: start the local control plane (etcd, kube-apiserver, kube-controller-manager); cluster-down stops it
cluster:
	bash hack/bootstrap.sh --cluster
	$(PY) hack/cluster/controlplane.py up

cluster-down:
	$(PY) hack/cluster/controlplane.py down

clean:
	if [ -x $(PY) ]; then rm -rf "$$($(VM) --vmout)"; fi
	rm -rf .vmout .pytest_cache .ruff_cache .mypy_cache
