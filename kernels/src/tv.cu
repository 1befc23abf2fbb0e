// Gradient of the smoothed isotropic total variation
//     TV(x) = sum_p sqrt(eps^2 + sum_a (x[p + e_a] - x[p])^2)
// with forward differences and zero difference across the far border (Neumann). One thread per
// voxel, gathering from its own term and from the terms of its backward neighbours: no atomics,
// no block cooperation, so the host twin runs it unchanged. Volumes are (nz, ny, nx) float32.

DEVICE_INLINE float tv_at(const float* x, int i, int j, int k, int nx, int ny, int nz, float eps2,
                          float diff[3]) {
    const long p = ((long)k * ny + j) * nx + i;
    const float c = ldg(x + p);
    diff[0] = i + 1 < nx ? ldg(x + p + 1) - c : 0.f;
    diff[1] = j + 1 < ny ? ldg(x + p + nx) - c : 0.f;
    diff[2] = k + 1 < nz ? ldg(x + p + (long)nx * ny) - c : 0.f;
    return sqrtf(eps2 + diff[0] * diff[0] + diff[1] * diff[1] + diff[2] * diff[2]);
}

extern "C" __global__ void tv_gradient(const float* __restrict__ x, float* __restrict__ grad, int nx, int ny,
                                       int nz, float eps) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const int j = blockIdx.y * blockDim.y + threadIdx.y;
    const int k = blockIdx.z * blockDim.z + threadIdx.z;
    if (i >= nx || j >= ny || k >= nz) return;
    const float eps2 = eps * eps;
    float d[3];
    // d/dx_p of its own term: -(sum of forward differences) / norm
    float norm = tv_at(x, i, j, k, nx, ny, nz, eps2, d);
    float g = -(d[0] + d[1] + d[2]) / norm;
    // d/dx_p of the backward neighbours' terms, where x_p is their forward neighbour
    if (i > 0) { norm = tv_at(x, i - 1, j, k, nx, ny, nz, eps2, d); g += d[0] / norm; }
    if (j > 0) { norm = tv_at(x, i, j - 1, k, nx, ny, nz, eps2, d); g += d[1] / norm; }
    if (k > 0) { norm = tv_at(x, i, j, k - 1, nx, ny, nz, eps2, d); g += d[2] / norm; }
    grad[((long)k * ny + j) * nx + i] = g;
}
HOST_ENTRY(tv_gradient, (const float* x, float* grad, int nx, int ny, int nz, float eps), (x, grad, nx, ny, nz, eps))

// TV(x) itself, one term per voxel (summed by the caller), for monitoring and line searches.
extern "C" __global__ void tv_terms(const float* __restrict__ x, float* __restrict__ terms, int nx, int ny, int nz,
                                    float eps) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    const int j = blockIdx.y * blockDim.y + threadIdx.y;
    const int k = blockIdx.z * blockDim.z + threadIdx.z;
    if (i >= nx || j >= ny || k >= nz) return;
    float d[3];
    terms[((long)k * ny + j) * nx + i] = tv_at(x, i, j, k, nx, ny, nz, eps * eps, d);
}
HOST_ENTRY(tv_terms, (const float* x, float* terms, int nx, int ny, int nz, float eps), (x, terms, nx, ny, nz, eps))
