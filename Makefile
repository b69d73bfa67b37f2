# Every target sets itself up: it creates (or refreshes) the virtual environment
# in .venv when pyproject.toml or constraints.txt changed, then runs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# torch==2.13.0 from constraints.txt: the local CPU wheel where the machine has
# one, PyPI's default (CUDA-enabled on Linux) build everywhere else.
PIP_INSTALL := $(BIN)/python -m pip install --disable-pip-version-check -q -c constraints.txt

# The demo draws off-screen (Agg); notebooks (opened, rendered or tested) keep Jupyter's
# inline backend, so a MPLBACKEND set in the shell is cleared for them.
HEADLESS := MPLBACKEND=Agg
INLINE := env -u MPLBACKEND

# torchvision lives only in a side venv: the exactness test and the interop notebook run there
# (torch 2.14.1 + torchvision 0.29.1; the main venv's torch pin has no torchvision beside it).
TV_VENV ?= .venv-tv
TV_BIN := $(TV_VENV)/bin
TV_STAMP := $(TV_VENV)/.installed
TV_NOTEBOOKS := notebooks/A1_torchvision_interop.ipynb

.PHONY: demo test lab student render data clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) -e '.[test]'
	touch $@

$(TV_STAMP): pyproject.toml
	test -x $(TV_BIN)/python || $(PYTHON) -m venv $(TV_VENV)
	$(TV_BIN)/python -m pip install --disable-pip-version-check -q torch==2.14.1 torchvision==0.29.1
	$(TV_BIN)/python -m pip install --disable-pip-version-check -q -e '.[test]'
	touch $@

## The main job: shapes data, train, COCO-evaluate, AP table and pictures in runs/demo.
demo: $(STAMP)
	$(HEADLESS) $(BIN)/python -m minimrcnn demo --out runs/demo

## The whole test suite: unit tests and every notebook, top to bottom, under nbval.
test: $(STAMP) $(TV_STAMP)
	$(INLINE) $(BIN)/python -m pytest tests notebooks --nbval-lax --nbval-current-env --durations=15 \
		$(addprefix --ignore=,$(TV_NOTEBOOKS))
	$(INLINE) $(TV_BIN)/python -m pytest tests/test_interop_torchvision.py $(TV_NOTEBOOKS) \
		--nbval-lax --nbval-current-env --durations=5

## JupyterLab on the course (LAB_DIR=student for a student edition unpacked at the root);
## Jupyter refuses to start as root without --allow-root, and containers often run as root.
LAB_DIR ?= notebooks
lab: $(STAMP)
	$(INLINE) $(BIN)/jupyter lab $(LAB_DIR) $$(if [ "$$(id -u)" = 0 ]; then echo --allow-root; fi)

## The student edition: every notebook with its exercise solutions replaced by a stub, in build/student.
student: $(STAMP)
	$(BIN)/python -m minimrcnn.course.student --source notebooks --out build/student

## Every notebook executed into HTML under build/, for reading without running.
render: $(STAMP)
	mkdir -p build
	$(INLINE) $(BIN)/jupyter nbconvert --to html --execute --ExecutePreprocessor.timeout=600 --output-dir build $(filter-out $(TV_NOTEBOOKS),$(wildcard notebooks/*.ipynb))

data: $(STAMP)
	$(BIN)/python -m minimrcnn data shapes --out data/shapes

clean:
	rm -rf build runs .pytest_cache
