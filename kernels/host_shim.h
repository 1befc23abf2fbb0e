// Host twin of the CUDA execution model: the same .cu source compiled by g++.
//
//   g++ -std=c++17 -O2 -fopenmp -fPIC -shared -x c++ -include kernels/host_shim.h file.cu
//
// Blocks run in parallel (OpenMP), the threads of a block run one after another. So a kernel
// compiled here must not rely on __syncthreads or shared memory between threads: it is left
// undefined on purpose, and kernels that need block cooperation keep a cooperative-free variant
// for the host twin (see ../shared/DESIGN.md). Under nvcc this header only defines the
// HOST_ENTRY macro as nothing.
#pragma once

#ifdef __CUDACC__

#define HOST_ENTRY(name, params, args)
#define DEVICE_INLINE __device__ __forceinline__
__device__ __forceinline__ float ldg(const float* p) { return __ldg(p); }

#else  // host twin

#include <cmath>
#include <cstdint>

struct dim3 {
    unsigned x, y, z;
    constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

// Shared by every translation unit (C++17 inline variables): with `static` each file would get
// its own copy and a kernel would silently read zeros (../shared/TRAPS.md).
inline thread_local dim3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define DEVICE_INLINE inline

inline float ldg(const float* p) { return *p; }
inline float rsqrtf(float x) { return 1.f / std::sqrt(x); }

inline float atomicAdd(float* address, float value) {
    float old;
#pragma omp atomic capture
    {
        old = *address;
        *address += value;
    }
    return old;
}

template <class Body>
void host_launch(dim3 grid, dim3 block, Body body) {
    blockDim = block;
    gridDim = grid;
    const long n_blocks = static_cast<long>(grid.x) * grid.y * grid.z;
#pragma omp parallel for schedule(dynamic, 1)
    for (long b = 0; b < n_blocks; ++b) {
        blockIdx = dim3(static_cast<unsigned>(b % grid.x), static_cast<unsigned>((b / grid.x) % grid.y),
                        static_cast<unsigned>(b / (static_cast<long>(grid.x) * grid.y)));
        for (unsigned tz = 0; tz < block.z; ++tz)
            for (unsigned ty = 0; ty < block.y; ++ty)
                for (unsigned tx = 0; tx < block.x; ++tx) {
                    threadIdx = dim3(tx, ty, tz);
                    body();
                }
    }
}

// extern "C" void host_<name>(gx, gy, gz, bx, by, bz, params...): runs the kernel's grid on the
// host; this is what the ctypes launcher calls.
#define HOST_PARAMS_(...) __VA_ARGS__
#define HOST_ENTRY(name, params, args)                                                            \
    extern "C" void host_##name(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,   \
                                unsigned bz, HOST_PARAMS_ params) {                                \
        host_launch(dim3(gx, gy, gz), dim3(bx, by, bz), [&] { name args; });                       \
    }

#endif
