# `make test` and `make demo` build .venv/ from nothing on first use.
PYTHON ?= python3
VENV := .venv
VPY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# pytest-xdist processes for `make test` (each test runs single-threaded, tests/conftest.py): one per core here
TEST_WORKERS ?= 2

.PHONY: test demo pipeline-demo venv clean transformers-tests lint format typecheck device-wheels

venv: $(STAMP)

$(STAMP): setup.cfg pyproject.toml
	test -x $(VPY) || $(PYTHON) -m venv $(VENV)
	$(VPY) -m pip install --upgrade pip
	# torch/torchvision builds that lie on this machine's disk (pip on Python 3.11 takes them from there)
	$(VPY) -m pip install "torch==2.14.1" "torchvision==0.29.1"
	$(VPY) -m pip install -e ".[dev]"
	# panopticapi's evaluation code; its metadata pins numpy<2, its code works with numpy 2
	$(VPY) -m pip install --no-deps panopticapi-lite
	touch $(STAMP)

# transformers' common test mixins (ModelTesterMixin, ConfigTester, ...) from its sdist, cached in the venv
transformers-tests: $(STAMP)
	$(VPY) tools/fetch_transformers_tests.py

# transformers' ruff settings (pyproject.toml): lint and format check
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

# mypy on src/ with pyproject.toml's [tool.mypy] settings
typecheck: $(STAMP)
	$(VENV)/bin/mypy

test: $(STAMP) transformers-tests lint typecheck
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-2} $(VPY) -m pytest -q -ra -n $(TEST_WORKERS) --dist loadfile tests

demo: $(STAMP)
	OMP_NUM_THREADS=$${OMP_NUM_THREADS:-1} $(VPY) training/demo.py

pipeline-demo: $(STAMP)
	$(VPY) -m transformers_possam.demo

# Wheels for a lent GPU machine (benchmarks/device_session.sh installs them there): the transformers and timm this
# venv pins, which that machine's image holds in other versions. Git ignores .whl/ (.git/info/exclude).
device-wheels: $(STAMP)
	exclude=$$(git rev-parse --git-path info/exclude) && mkdir -p $$(dirname $$exclude) && \
		(grep -qx '/.whl/' $$exclude 2>/dev/null || echo '/.whl/' >> $$exclude)
	rm -rf .whl
	$(VPY) -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
		"transformers==$$($(VPY) -c 'import transformers; print(transformers.__version__)')" \
		"timm==$$($(VPY) -c 'import timm; print(timm.__version__)')"

clean:
	rm -rf $(VENV) build dist src/*.egg-info
