// Shared helpers for pagoda's CPU ops (compiled by pagoda/kernels/cpu_ext.py).
#pragma once
#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
