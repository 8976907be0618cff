"""CPU emulation of the fused engine's CUDA kernels: cuda_emu.h, build.py, driver.py (see tests/test_engine_emulated.py)."""
