"""Build of the agm_fast Python package and its C++ extension ``agm_fast._C``.

The extension is built against the torch that is already installed; install with
``pip install --no-build-isolation .`` so that pip does not download a second torch to build against.

What is built:
    torch without CUDA (or no CUDA toolkit found): the CPU kernels (csrc/*.cpp, csrc/cpu/*.cpp)
    torch with CUDA and a CUDA toolkit: the CPU and CUDA kernels (also csrc/cuda/*.cu), AGM_FAST_WITH_CUDA defined

Environment switches:
    AGM_FAST_NO_EXT=1     skip the extension (``import agm_fast`` still works; the pure-PyTorch path is used)
    MAX_JOBS              parallel compile jobs (default 2)
    TORCH_CUDA_ARCH_LIST  CUDA architectures (torch's default: the visible GPUs, else a common list)
"""

import glob
import os
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _openmp_flags():
    """Compiler and linker flags for OpenMP; none on macOS, whose default compiler has no OpenMP runtime."""
    if sys.platform == "win32":
        return ["/openmp"], []
    if sys.platform == "darwin":
        return [], []
    return ["-fopenmp"], ["-fopenmp"]


def _ext_modules():
    if os.environ.get("AGM_FAST_NO_EXT", "0") == "1":
        return [], {}
    import torch
    from torch.utils import cpp_extension

    os.environ.setdefault("MAX_JOBS", "2")
    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    with_cuda = torch.version.cuda is not None and cpp_extension.CUDA_HOME is not None
    if torch.version.cuda is not None and not with_cuda:
        print("agm_fast: torch has CUDA but no CUDA toolkit was found (set CUDA_HOME); building the CPU kernels only")
    omp_cflags, omp_ldflags = _openmp_flags()
    # -fno-math-errno lets the compiler vectorise sqrt in the noise loops.
    cxx = (["/O2"] if sys.platform == "win32" else ["-O3", "-fno-math-errno"]) + omp_cflags
    common = dict(
        name="agm_fast._C",
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=omp_ldflags,
    )
    if with_cuda:
        # No --use_fast_math: the noise must match the CPU build up to float rounding.
        ext = cpp_extension.CUDAExtension(
            sources=cpp + cu,
            define_macros=[("AGM_FAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3"]},
            **common,
        )
    else:
        ext = cpp_extension.CppExtension(sources=cpp, extra_compile_args={"cxx": cxx}, **common)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _ext_modules()

setup(
    packages=[
        "agm_fast",
        "agm_fast.cli",
        "agm_fast.methods",
        "agm_fast.kernels",
        "agm_fast.data",
        "agm_fast.benchmarks",
        "agm_fast.benchmarks.baselines",
    ],
    package_dir={
        "agm_fast": "agm_fast",
        "agm_fast.kernels": "kernels",
        "agm_fast.data": "agm_fast/data",
        "agm_fast.benchmarks": "benchmarks",
        "agm_fast.benchmarks.baselines": "benchmarks/baselines",
    },
    package_data={"agm_fast.data": ["*.npz", "*.md"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
