// Stand-in for the NVTX header: the CUDA-on-CPU runtime (../../runtime.h) defines the ranges as no-ops.
#pragma once
#include "../../runtime.h"
