"""Build of the agm_fast Python package and its C++ extension ``agm_fast._C``.

The extension is built against the torch that is already installed: ``pip install --no-build-isolation .``.
``[build-system] requires`` does not name torch, so a plain ``pip install .`` (build isolation on) never downloads a
second torch of several GB into its build environment; it stops within seconds with one message that gives the
command above (``build_config.NO_TORCH_MESSAGE``). ``python -m build --sdist`` needs no torch.

What is built:
    torch without CUDA (or no CUDA toolkit found): the CPU kernels (csrc/*.cpp, csrc/cpu/*.cpp)
    torch with CUDA and a CUDA toolkit: the CPU and CUDA kernels (also csrc/cuda/*.cu), AGM_FAST_WITH_CUDA defined

Environment switches:
    AGM_FAST_NO_EXT=1     skip the extension (``import agm_fast`` still works; the pure-PyTorch path is used)
    MAX_JOBS              parallel compile jobs (default 2)
    TORCH_CUDA_ARCH_LIST  CUDA architectures. Default: the visible GPUs; with none visible (a login node, CI),
                          ``build_config.cuda_arch_list``: the toolkit's share of sm_80, 86, 89, 90, 100 and 120,
                          with PTX for the newest
"""

import glob
import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, ROOT)
import build_config  # noqa: E402

CPP_SOURCES = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
CUDA_SOURCES = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))


def _openmp_flags():
    """Compiler and linker flags for OpenMP; none on macOS, whose default compiler has no OpenMP runtime."""
    if sys.platform == "win32":
        return ["/openmp"], []
    if sys.platform == "darwin":
        return [], []
    return ["-fopenmp"], ["-fopenmp"]


class _NoTorchBuildExt(build_ext):
    """The build_ext of an environment without torch: it stops with one message instead of a traceback."""

    def run(self):
        if self.extensions:
            sys.exit(build_config.NO_TORCH_MESSAGE)


def _cuda_setup(torch, cpp_extension) -> bool:
    """Whether to build the CUDA kernels; picks an architecture list when no GPU is visible."""
    if torch.version.cuda is None:
        return False
    if cpp_extension.CUDA_HOME is None:
        print("agm_fast: torch has CUDA but no CUDA toolkit was found (set CUDA_HOME); building the CPU kernels only")
        return False
    nvcc = build_config.nvcc_path(cpp_extension.CUDA_HOME)
    problem = build_config.cuda_version_problem(torch.version.cuda, nvcc and build_config.nvcc_version(nvcc))
    if problem:
        sys.exit(problem)
    try:
        archs = build_config.arch_list_for_build(
            os.environ.get("TORCH_CUDA_ARCH_LIST"),
            torch.cuda.is_available(),
            build_config.toolkit_archs(nvcc) if nvcc else [],
        )
    except ValueError as exc:
        sys.exit(f"agm_fast: {exc}")
    if archs is not None:
        print(f"agm_fast: no GPU is visible; building for TORCH_CUDA_ARCH_LIST={archs}")
        os.environ["TORCH_CUDA_ARCH_LIST"] = archs
    return True


def _ext_modules():
    if os.environ.get("AGM_FAST_NO_EXT", "0") == "1":
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        # The sources still go into an sdist; building them stops with NO_TORCH_MESSAGE.
        return [Extension("agm_fast._C", sources=CPP_SOURCES)], {"build_ext": _NoTorchBuildExt}

    os.environ.setdefault("MAX_JOBS", "2")
    with_cuda = _cuda_setup(torch, cpp_extension)
    omp_cflags, omp_ldflags = _openmp_flags()
    common = dict(
        name="agm_fast._C",
        include_dirs=[os.path.join(ROOT, "csrc")],
        extra_link_args=omp_ldflags,
    )
    cxx = build_config.CXX_FLAGS + omp_cflags
    if with_cuda:
        ext = cpp_extension.CUDAExtension(
            sources=CPP_SOURCES + CUDA_SOURCES,
            define_macros=[("AGM_FAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": list(build_config.NVCC_FLAGS)},
            **common,
        )
    else:
        ext = cpp_extension.CppExtension(sources=CPP_SOURCES, extra_compile_args={"cxx": cxx}, **common)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(no_python_abi_suffix=False)}


def _method_packages():
    """One package per method folder under agm_fast/methods (a new method needs no change here)."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "agm_fast", "methods")
    names = sorted(d for d in os.listdir(root) if os.path.isfile(os.path.join(root, d, "__init__.py")))
    return [f"agm_fast.methods.{d}" for d in names]


def main():
    ext_modules, cmdclass = _ext_modules()
    setup(
        packages=[
            "agm_fast",
            "agm_fast.cli",
            "agm_fast.integrations",
            "agm_fast.methods",
            *_method_packages(),
            "agm_fast.ops",
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
        package_data={"agm_fast.data": ["*.npz", "*.md"], "agm_fast.cli": ["methods.json"]},
        ext_modules=ext_modules,
        cmdclass=cmdclass,
    )


# setuptools runs this file as __main__; tests import it to check the build decisions.
if __name__ == "__main__":
    main()
