"""Benchmarks: a bundle's variants side by side with the PyTorch reference (compare), the timing
machinery (measure), the candidates, the report and its plot, GEMM FLOP counts, and generation speed."""

from toolkit.bench.compare import available_providers, bench
from toolkit.bench.report import BenchReport, Row

__all__ = ["BenchReport", "Row", "available_providers", "bench"]
