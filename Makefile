# pydesk: `make run` and `make test` do all set-up on a fresh Debian/Ubuntu machine.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYDESK := $(VENV)/bin/pydesk
# Built guest images are cached outside the repo, keyed by a hash of their recipe.
export PYDESK_CACHE ?= $(HOME)/.cache/pydesk
APT_PACKAGES := qemu-system-x86 qemu-utils mmdebstrap kmod cpio zstd erofs-utils busybox-static \
                openssh-client e2fsprogs python3-venv \
                docker-registry skopeo nginx-light git docker.io docker-compose iproute2
STAMP := $(VENV)/.installed

.PHONY: run test deps venv image bench clean

run: image
	$(PYDESK) vm start
	$(PYDESK) vm status
	$(PYDESK) vm shell -- sh -c 'echo "agent answering from $$(uname -n): $$(cat /etc/pydesk-release)"'
	$(PYDESK) run --rm hello

test: image
	$(PY) -m pytest -ra --durations=15

bench: image
	$(PY) -m bench  # writes docs/benchmarks.md

deps:
	@missing=""; for p in $(APT_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing >/dev/null; \
	fi

$(STAMP): pyproject.toml | deps
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,gui]'
	touch $@

venv: deps $(STAMP)
	@# what an installed wheel has: our modules' bytecode (where PYTHONDONTWRITEBYTECODE is
	@# set, the CLI would otherwise compile them at every start)
	$(PY) -m compileall -q desktop vmkit agent guest bench

image: venv
	$(PYDESK) guest build

clean:
	rm -rf $(VENV) build *.egg-info
