# Two commands are the whole set-up (README): `make demo` and `make test`.
# Both create the virtual environment and install what they need, Debian packages included.
SHELL := /bin/bash
PYTHON ?= $(shell for p in python3.12 python3.11 python3; do command -v $$p >/dev/null && $$p -c 'import sys; sys.exit(sys.version_info < (3, 11))' && { echo $$p; break; }; done)
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# Debian packages used by tests and the demo: dcmtk is the independent DICOM peer; e2fsprogs,
# dosfstools, mtools and systemd-boot-efi for the image recipe's fast check (tests/unit/test_image_recipe.py).
DEB_PACKAGES := dcmtk e2fsprogs dosfstools mtools systemd-boot-efi
# `make image` and its checks: the root file system, the disk, and the boot test's qemu + UEFI firmware.
IMAGE_DEB_PACKAGES := mmdebstrap e2fsprogs dosfstools mtools fdisk systemd-boot-efi zstd rauc squashfs-tools qemu-system-x86 ovmf dcmtk
# arm64 (ARCH=arm64): qemu-user-static + binfmt run the arm64 root file system's programs during the
# build, the cross compiler builds the host twin, qemu-system-arm + AAVMF boot it.
ARM64_DEB_PACKAGES := qemu-user-static binfmt-support arch-test g++-aarch64-linux-gnu qemu-system-arm qemu-efi-aarch64
ARCH ?= amd64
IMAGE_DIR := build/image$(if $(filter arm64,$(ARCH)),-arm64,)
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: all venv sysdeps test demo clean image image-sysdeps image-check boot-test

all: test

$(STAMP): pyproject.toml
	@test -n "$(PYTHON)" || { echo "Python >= 3.11 is required" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[codecs,test,train]'
	touch $@

venv: $(STAMP)

# Installs whichever of the listed Debian packages is missing.
define apt_install
	@missing=$$(for p in $(1); do dpkg-query -W -f '$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing Debian packages:" $$missing; \
		$(SUDO) apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	fi
endef

sysdeps:
	$(call apt_install,$(DEB_PACKAGES))

image-sysdeps:
	$(call apt_install,$(IMAGE_DEB_PACKAGES) $(if $(filter arm64,$(ARCH)),$(ARM64_DEB_PACKAGES),))
ifeq ($(ARCH),arm64)
	@mountpoint -q /proc/sys/fs/binfmt_misc || $(SUDO) mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
	@$(SUDO) update-binfmts --enable qemu-aarch64 2>/dev/null || test -e /proc/sys/fs/binfmt_misc/qemu-aarch64
endif

test: venv sysdeps
	$(PY) -m pytest -q

demo: venv
	$(PY) -m appliance.demo

# The appliance image (image-build/, README "Field engineers"): build/image/appliance.img, its zstd
# copy, manifest.json (bill of materials), SHA256SUMS. Needs root; about 2-3 minutes.
# `make image ARCH=arm64`: the same for arm64, in build/image-arm64.
image: venv image-sysdeps
	$(PY) image-build/build.py --arch $(ARCH) --out $(IMAGE_DIR)

# Two independent builds must give the same bytes.
image-check: venv image-sysdeps
	PY=$(PY) image-build/reproducible.sh build/image-repro

# Boots build/image/appliance.img in qemu: C-ECHO, a CT study denoised, a CT-PD study reconstructed.
boot-test: venv image-sysdeps
	$(PY) image-build/boot_test.py --image $(IMAGE_DIR)/appliance.img --out $(IMAGE_DIR)/boot-test

clean:
	rm -rf $(VENV) .pytest_cache build
