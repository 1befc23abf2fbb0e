# Two commands are the whole set-up (README): `make demo` and `make test`.
# Both create the virtual environment and install what they need, Debian packages included.
SHELL := /bin/bash
PYTHON ?= $(shell for p in python3.12 python3.11 python3; do command -v $$p >/dev/null && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' && { echo $$p; break; }; done)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Debian packages used by tests and the demo: dcmtk is the independent DICOM peer.
DEB_PACKAGES := dcmtk
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: all venv sysdeps test demo clean

all: test

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "Python >= 3.11 is required" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[codecs,test,train]'
	touch $@

venv: $(STAMP)

sysdeps:
	@if [ ! -x /usr/bin/storescu ] || [ ! -x /usr/bin/storescp ]; then \
		echo "installing Debian packages: $(DEB_PACKAGES)"; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $(DEB_PACKAGES); \
	fi

test: venv sysdeps
	$(PY) -m pytest -q

demo: venv
	$(PY) -m appliance.demo

clean:
	rm -rf $(VENV) .pytest_cache
