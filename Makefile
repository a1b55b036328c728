# squashfu: `make demo` and `make test` are the whole quick start on Debian.
SHELL := /bin/bash
VENV := .venv
PY := $(VENV)/bin/python
APT_PACKAGES := squashfs-tools rsync fuse3 libfuse3-dev pkg-config patch gcc python3-dev squashfuse attr acl e2fsprogs libcap2-bin groff-base python3-venv openssh-server rclone

.PHONY: install system-packages demo test lint bench clean

install: system-packages $(VENV)/.installed

# Install only what is missing, so a second run costs nothing and needs no network.
system-packages:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:" $$missing; \
	  if [ "$$(id -u)" != 0 ]; then SUDO=sudo; fi; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; \
	  case " $$missing " in *" openssh-server "*) \
	    echo "openssh-server is for the tests, which start their own sshd on 127.0.0.1: its system service is left stopped"; \
	    ($$SUDO systemctl disable --now ssh.service || $$SUDO service ssh stop) >/dev/null 2>&1 || true;; \
	  esac; \
	fi

$(VENV)/.installed: pyproject.toml contrib/pyfuse3/build.sh contrib/pyfuse3/cache-symlinks.patch contrib/pyfuse3/cache-listings.patch
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	bash contrib/pyfuse3/build.sh $(PY)  # pyfuse3 with symlink and listing caching, before pip picks the plain one
	# compat: the checkout on sys.path through a .pth line. The default editable finder costs every command
	# ~12 ms of start-up (docs/benchmarks.md, "Command start-up"); a setuptools without compat gets the default.
	$(PY) -m pip install -q -e '.[dev]' --config-settings editable_mode=compat 2>/dev/null || $(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash contrib/demo.sh

test: install
	$(PY) -m pytest tests

lint: install
	$(VENV)/bin/ruff check squashfu_fs tests bench
	$(VENV)/bin/mypy

bench: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) bench/run_all.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
