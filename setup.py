"""Build medcam_fast: setup.py drives CMakeLists.txt (CMake + Ninja) to produce medcam_fast._C.

Environment:
  MEDCAM_FAST_CUDA=auto|0|1   build the CUDA kernels (auto: when torch has CUDA and nvcc is found)
  TORCH_CUDA_ARCH_LIST        CUDA archs; defaults to the visible GPU, else "8.0;9.0"
  CUDA_HOME                   toolkit root (else CUDA_PATH, nvcc on PATH, /usr/local/cuda)
  MEDCAM_FAST_BUILD_DIR       CMake build folder (default build/cmake-<python tag>), kept for incremental builds
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent


def _is_cuda_home(path) -> bool:
    return path is not None and (Path(path) / "bin" / "nvcc").exists() and (Path(path) / "include").is_dir()


def _find_cuda_home():
    """CUDA_HOME, CUDA_PATH, /usr/local/cuda, or the toolkit of the nvcc on PATH (which may be a
    wrapper script, so its folder is checked for include/)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent.parent)
    for home in candidates:
        if home and _is_cuda_home(home):
            return Path(home)
    return None


def _cuda_setting(torch):
    """Returns (build_cuda, cuda_home, reason) from MEDCAM_FAST_CUDA=auto|0|1."""
    want = os.environ.get("MEDCAM_FAST_CUDA", "auto").strip().lower()
    if want not in ("auto", "0", "1"):
        raise RuntimeError(f"MEDCAM_FAST_CUDA must be auto, 0 or 1, got {want!r}")
    cuda_home = _find_cuda_home()
    if want == "0":
        return False, cuda_home, "MEDCAM_FAST_CUDA=0"
    problems = []
    if torch.version.cuda is None:
        problems.append("torch is a CPU build")
    if cuda_home is None:
        problems.append("nvcc not found (set CUDA_HOME)")
    if problems:
        if want == "1":
            raise RuntimeError("MEDCAM_FAST_CUDA=1 but " + " and ".join(problems))
        return False, cuda_home, "; ".join(problems)
    return True, cuda_home, "torch has CUDA and nvcc was found"


def _tool(name):
    """The PyPI cmake/ninja when installed (pinned), else the one on PATH."""
    try:
        module = __import__(name)
        path = Path(module.CMAKE_BIN_DIR if name == "cmake" else module.BIN_DIR) / name
        if path.exists():
            return str(path)
    except ImportError:
        pass
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found: pip install {name}")
    return found


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext):
        import torch
        import torch.utils.cpp_extension as cpp_ext

        build_cuda, cuda_home, reason = _cuda_setting(torch)
        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        tag = f"py{sys.version_info.major}{sys.version_info.minor}-torch{torch.__version__}"
        build_dir = Path(os.environ.get("MEDCAM_FAST_BUILD_DIR", ROOT / "build" / f"cmake-{tag}"))
        build_dir.mkdir(parents=True, exist_ok=True)

        env = dict(os.environ)
        cmake_bin, ninja_bin = _tool("cmake"), _tool("ninja")
        args = [
            f"-DCMAKE_MAKE_PROGRAM={ninja_bin}",
            f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}",
            f"-DPython3_EXECUTABLE={sys.executable}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DCMAKE_BUILD_TYPE={'Debug' if self.debug else 'Release'}",
            f"-DMEDCAM_FAST_CUDA={'ON' if build_cuda else 'OFF'}",
            f"-DMEDCAM_FAST_TORCH_VERSION={torch.__version__}",
            f"-DMEDCAM_FAST_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-DMEDCAM_FAST_TORCH_LIB_DIR={Path(torch.__file__).parent / 'lib'}",
        ]
        if cuda_home is not None:
            env.setdefault("CUDA_HOME", str(cuda_home))
            args += [f"-DCMAKE_CUDA_COMPILER={cuda_home / 'bin' / 'nvcc'}",
                     f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_home}",
                     f"-DCUDAToolkit_ROOT={cuda_home}"]
        elif torch.version.cuda is not None:
            # torch's CMake config needs a CUDA toolkit; without one, link torch's CPU libs directly.
            args += [f"-DMEDCAM_FAST_TORCH_INCLUDE_DIRS={';'.join(cpp_ext.include_paths())}"]
        if build_cuda and not env.get("TORCH_CUDA_ARCH_LIST"):
            if torch.cuda.is_available():
                major, minor = torch.cuda.get_device_capability()
                env["TORCH_CUDA_ARCH_LIST"] = f"{major}.{minor}"
            else:
                env["TORCH_CUDA_ARCH_LIST"] = "8.0;9.0"

        print(f"medcam_fast: CUDA kernels {'ON' if build_cuda else 'OFF'} ({reason}); "
              f"TORCH_CUDA_ARCH_LIST={env.get('TORCH_CUDA_ARCH_LIST', '-')}; build dir {build_dir}",
              flush=True)
        # A cache configured with other settings (another nvcc, CUDA on/off) cannot be reused.
        fingerprint = json.dumps([cmake_bin, [a for a in args if "OUTPUT_DIRECTORY" not in a],
                                  env.get("TORCH_CUDA_ARCH_LIST")])
        stamp = build_dir / "medcam_fast_config.json"
        if stamp.exists() and stamp.read_text() != fingerprint:
            (build_dir / "CMakeCache.txt").unlink(missing_ok=True)
            shutil.rmtree(build_dir / "CMakeFiles", ignore_errors=True)
        stamp.unlink(missing_ok=True)
        subprocess.run([cmake_bin, "-S", str(ROOT), "-B", str(build_dir), "-G", "Ninja", *args],
                       check=True, env=env)
        jobs = os.environ.get("MAX_JOBS", str(os.cpu_count() or 1))
        stamp.write_text(fingerprint)
        subprocess.run([cmake_bin, "--build", str(build_dir), "--parallel", jobs], check=True, env=env)

        # Read at import time, before the binary is loaded, to refuse a mismatched torch.
        info = {
            "cpu_ops": True,
            "cuda_ops": build_cuda,
            "torch": torch.__version__,
            "cuda": torch.version.cuda if build_cuda else None,
            "cuda_arch_list": env.get("TORCH_CUDA_ARCH_LIST") if build_cuda else None,
            "python": f"{sys.version_info.major}.{sys.version_info.minor}",
        }
        targets = {out_dir}
        if self.inplace or getattr(self, "editable_mode", False):
            targets.add(ROOT / "medcam_fast")  # editable installs import from the source tree
        for target in targets:
            (target / "_build_info.json").write_text(json.dumps(info, indent=2) + "\n")


setup(ext_modules=[CMakeExtension("medcam_fast._C")], cmdclass={"build_ext": CMakeBuild})
