"""Shared setup of the pytest-benchmark suites: machine facts go into the saved JSON."""
import os
import platform

import pytest
import torch


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_facts() -> dict:
    facts = {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }
    if torch.cuda.is_available():
        facts["device"] = torch.cuda.get_device_name()
    return facts


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["medcam_fast"] = machine_facts()


def pytest_addoption(parser):
    parser.addoption("--bench-devices", default="auto",
                     help="comma list of devices to benchmark (cpu,cuda); auto = cpu plus cuda when present")
    parser.addoption("--bench-quick", action="store_true", help="the smallest sizes only (smoke run)")
    parser.addoption("--bench-full", action="store_true", help="every size and batch, also on CPU")


@pytest.fixture(scope="session")
def quick(request) -> bool:
    return request.config.getoption("--bench-quick")


def bench_devices(config) -> list:
    opt = config.getoption("--bench-devices")
    if opt == "auto":
        return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [d for d in opt.split(",") if d]


def pytest_generate_tests(metafunc):
    if "bench_device" in metafunc.fixturenames:
        metafunc.parametrize("bench_device", bench_devices(metafunc.config))


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()
