"""Builds florence_kernels and its extension florence_kernels._C.

Variables (read by CMakeLists.txt too):
  FLORENCE_SKIP_CUDA_BUILD=1   build the C++ CPU extension only (automatic when no nvcc is found)
  CUDA_HOME / CUDA_PATH        CUDA toolkit folder (the one holding include/cuda_runtime.h);
                               default /usr/local/cuda, else the folder of the nvcc on PATH
  TORCH_CUDA_ARCH_LIST         architectures to build for, default "8.0;9.0"
  MAX_JOBS                     parallel compile jobs; default: CPU count capped by free memory (2 GiB a job)
"""

import glob
import importlib.util
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
DEFAULT_ARCH_LIST = "8.0;9.0"
GIB_PER_JOB = 2


def log(msg):
    print(f"[florence_kernels setup] {msg}", file=sys.stderr)


def find_cuda_home():
    """The real toolkit folder. torch guesses it from `which nvcc`, which is a wrapper script on some machines
    (/usr/local/bin/nvcc here), so we look for include/cuda_runtime.h before trusting a folder."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
        # A wrapper script `exec /path/to/cuda/bin/nvcc "$@"`: follow it.
        try:
            with open(nvcc, errors="ignore") as f:
                for word in f.read(4096).split():
                    if word.endswith("/bin/nvcc"):
                        candidates.append(os.path.dirname(os.path.dirname(word)))
        except OSError:
            pass
    for c in candidates:
        if (
            c
            and os.path.isfile(os.path.join(c, "include", "cuda_runtime.h"))
            and os.path.isfile(os.path.join(c, "bin", "nvcc"))
        ):
            return os.path.realpath(c)
    return None


def nvidia_pip_include_dirs():
    """Headers from PyTorch's nvidia-* pip packages (cusparse.h, cublas_v2.h, ...), which ATen/cuda includes
    and a bare toolkit may lack."""
    spec = importlib.util.find_spec("nvidia")
    if spec is None or not spec.submodule_search_locations:
        return []
    dirs = []
    for base in spec.submodule_search_locations:
        dirs += sorted(glob.glob(os.path.join(base, "cu*", "include")))
        dirs += sorted(glob.glob(os.path.join(base, "*", "include")))
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def default_max_jobs():
    try:
        with open("/proc/meminfo") as f:
            avail_kb = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable"))
        by_memory = max(1, avail_kb // (GIB_PER_JOB * 1024 * 1024))
    except (OSError, StopIteration):
        by_memory = 1
    return max(1, min(os.cpu_count() or 1, by_memory))


def extension_modules():
    skip_cuda = os.environ.get("FLORENCE_SKIP_CUDA_BUILD", "0") == "1"
    cuda_home = None if skip_cuda else find_cuda_home()
    if cuda_home:
        os.environ["CUDA_HOME"] = cuda_home  # before torch.utils.cpp_extension reads it
    os.environ.setdefault("MAX_JOBS", str(default_max_jobs()))

    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    if not skip_cuda and cuda_home is None:
        log("no CUDA toolkit found (no nvcc, CUDA_HOME unset): building the CPU-only extension")
    elif not skip_cuda and torch.version.cuda is None:
        log(f"torch {torch.__version__} is a CPU build: building the CPU-only extension")
        cuda_home = None
    elif skip_cuda:
        log("FLORENCE_SKIP_CUDA_BUILD=1: building the CPU-only extension")

    sources = sorted(glob.glob("csrc/**/*.cpp", recursive=True))
    include_dirs = [os.path.join(ROOT, "csrc")]
    # at::parallel_for is header code: without -fopenmp in our own compile it silently runs on one thread.
    # -fno-math-errno -fno-trapping-math (as torch itself): lets GCC vectorise the CPU softmax loops.
    cxx_flags = ["-O3", "-fopenmp", "-fno-math-errno", "-fno-trapping-math"]
    link_flags = ["-fopenmp"]
    if cuda_home:
        arch_list = os.environ.setdefault("TORCH_CUDA_ARCH_LIST", DEFAULT_ARCH_LIST)
        sources += sorted(glob.glob("csrc/**/*.cu", recursive=True))
        include_dirs += nvidia_pip_include_dirs()
        arch_csv = ",".join(a.strip() for a in arch_list.replace(" ", ";").split(";") if a.strip())
        defines = ["-DWITH_CUDA", f'-DFK_CUDA_ARCH_LIST="{arch_csv}"']
        log(
            f"building with CUDA from {cuda_home} for TORCH_CUDA_ARCH_LIST={arch_list}, "
            f"MAX_JOBS={os.environ['MAX_JOBS']}"
        )
        ext = CUDAExtension(
            "florence_kernels._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags + defines, "nvcc": ["-O3", "--expt-relaxed-constexpr"] + defines},
            extra_link_args=link_flags,
        )
    else:
        ext = CppExtension(
            "florence_kernels._C",
            sources,
            include_dirs=include_dirs,
            extra_compile_args=cxx_flags,
            extra_link_args=link_flags,
        )
    return [ext], {"build_ext": BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = extension_modules()

setup(
    packages=find_packages(include=["florence_kernels", "florence_kernels.*", "florence", "florence.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
