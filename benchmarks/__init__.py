"""magloss benchmarks: see benchmarks/README.md."""
