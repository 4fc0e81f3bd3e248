"""Shared test parametrisation: every op test runs on each of these devices."""
import torch

devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
float_dtypes = [torch.float32, torch.float64]
half_dtypes = [torch.float16, torch.bfloat16]


def tol(dtype: torch.dtype) -> dict:
    """Comparison tolerances against the float twin for a dtype."""
    return {
        torch.float64: dict(atol=1e-12, rtol=1e-10),
        torch.float32: dict(atol=1e-6, rtol=1e-5),
        torch.float16: dict(atol=2e-3, rtol=2e-3),
        torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    }[dtype]
