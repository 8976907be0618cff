"""The CPU emulator of the fused CUDA engine: build.py, engine.py, cuda_emu.h (see docs/cuda.md)."""
