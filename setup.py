"""Build of the native modules eagle2_kernels._C (CPU) and eagle2_kernels._cuda (CUDA) via CMake.

Metadata lives in pyproject.toml; this file only drives CMakeLists.txt. Environment:
  EAGLE2_NO_CUDA=1          skip the CUDA module even when nvcc is found
  EAGLE2_CUDA_ARCHS="80;90" CUDA architectures (CMAKE_CUDA_ARCHITECTURES), default 80;90
  EAGLE2_SANITIZE=1         CPU module with AddressSanitizer + UBSan (debug build, for CI)
  MAX_JOBS / CMAKE_BUILD_PARALLEL_LEVEL   parallel compile jobs, default 2
"""
import fcntl
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "on", "yes")


class CMakeExtension(Extension):
    """A module that CMakeLists.txt builds (its target is the last part of the name)."""

    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    """Configure and build every CMake target at once, then keep only the modules CMake built.

    The CUDA module is optional: CMake decides (check_language(CUDA)), and an extension it did
    not build is dropped from the list so the wheel and editable installs do not expect it.
    """

    def build_extensions(self) -> None:
        cmake = shutil.which("cmake")
        if cmake is None:
            sys.exit("eagle2-kernels: building needs cmake (pip install cmake ninja pybind11)")
        import pybind11

        # A fixed folder (not build_temp, which editable installs make anew each time), so
        # repeated development builds only recompile what changed.
        build_dir = ROOT / "build" / f"cmake-{sys.implementation.cache_tag}"
        build_dir.parent.mkdir(parents=True, exist_ok=True)
        # Several builds of one checkout at once (parallel dev installs) share build_dir.
        with open(build_dir.with_suffix(".lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._cmake_build(cmake, pybind11.get_cmake_dir(), build_dir)

    def _cmake_build(self, cmake: str, pybind11_dir: str, build_dir: Path) -> None:
        sanitize = _flag("EAGLE2_SANITIZE")
        defs = {
            "CMAKE_BUILD_TYPE": "Debug" if sanitize else "Release",
            "CMAKE_LIBRARY_OUTPUT_DIRECTORY": str(build_dir / "lib"),
            "Python_EXECUTABLE": sys.executable,
            "pybind11_DIR": pybind11_dir,
            "EAGLE2_NO_CUDA": "ON" if _flag("EAGLE2_NO_CUDA") else "OFF",
            "EAGLE2_SANITIZE": "ON" if sanitize else "OFF",
            "CMAKE_CUDA_ARCHITECTURES": os.environ.get("EAGLE2_CUDA_ARCHS", "80;90"),
        }
        generator = ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={shutil.which('ninja')}"] if shutil.which("ninja") else []
        # A cache from another build environment (pip's isolated envs are temporary folders)
        # points at tools that may be gone: start that build over.
        fingerprint = json.dumps({"cmake": cmake, "generator": generator, **defs}, sort_keys=True)
        stamp = build_dir / "eagle2-build-env.json"
        if build_dir.exists() and (not stamp.exists() or stamp.read_text() != fingerprint):
            shutil.rmtree(build_dir)
        build_dir.mkdir(parents=True, exist_ok=True)

        configure = [cmake, "-S", str(ROOT), "-B", str(build_dir), *generator]
        configure += [f"-D{k}={v}" for k, v in defs.items()]
        subprocess.run(configure, check=True)
        stamp.write_text(fingerprint)
        jobs = self.parallel or os.environ.get("MAX_JOBS") or os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or 2
        subprocess.run([cmake, "--build", str(build_dir), "--parallel", str(jobs)], check=True)

        built = []
        for ext in self.extensions:
            name = Path(self.get_ext_fullpath(ext.name)).name
            if (build_dir / "lib" / name).exists():
                Path(self.get_ext_fullpath(ext.name)).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(build_dir / "lib" / name, self.get_ext_fullpath(ext.name))
                built.append(ext)
            elif ext.name == "eagle2_kernels._cuda":
                print("eagle2-kernels: CUDA module not built (no CUDA compiler found, or EAGLE2_NO_CUDA=1)")
            else:
                sys.exit(f"eagle2-kernels: CMake did not produce {build_dir / 'lib' / name}")
        self.extensions[:] = built


setup(
    ext_modules=[CMakeExtension("eagle2_kernels._C"), CMakeExtension("eagle2_kernels._cuda")],
    cmdclass={"build_ext": CMakeBuild},
)
