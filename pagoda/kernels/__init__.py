"""Compiled CPU kernels (C++ in pagoda/csrc/cpu), built on first use; torch fallbacks otherwise."""
