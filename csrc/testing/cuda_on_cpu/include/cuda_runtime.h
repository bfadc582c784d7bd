// Stand-in for the CUDA header of this name: the CUDA-on-CPU runtime (../runtime.h).
#pragma once
#include "../runtime.h"
