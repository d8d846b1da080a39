"""Build of the agm_fast Python package and its C++ extension ``agm_fast._C``.

The extension is built against the torch that is already installed; install with
``pip install --no-build-isolation .`` so that pip does not download a second torch to build against.

Environment switches:
    AGM_FAST_NO_EXT=1     skip the extension (``import agm_fast`` still works; the pure-PyTorch path is used)
    AGM_FAST_FORCE_CUDA=1 build the CUDA sources even when no GPU is visible (torch must have CUDA)
"""

import glob
import os

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _ext_modules():
    if os.environ.get("AGM_FAST_NO_EXT", "0") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    cpp = sorted(glob.glob(os.path.join("csrc", "*.cpp")) + glob.glob(os.path.join("csrc", "cpu", "*.cpp")))
    cu = sorted(glob.glob(os.path.join("csrc", "cuda", "*.cu")))
    with_cuda = torch.version.cuda is not None and (
        torch.cuda.is_available() or os.environ.get("AGM_FAST_FORCE_CUDA", "0") == "1" or os.environ.get("CUDA_HOME")
    )
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    ldflags = ["-fopenmp"]
    if with_cuda:
        ext = CUDAExtension(
            "agm_fast._C",
            cpp + cu,
            include_dirs=[os.path.join(ROOT, "csrc")],
            define_macros=[("AGM_FAST_WITH_CUDA", "1")],
            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17", "--use_fast_math"]},
            extra_link_args=ldflags,
        )
    else:
        ext = CppExtension(
            "agm_fast._C",
            cpp,
            include_dirs=[os.path.join(ROOT, "csrc")],
            extra_compile_args={"cxx": cxx},
            extra_link_args=ldflags,
        )
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


ext_modules, cmdclass = _ext_modules()

setup(
    packages=["agm_fast", "agm_fast.kernels", "agm_fast.data", "agm_fast.benchmarks", "agm_fast.benchmarks.baselines"],
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
